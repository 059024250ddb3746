"""Pascal VOC detection: the Annotations XML of a split, read into an in-memory COCO index, so that training,
COCO-style evaluation and prediction read VOC as any COCO-format set."""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from pycocotools.coco import COCO
from tqdm import tqdm

from mbbackbones.choices import did_you_mean

from ..data import DataError
from ..voc import CLASSES, split_ids
from .coco import CocoDetection, coco_index

_CORNERS = ("xmin", "ymin", "xmax", "ymax")


class VocDetection(CocoDetection):
    """The images of ``root/ImageSets/Main/<split>.txt``: ``root/JPEGImages/<id>.jpg`` with the boxes of
    ``root/Annotations/<id>.xml`` (``root``: the ``VOC2012`` or ``VOC2007`` folder as distributed).

    Everything else is :class:`CocoDetection`'s: items, transforms, ``skip_corrupt``, ``self.coco``. Labels 1..20
    are VOC's classes in its order (category ids alike; 0 is the background). VOC's 1-based pixel box
    ``xmin..xmax`` covers ``[xmin - 1, xmax)``: targets are ``[xmin - 1, ymin - 1, xmax, ymax]``. Difficult objects
    are crowd regions (``iscrowd=1``): out of the training targets; ignored by the COCO-style and VOC evaluations.
    """

    voc_metric = True

    def __init__(self, root, split: str = "val", transform=None, train: bool = False, skip_corrupt: bool = False):
        self.root = Path(root).expanduser()
        self.image_dir = self.root / "JPEGImages"
        self.annotation_file = self.root / "ImageSets" / "Main" / f"{split}.txt"  # for messages: what was read
        ids = split_ids(self.root, "Main", split, {"JPEGImages": ".jpg", "Annotations": ".xml"})
        self._index(voc_coco(self.root, ids), "contiguous", transform, train, skip_corrupt)

    def _record(self, image_id: int) -> str:
        return str(self.root / "Annotations" / f"{Path(self.coco.imgs[image_id]['file_name']).stem}.xml")


def voc_coco(root: str | os.PathLike, ids: list[str]) -> COCO:
    """A COCO index of the VOC images ``ids`` under ``root``: image ids 1..N in list order, category ids 1..20, boxes
    ``[xmin - 1, ymin - 1, width, height]``, difficult objects as ``iscrowd=1``."""
    root = Path(root)
    images, annotations = [], []
    for image_id, name in enumerate(tqdm(ids, desc="reading VOC annotations", unit="file", leave=False), start=1):
        width, height, objects = read_annotation(root / "Annotations" / f"{name}.xml")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": width, "height": height})
        for category_id, (xmin, ymin, xmax, ymax), difficult in objects:
            box_width, box_height = xmax - xmin + 1, ymax - ymin + 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": [xmin - 1, ymin - 1, box_width, box_height],
                                "area": box_width * box_height, "iscrowd": difficult})
    categories = [{"id": index, "name": name, "supercategory": "voc"} for index, name in enumerate(CLASSES, start=1)]
    return coco_index({"images": images, "annotations": annotations, "categories": categories})


def read_annotation(path: Path) -> tuple[int, int, list[tuple[int, tuple[float, ...], int]]]:
    """``(width, height, objects)`` of a VOC XML file, each object ``(category id, (xmin, ymin, xmax, ymax),
    difficult)`` in 1-based pixels; a one-line ``DataError`` naming the file and the fix when it is malformed."""
    try:
        node = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise DataError(f"{path}: malformed XML ({error}); fix the file or extract it again") from None
    if node.tag != "annotation":
        raise DataError(f"{path}: not a VOC annotation (the root element is <{node.tag}>, not <annotation>)")
    width, height = (_number(node, f"size/{tag}", path, "the image", integer=True) for tag in ("width", "height"))
    objects = []
    for index, obj in enumerate(node.findall("object")):
        where = f"object {index}"
        name = _text(obj, "name", path, where)
        if name not in CLASSES:
            hint = did_you_mean(name, CLASSES)
            raise DataError(f"{path}: {where} is named {name!r}, not one of VOC's 20 classes.{hint} Fix the name "
                            f"(classes: {', '.join(CLASSES)})")
        where = f"{where} ({name})"
        difficult = (obj.findtext("difficult") or "0").strip()  # no <difficult>: not difficult
        if difficult not in ("0", "1"):
            raise DataError(f"{path}: {where} has <difficult> {difficult!r}; it must be 0 or 1")
        box = [_number(obj, f"bndbox/{corner}", path, where) for corner in _CORNERS]
        xmin, ymin, xmax, ymax = box
        if xmax < xmin or ymax < ymin:
            raise DataError(f"{path}: {where} has an empty box ({_show(box)}): xmax must be >= xmin and ymax >= ymin "
                            "(1-based pixels, both ends inside the box); fix the coordinates")
        if xmin < 1 or ymin < 1 or xmax > width or ymax > height:
            raise DataError(f"{path}: {where} has a box ({_show(box)}) outside its {width}x{height} image; VOC boxes "
                            "run from pixel 1 to the width and height: fix the coordinates")
        objects.append((CLASSES.index(name) + 1, tuple(box), int(difficult)))
    return width, height, objects


def _text(node: ET.Element, tag: str, path: Path, where: str) -> str:
    text = node.findtext(tag)
    if text is None or not text.strip():
        raise DataError(f"{path}: {where} has no <{tag.replace('/', '><')}>; a VOC annotation gives it")
    return text.strip()


def _number(node: ET.Element, tag: str, path: Path, where: str, integer: bool = False) -> float:
    text = _text(node, tag, path, where)
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or (integer and value <= 0):
        kind = "a positive integer" if integer else "a number"
        raise DataError(f"{path}: {where} has <{tag.replace('/', '><')}> {text!r}, not {kind}")
    return value


def _show(box) -> str:
    return ", ".join(f"{corner} {value:g}" for corner, value in zip(_CORNERS, box))
