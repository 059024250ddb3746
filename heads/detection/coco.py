"""COCO detection: a reader for the standard layout, with validation that names the file and record."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO

from mbbackbones.choices import ArgumentError, check_choice

from ..data import DataError, read_stored, split_item, upright

_logger = logging.getLogger(__name__)

LABEL_MODES = ("contiguous", "coco91")
REQUIRED_KEYS = ("images", "annotations", "categories")
UNLABELLED_SPLITS = {"test-dev2017": "test2017", "test2017": "test2017"}  # split -> image folder; image_info_*.json
MIN_BOX_SIZE = 1.0  # pixels; training drops boxes this wide or high, or less
BOX_TOLERANCE = 1.0  # pixels a box may reach past its image before loading warns (with a count) that it is clipped


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances: ``root/<split>/*.jpg`` with ``root/annotations/instances_<split>.json``; the
    test splits (``test-dev2017``, ``test2017``) read ``test2017/`` and ``image_info_<split>.json``.

    Items are ``(image, target)``: a float32 ``3 x H x W`` tensor in [0, 1] and ``{"boxes": float32 [N, 4]
    xyxy pixels, "labels": int64 [N], "image_id": int}``. Every image of the split is listed, those
    without objects included. ``label_mode="contiguous"`` numbers the categories sorted by id 1..K;
    ``"coco91"`` uses the category id as label (torchvision's 91-class space). Label 0 is background.

    ``transform(image, boxes, labels, seed)`` receives an H x W x 3 uint8 array, float32 boxes and int64 labels,
    and returns the same triple (the image as uint8, or float in [0, 1]). Boxes are clipped to the image (loading
    warns, with a count, about boxes reaching more than ``BOX_TOLERANCE`` px past it). With ``train=True`` crowd
    boxes and boxes at most ``MIN_BOX_SIZE`` wide or high are dropped; evaluation reads the ground truth from
    ``self.coco`` instead. An image whose size differs from its record stops the read: checked as each image is
    decoded, which costs nothing, rather than by reading every file's header at load (a pass over 118k files).

    ``skip_corrupt=True`` (training) replaces an unreadable image by the next readable one and records its path in
    ``self.skipped`` (per process: each DataLoader worker keeps its own); :meth:`get` reads one index without
    replacement, as evaluation must.

    Any COCO-format folder reads the same way: ``image_dir`` and ``annotation_file`` replace the layout's paths
    (``root`` is then not needed).
    """

    voc_metric = False  # evaluation adds VOC's mAP@0.5, its difficult boxes being the crowd regions (VocDetection)

    def __init__(self, root=None, split="val2017", label_mode="contiguous", transform=None, train=False,
                 skip_corrupt=False, image_dir=None, annotation_file=None):
        check_choice("label_mode", label_mode, LABEL_MODES)
        if root is None and not (image_dir and annotation_file):
            raise ArgumentError("CocoDetection needs root, or both image_dir and annotation_file")
        self.root = Path(root).expanduser() if root is not None else None
        unlabelled = split in UNLABELLED_SPLITS
        self.image_dir = Path(image_dir or self.root / UNLABELLED_SPLITS.get(split, split)).expanduser()
        self.annotation_file = Path(annotation_file or self.root / "annotations" /
                                    f"{'image_info' if unlabelled else 'instances'}_{split}.json").expanduser()
        self._index(load_coco(self.annotation_file, self.image_dir, annotated=not unlabelled), label_mode, transform,
                    train, skip_corrupt)

    def _index(self, coco: COCO, label_mode: str, transform, train: bool, skip_corrupt: bool) -> None:
        """Take ``coco`` as the dataset's index: its images in id order, its categories as labels."""
        self.coco = coco
        self.transform = transform
        self.train = train
        self.skip_corrupt = skip_corrupt
        self.skipped: set[str] = set()
        self.image_ids = sorted(self.coco.imgs)

        category_ids = sorted(self.coco.cats)
        if label_mode == "contiguous":
            self.label_to_category = {label: cat for label, cat in enumerate(category_ids, start=1)}
        else:
            self.label_to_category = {cat: cat for cat in category_ids}
        self.category_to_label = {cat: label for label, cat in self.label_to_category.items()}
        self.num_classes = max(self.label_to_category, default=0) + 1
        self.class_names = ["__background__"] + ["N/A"] * (self.num_classes - 1)
        for label, cat in self.label_to_category.items():
            self.class_names[label] = self.coco.cats[cat]["name"]

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_paths(self) -> list[Path]:
        """The image file of each sample, in order."""
        return [self.image_dir / self.coco.imgs[image_id]["file_name"] for image_id in self.image_ids]

    def __getitem__(self, item):
        index, seed = split_item(item)
        if not -len(self) <= index < len(self):  # IndexError ends ``for sample in dataset``
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.image_dir}")
        for offset in range(len(self)):
            sample = self.get((index + offset) % len(self), seed)
            if sample is not None:
                return sample
        raise DataError(f"no readable image left in {self.image_dir}: all {len(self.skipped)} tried are corrupt")

    def get(self, index: int, seed: int | None = None):
        """The sample at ``index``, or ``None`` when its image is unreadable and ``skip_corrupt`` is set (the
        image is then logged and added to ``self.skipped``); never another image's sample."""
        image_id = self.image_ids[index]
        record = self.coco.imgs[image_id]
        path = self.image_dir / record["file_name"]
        if str(path) in self.skipped:
            return None
        try:
            stored, orientation = read_stored(path)
        except DataError as error:
            if not self.skip_corrupt:
                raise
            _logger.warning("skipping %s", error)
            self.skipped.add(str(path))
            return None
        return self._sample(self._recorded_frame(stored, orientation, image_id, path), image_id, seed)

    def _recorded_frame(self, stored: np.ndarray, orientation: int, image_id: int, path: Path) -> np.ndarray:
        """The image in the frame its record's size gives: as stored (COCO's own photos were annotated so, EXIF
        orientation or not), or else upright, turned by its EXIF orientation (a photo annotated as viewers show it).
        When the size cannot tell (a 180-degree turn, a mirror, a square photo), as stored. A ``DataError`` when it
        matches neither."""
        record = self.coco.imgs[image_id]
        recorded = (record["width"], record["height"])
        turned = upright(stored, orientation)
        for image in (stored, turned):
            if recorded == (image.shape[1], image.shape[0]):
                return image
        size = f"{stored.shape[1]}x{stored.shape[0]}"
        if turned is not stored:
            size += f" as stored and {turned.shape[1]}x{turned.shape[0]} upright (EXIF orientation {orientation})"
        raise DataError(f"{self._record(image_id)} is recorded as {recorded[0]}x{recorded[1]} but {path} is {size} "
                        "(width x height); fix the record")

    def _record(self, image_id: int) -> str:
        """Where the record of image ``image_id`` is, for messages."""
        return f"{self.annotation_file}: image {image_id}"

    def _sample(self, image: np.ndarray, image_id: int, seed: int | None):
        boxes, labels = self._annotations(image_id, *image.shape[:2])
        if self.transform is not None:
            image, boxes, labels = self.transform(image, boxes, labels, seed)
        image = torch.from_numpy(np.require(image, requirements=("C", "W"))).permute(2, 0, 1)
        image = image.float().div(255) if image.dtype == torch.uint8 else image.float()
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.as_tensor(labels, dtype=torch.int64), "image_id": image_id}
        return image, target

    def _annotations(self, image_id: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (xyxy, clipped to the image) and labels of one image; training drops crowd and tiny boxes."""
        annotations = self.coco.imgToAnns[image_id]
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        labels = np.array([self.category_to_label[a["category_id"]] for a in annotations], dtype=np.int64)
        if self.train:
            crowd = np.array([a.get("iscrowd", 0) for a in annotations], dtype=bool)
            sizes = boxes[:, 2:] - boxes[:, :2]
            keep = ~crowd & (sizes > MIN_BOX_SIZE).all(axis=1)
            boxes, labels = boxes[keep], labels[keep]
        return boxes, labels


def load_coco(annotation_file: Path, image_dir: Path, annotated: bool = True) -> COCO:
    """A pycocotools ``COCO`` index of a validated instances file (or, with ``annotated=False``, an
    ``image_info`` file without annotations), built without its progress prints."""
    layout = "expected <root>/<split>/*.jpg and <root>/annotations/instances_<split>.json"
    for path in dict.fromkeys((image_dir.parent, image_dir, annotation_file)):
        if not path.exists():
            raise DataError(f"COCO path not found: {path} ({layout})")
    try:
        dataset = json.loads(annotation_file.read_bytes())
    except json.JSONDecodeError as error:
        raise DataError(f"{annotation_file}: invalid JSON at line {error.lineno} column {error.colno}: "
                        f"{error.msg}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{annotation_file}: not a JSON text file ({error.reason} at byte {error.start})") from None
    if not annotated and isinstance(dataset, dict):
        dataset.setdefault("annotations", [])
    _check_instances(dataset, annotation_file)
    return coco_index(dataset)


def coco_index(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` index of an instances dictionary, built without its progress prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_xywh(bbox) -> bool:
    return isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox)) and min(bbox[2:]) >= 0


# what the records of each list need besides a unique integer id: key -> (check, what the value must be)
_FIELDS = {
    "images": {"file_name": (lambda v: isinstance(v, str), "string"),
               "width": (lambda v: _is_int(v) and v > 0, "positive integer"),
               "height": (lambda v: _is_int(v) and v > 0, "positive integer")},
    "categories": {"name": (lambda v: isinstance(v, str), "string")},
    "annotations": {"area": (lambda v: _is_number(v) and v >= 0, "non-negative number")},
}


def _check_instances(dataset, path: Path) -> None:
    """Raise a one-line ``DataError`` naming ``path`` and the record unless ``dataset`` is a COCO instances
    dictionary that pycocotools and this reader can use; warn, with a count, about boxes reaching past their image."""
    if not isinstance(dataset, dict):
        raise DataError(f"{path}: expected a JSON object with keys {list(REQUIRED_KEYS)}, got {type(dataset).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in dataset]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; a COCO instances file has {list(REQUIRED_KEYS)}")
    images, annotations, categories = (_records(dataset, key, path) for key in REQUIRED_KEYS)
    outside = []
    for index, annotation in enumerate(annotations.values()):
        where = f"{path}: annotations[{index}] (id {annotation['id']})"
        image = images.get(annotation.get("image_id"))
        if image is None:
            raise DataError(f"{where} refers to image_id {annotation.get('image_id')!r}, which is not in 'images'")
        if annotation.get("category_id") not in categories:
            raise DataError(f"{where} refers to category_id {annotation.get('category_id')!r}, which is not in "
                            "'categories'")
        bbox = annotation.get("bbox")
        if not _is_xywh(bbox):
            raise DataError(f"{where} has malformed bbox {bbox!r}, expected [x, y, width, height] with width, "
                            "height >= 0")
        if annotation.get("iscrowd", 0) not in (0, 1):
            raise DataError(f"{where} has iscrowd {annotation['iscrowd']!r}, expected 0 or 1")
        x, y, w, h = bbox
        if min(x, y) < -BOX_TOLERANCE or x + w > image["width"] + BOX_TOLERANCE or \
                y + h > image["height"] + BOX_TOLERANCE:
            outside.append(f"annotations[{index}] (id {annotation['id']}) {bbox} in a {image['width']}x"
                           f"{image['height']} image")
    if outside:
        _logger.warning("%s: %d annotation box(es) reach more than %g px past their image; they are clipped to it "
                        "(first: %s)", path, len(outside), BOX_TOLERANCE, outside[0])


def _records(dataset: dict, key: str, path: Path) -> dict[int, dict]:
    """``{id: record}`` of the list ``dataset[key]``, each record checked: a JSON object with a unique integer
    ``id`` and the fields in ``_FIELDS[key]``."""
    if not isinstance(dataset[key], list):
        raise DataError(f"{path}: '{key}' must be a list of records, got {type(dataset[key]).__name__}")
    by_id = {}
    for index, record in enumerate(dataset[key]):
        where = f"{path}: {key}[{index}]"
        if not isinstance(record, dict):
            raise DataError(f"{where} must be a JSON object, got {type(record).__name__}")
        record_id = record.get("id")
        if not _is_int(record_id):
            raise DataError(f"{where} has no integer 'id'" + (f" (found {record_id!r})" if "id" in record else ""))
        if record_id in by_id:
            raise DataError(f"{where} repeats id {record_id}")
        for field, (check, kind) in _FIELDS[key].items():
            if not check(record.get(field)):
                found = f" (found {record[field]!r})" if field in record else ""
                raise DataError(f"{where} (id {record_id}) has no {kind} '{field}'{found}")
        by_id[record_id] = record
    return by_id


def collate_detection(batch):
    """``(images, targets)`` lists: detection images differ in size, so they are not stacked."""
    images, targets = zip(*batch)
    return list(images), list(targets)
