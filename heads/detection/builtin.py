"""The built-in detection dataset: coloured shapes on a noisy background, in COCO's exact format and layout."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou
from tqdm import tqdm

from ..data import DataError, default_data_root
from ..files import write_once

SHAPES = (  # COCO category id (non-contiguous on purpose), name, hue of the colour family
    (3, "circle", 0.0),
    (7, "square", 0.62),
    (12, "triangle", 0.33),
    (20, "cross", 0.14),
    (41, "star", 0.83),
)
SPLITS = ("train2017", "val2017")
EMPTY_FRACTION, CROWD_FRACTION, GRAY_FRACTION = 0.05, 0.04, 0.03
OBJECT_SIZE = (0.15, 0.6)  # longest box side, as a fraction of the shorter image side


def _regular(num_vertices: int, radii=(1.0,)) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, num_vertices, endpoint=False) - np.pi / 2
    radius = np.resize(np.asarray(radii), num_vertices)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


OUTLINES = {  # unit polygons centred at the origin
    "circle": _regular(32),
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]),
    "triangle": _regular(3),
    "cross": np.array([[-1, -0.35], [-0.35, -0.35], [-0.35, -1], [0.35, -1], [0.35, -0.35], [1, -0.35],
                       [1, 0.35], [0.35, 0.35], [0.35, 1], [-0.35, 1], [-0.35, 0.35], [-1, 0.35]]),
    "star": _regular(10, radii=(1.0, 0.45)),
}


def builtin_coco(root=None, num_train: int = 400, num_val: int = 60, size_range=(240, 480), seed: int = 0) -> Path:
    """Write (once) and return a small COCO-format shapes dataset that an SSDLite learns in minutes on CPU.

    Five categories with non-contiguous ids (circle 3, square 7, triangle 12, cross 20, star 41), each a
    distinct outline and colour family; 1-4 objects per image spanning 15-60% of the shorter side, on a
    noisy background; widths and heights drawn from ``size_range``; about 5% of images empty, a few
    grayscale and a few with one ``iscrowd=1`` cluster of small shapes. Deterministic in ``seed``.

    ``root`` defaults to ``$MBBACKBONES_DATA/builtin_coco`` (``~/.cache/mbbackbones/builtin_coco``). The
    dataset is written into a temporary folder and renamed into place, so ``root`` is either complete or
    absent; an existing one made with the same arguments is reused.
    """
    root = Path(root).expanduser() if root is not None else default_data_root() / "builtin_coco"
    description = (f"mbbackbones built-in shapes: num_train={num_train} num_val={num_val} "
                   f"size_range={tuple(size_range)} seed={seed}")
    if not root.exists():
        write_once(root, lambda folder: _write_builtin(folder, description, (num_train, num_val), size_range, seed))
    _check_builtin(root, description)
    return root


def _write_builtin(folder: Path, description: str, counts, size_range, seed: int) -> None:
    for split_index, (split, count) in enumerate(zip(SPLITS, counts)):
        rng = np.random.default_rng((seed, split_index))
        info = {"description": description, "version": "1.0", "year": 2017, "contributor": "mbbackbones",
                "url": "", "date_created": "2017/09/01"}
        dataset = {"info": info, **_write_split(folder / split, rng, count, size_range, split_index * 10**6 + 1)}
        (folder / "annotations").mkdir(exist_ok=True)
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))


def _check_builtin(root: Path, description: str) -> None:
    annotation_file = root / "annotations" / f"instances_{SPLITS[0]}.json"
    try:
        found = json.loads(annotation_file.read_text())["info"]["description"]
    except (OSError, ValueError, KeyError, TypeError):
        found = None
    if found != description:
        raise DataError(f"{root} exists but is not the built-in dataset for these arguments ({description}); "
                        "delete it or pass another root")


def _write_split(image_dir: Path, rng: np.random.Generator, count: int, size_range, first_id: int) -> dict:
    """Draw ``count`` images into ``image_dir``; return their COCO dictionary (without ``info``)."""
    image_dir.mkdir(parents=True)
    order = rng.permutation(count)
    num_empty, num_crowd = (max(1, round(fraction * count)) for fraction in (EMPTY_FRACTION, CROWD_FRACTION))
    empty, crowd = set(order[:num_empty]), set(order[num_empty:num_empty + num_crowd])
    gray = set(rng.choice(count, size=min(count, max(1, round(GRAY_FRACTION * count))), replace=False))
    images, annotations = [], []
    for index in tqdm(range(count), desc=f"writing the built-in COCO-format {image_dir.name}", unit="image"):
        image_id = first_id + index
        width, height = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        num_objects = 0 if index in empty else int(rng.integers(1, 5))
        image, objects = draw_image(rng, width, height, num_objects, with_crowd=index in crowd)
        file_name = f"{image_id:012d}.jpg"
        (image.convert("L") if index in gray else image).save(image_dir / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1})
        for category_id, polygons, iscrowd in objects:
            annotations.append(_annotation(len(annotations) + first_id, image_id, category_id, polygons, iscrowd,
                                           width, height))
    return {
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat, "name": name, "supercategory": "shape"} for cat, name, _ in SHAPES],
    }


def draw_image(rng: np.random.Generator, width: int, height: int, num_objects: int, with_crowd: bool):
    """An RGB image and its objects ``(category_id, [polygon, ...], iscrowd)``, polygons as (K, 2) arrays."""
    coarse = rng.uniform(70, 180, size=(4, 4, 1)) + rng.uniform(-25, 25, size=(4, 4, 3))  # muted tints
    image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    objects, boxes = [], []
    short_side = min(width, height)
    if with_crowd:
        shape = int(rng.integers(len(SHAPES)))
        side = rng.uniform(0.3, 0.45) * short_side
        x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
        cluster = [_polygon(rng, shape, rng.uniform(0.05, 0.08) * short_side, (x0, y0, x0 + side, y0 + side))
                   for _ in range(int(rng.integers(4, 8)))]
        objects.append((shape, cluster, 1))
        boxes.append(_bounds(np.concatenate(cluster)))
    for _ in range(num_objects):
        shape = int(rng.integers(len(SHAPES)))
        for _attempt in range(10):  # keep objects mostly apart
            size = rng.uniform(*OBJECT_SIZE) * short_side
            polygon = _polygon(rng, shape, size, (0, 0, width, height))
            box = _bounds(polygon)
            if not boxes or box_iou(torch.tensor([box]), torch.tensor(boxes)).max() < 0.3:
                objects.append((shape, [polygon], 0))
                boxes.append(box)
                break
    for shape, polygons, _ in in_drawing_order(objects):
        for polygon in polygons:
            draw.polygon([tuple(point) for point in polygon], fill=_colour(rng, SHAPES[shape][2]))
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 14
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    return image, [(SHAPES[shape][0], polygons, iscrowd) for shape, polygons, iscrowd in objects]


def in_drawing_order(objects: list) -> list:
    """``objects`` (tuples whose second item is a list of polygons) largest box first: smaller shapes are drawn on
    top, so all stay visible."""
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in (_bounds(np.concatenate(o[1])) for o in objects)]
    return [objects[i] for i in np.argsort(np.negative(areas), kind="stable")]


def _polygon(rng: np.random.Generator, shape: int, size: float, region) -> np.ndarray:
    """One shape's outline, rotated and slightly stretched, longest box side ``size``, inside ``region``."""
    angle = rng.uniform(-0.35, 0.35)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = OUTLINES[SHAPES[shape][1]] @ rotation.T * (rng.uniform(0.8, 1.25), 1.0)
    low, high = points.min(axis=0), points.max(axis=0)
    points = (points - low) * (size / (high - low).max())
    extent = points.max(axis=0)
    offset = rng.uniform(region[:2], np.maximum(np.asarray(region[2:]) - extent, region[:2]))
    return points + offset


def _bounds(points: np.ndarray) -> list[float]:
    return [*points.min(axis=0).tolist(), *points.max(axis=0).tolist()]


def _colour(rng: np.random.Generator, hue: float) -> tuple[int, int, int]:
    rgb = colorsys.hsv_to_rgb((hue + rng.uniform(-0.04, 0.04)) % 1.0, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    return tuple(int(255 * channel) for channel in rgb)


def _annotation(annotation_id: int, image_id: int, category_id: int, polygons, iscrowd: int, width: int,
                height: int) -> dict:
    """A COCO annotation: polygon segmentation for objects, compressed RLE for crowd clusters (as in COCO)."""
    x0, y0, x1, y1 = _bounds(np.concatenate(polygons))
    flat = [np.round(polygon, 2).ravel().tolist() for polygon in polygons]
    rle = mask_utils.merge(mask_utils.frPyObjects(flat, height, width))
    segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")} if iscrowd else flat
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id,
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": float(mask_utils.area(rle)), "iscrowd": iscrowd, "segmentation": segmentation}
