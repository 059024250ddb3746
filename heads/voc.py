"""Pascal VOC's layout, shared by its detection and segmentation readers: class names, the colour palette, the
ImageSets lists, and a small built-in set in the VOC2012 layout.

A VOC folder (``VOCdevkit/VOC2012`` or ``VOC2007`` as distributed) holds ``JPEGImages/<id>.jpg``,
``Annotations/<id>.xml`` (boxes), ``SegmentationClass/<id>.png`` (palette PNGs: class index per pixel, 255 on the
void borders) and ``ImageSets/{Main,Segmentation}/<split>.txt`` (one image id a line).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .data import DataError, default_data_root, generated_once

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
SEGMENTATION_CLASSES = ("__background__", *CLASSES)  # mask value = index; torchvision's VOC weights' label space
VOID = 255  # segmentation: the borders around objects and hard regions, ignored in training and scoring
DATASETS = ("voc", "builtin_voc")  # the config's dataset values that read this layout
LAYOUT = "data_root is the VOC2012 or VOC2007 folder as distributed, holding JPEGImages/, Annotations/, ImageSets/"


def palette() -> np.ndarray:
    """VOC's 256 x 3 uint8 colour map (the devkit's): the bits of an index, taken three at a time, fill the red,
    green and blue channels from their most significant bit down; 255 (void) is (224, 224, 192)."""
    index = np.arange(256)
    colours = np.zeros((256, 3), dtype=np.uint8)
    for shift in range(8):  # bit 3*shift + channel of the index -> bit 7 - shift of the channel
        for channel in range(3):
            colours[:, channel] |= (((index >> (3 * shift + channel)) & 1) << (7 - shift)).astype(np.uint8)
    return colours


def split_ids(root: str | os.PathLike, kind: str, split: str, files: dict[str, str]) -> list[str]:
    """The image ids listed in ``root/ImageSets/<kind>/<split>.txt``, each checked to have a file in every folder of
    ``files`` (folder -> suffix, e.g. ``{"JPEGImages": ".jpg"}``); a one-line ``DataError`` naming the list and the
    fix when the root or list is missing, the list is empty or repeats an id, or a listed id has no file."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"VOC folder not found: {root} ({LAYOUT})")
    lists = root / "ImageSets" / kind
    path = lists / f"{split}.txt"
    try:
        ids = path.read_text().split()
    except FileNotFoundError:
        found = sorted(p.stem for p in lists.glob("*.txt") if "_" not in p.stem)  # not <class>_<split>.txt
        there = (f"the splits there: {', '.join(found)} (set train_split / val_split to one)" if found else
                 f"{lists} has no split lists ({LAYOUT})")
        raise DataError(f"VOC split list not found: {path}; {there}") from None
    if not ids:
        raise DataError(f"{path} lists no image ids; write one id a line (the file names without suffix)")
    if len(set(ids)) < len(ids):
        repeated = next(image_id for index, image_id in enumerate(ids) if image_id in ids[:index])
        raise DataError(f"{path} lists {repeated} more than once; list each image once")
    for folder, suffix in files.items():
        present = {entry.name for entry in os.scandir(root / folder)} if (root / folder).is_dir() else set()
        missing = [image_id for image_id in ids if image_id + suffix not in present]
        if missing:
            raise DataError(f"{path} lists {len(missing)} id(s) without a file in {root / folder}, first "
                            f"{missing[0]} (no {missing[0]}{suffix}); add the files or remove the ids from the list")
    return ids


# ---- the built-in set

_SHAPE_CLASSES = {"circle": "sheep", "square": "tvmonitor", "triangle": "boat", "cross": "aeroplane",
                  "star": "pottedplant"}  # built-in shape -> the VOC class it stands for
DIFFICULT_SIZE = 0.2  # built-in objects whose longest side is under this fraction of the shorter image side
BORDER = 3  # pixels of void drawn over each object's outline
SEGMENTED_FRACTION = 0.9  # of the images, listed in ImageSets/Segmentation (VOC segments a subset)


def builtin_voc(root: str | os.PathLike | None = None, num_train: int = 200, num_val: int = 40,
                size_range=(200, 300), seed: int = 0) -> Path:
    """Write (once) and return a small set in the VOC2012 layout: the built-in detection shapes (1-3 per image, on
    noisy backgrounds) standing for five VOC classes (sheep, tvmonitor, boat, aeroplane, pottedplant).

    ``Annotations/`` holds VOC XML with 1-based pixel boxes; objects smaller than ``DIFFICULT_SIZE`` of the shorter
    side are ``difficult``. About 90% of the images are segmented: ``SegmentationClass/`` palette PNGs with VOC's
    colours, class indices (background 0) and 255 void borders. ``ImageSets/Main`` and ``ImageSets/Segmentation``
    list ``train``, ``val`` and ``trainval``. Widths and heights are drawn from ``size_range``; deterministic in
    ``seed``.

    ``root`` defaults to ``$MBBACKBONES_DATA/builtin_voc``. It is written into a temporary folder renamed into
    place, so it is complete or absent; an existing one made with the same arguments is reused.
    """
    root = Path(root).expanduser() if root is not None else default_data_root() / "builtin_voc"
    settings = {"num_train": num_train, "num_val": num_val, "size_range": list(size_range), "seed": seed}
    return generated_once(root, settings, lambda folder: _write_builtin(folder, {"train": num_train, "val": num_val},
                                                                       size_range, seed), "VOC")


def _write_builtin(root: Path, counts: dict[str, int], size_range, seed: int) -> None:
    from .detection.builtin import SHAPES, draw_image, in_drawing_order

    name_of = {category: _SHAPE_CLASSES[shape] for category, shape, _ in SHAPES}
    for folder in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    colours = palette().ravel().tolist()
    lists, first = {}, 1
    for split_index, (split, count) in enumerate(counts.items()):
        rng = np.random.default_rng((seed, split_index))
        ids = [f"2012_{first + index:06d}" for index in range(count)]
        segmented = set(rng.choice(ids, size=round(SEGMENTED_FRACTION * count), replace=False).tolist())
        for image_id in tqdm(ids, desc=f"writing the built-in VOC-layout {split}", unit="image"):
            width, height = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            image, objects = draw_image(rng, width, height, int(rng.integers(1, 4)), with_crowd=False)
            image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
            objects = [(name_of[category], polygon) for category, (polygon,), _ in in_drawing_order(objects)]
            (root / "Annotations" / f"{image_id}.xml").write_bytes(
                _annotation(image_id, width, height, objects, image_id in segmented))
            if image_id in segmented:
                mask = _mask(width, height, objects)
                mask.putpalette(colours)
                mask.save(root / "SegmentationClass" / f"{image_id}.png")
        lists[split] = (ids, [image_id for image_id in ids if image_id in segmented])
        first += count
    lists["trainval"] = tuple([image_id for split in counts for image_id in lists[split][kind]] for kind in (0, 1))
    for split, (main, segmentation) in lists.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in main))
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in segmentation))


def _annotation(image_id: str, width: int, height: int, objects, segmented: bool) -> bytes:
    """A VOC XML annotation; boxes are the polygons' bounds in 1-based pixels (first and last pixel covered)."""
    node = ET.Element("annotation")
    short_side = min(width, height)

    def add(parent, tag, text=None):
        child = ET.SubElement(parent, tag)
        if text is not None:
            child.text = str(text)
        return child

    add(node, "folder", "VOC2012")
    add(node, "filename", f"{image_id}.jpg")
    source = add(node, "source")
    add(source, "database", "The mbbackbones built-in VOC-layout set")
    size = add(node, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        add(size, tag, value)
    add(node, "segmented", int(segmented))
    for name, polygon in objects:
        x0, y0, x1, y1 = (int(v) for v in np.round([*polygon.min(axis=0), *polygon.max(axis=0)]))
        obj = add(node, "object")
        add(obj, "name", name)
        add(obj, "pose", "Unspecified")
        add(obj, "truncated", 0)
        add(obj, "difficult", int(max(x1 - x0, y1 - y0) < DIFFICULT_SIZE * short_side))
        box = add(obj, "bndbox")
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            add(box, tag, value)
    ET.indent(node, space="\t")
    return ET.tostring(node) + b"\n"


def _mask(width: int, height: int, objects) -> Image.Image:
    """Class indices in drawing order (later objects on top), each object's outline drawn over in void."""
    mask = Image.new("P", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for name, polygon in objects:
        points = [tuple(point) for point in polygon]
        draw.polygon(points, fill=SEGMENTATION_CLASSES.index(name))
        draw.line(points + points[:1], fill=VOID, width=BORDER, joint="curve")
    return mask
