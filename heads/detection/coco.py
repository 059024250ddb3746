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

from ..data import DataError, read_image, split_item

_logger = logging.getLogger(__name__)

LABEL_MODES = ("contiguous", "coco91")
REQUIRED_KEYS = ("images", "annotations", "categories")
UNLABELLED_SPLITS = {"test-dev2017": "test2017", "test2017": "test2017"}  # split -> image folder; image_info_*.json
MIN_BOX_SIZE = 1.0  # pixels; training drops boxes this wide or high, or less


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances: ``root/<split>/*.jpg`` with ``root/annotations/instances_<split>.json``; the
    test splits (``test-dev2017``, ``test2017``) read ``test2017/`` and ``image_info_<split>.json``.

    Items are ``(image, target)``: a float32 ``3 x H x W`` tensor in [0, 1] and ``{"boxes": float32 [N, 4]
    xyxy pixels, "labels": int64 [N], "image_id": int}``. Every image of the split is listed, those
    without objects included. ``label_mode="contiguous"`` numbers the categories sorted by id 1..K;
    ``"coco91"`` uses the category id as label (torchvision's 91-class space). Label 0 is background.

    ``transform(image, boxes, labels, seed)`` receives an H x W x 3 uint8 array, float32 boxes and
    int64 labels, and returns the same triple (the image as uint8, or float in [0, 1]). With
    ``train=True`` crowd boxes and boxes at most ``MIN_BOX_SIZE`` wide or high are dropped; evaluation
    reads the ground truth from ``self.coco`` instead. ``skip_corrupt=True`` replaces an unreadable image by
    the next readable one and records its path in ``self.skipped`` (per process: each DataLoader worker
    keeps its own).

    Any COCO-format folder reads the same way: ``image_dir`` and ``annotation_file`` replace the layout's paths
    (``root`` is then not needed).
    """

    def __init__(self, root=None, split="val2017", label_mode="contiguous", transform=None, train=False,
                 skip_corrupt=False, image_dir=None, annotation_file=None):
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if root is None and not (image_dir and annotation_file):
            raise ValueError("CocoDetection needs root, or both image_dir and annotation_file")
        self.root = Path(root).expanduser() if root is not None else None
        unlabelled = split in UNLABELLED_SPLITS
        self.image_dir = Path(image_dir or self.root / UNLABELLED_SPLITS.get(split, split)).expanduser()
        self.annotation_file = Path(annotation_file or self.root / "annotations" /
                                    f"{'image_info' if unlabelled else 'instances'}_{split}.json").expanduser()
        self.coco = load_coco(self.annotation_file, self.image_dir, annotated=not unlabelled)
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

    def __getitem__(self, item):
        index, seed = split_item(item)
        if not -len(self) <= index < len(self):  # IndexError ends ``for sample in dataset``
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.image_dir}")
        for offset in range(len(self)):
            image_id = self.image_ids[(index + offset) % len(self)]
            path = self.image_dir / self.coco.imgs[image_id]["file_name"]
            if str(path) in self.skipped:
                continue
            try:
                image = read_image(path)
            except DataError as error:
                if not self.skip_corrupt:
                    raise
                _logger.warning("skipping %s", error)
                self.skipped.add(str(path))
                continue
            return self._sample(image, image_id, seed)
        raise DataError(f"no readable image left in {self.image_dir}: all {len(self.skipped)} tried are corrupt")

    def _sample(self, image: np.ndarray, image_id: int, seed: int | None):
        boxes, labels = self._annotations(image_id)
        if self.transform is not None:
            image, boxes, labels = self.transform(image, boxes, labels, seed)
        image = torch.from_numpy(np.require(image, requirements=("C", "W"))).permute(2, 0, 1)
        image = image.float().div(255) if image.dtype == torch.uint8 else image.float()
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.as_tensor(labels, dtype=torch.int64), "image_id": image_id}
        return image, target

    def _annotations(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (xyxy, clipped to the image) and labels of one image; training drops crowd and tiny boxes."""
        record = self.coco.imgs[image_id]
        annotations = self.coco.imgToAnns[image_id]
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, record["width"])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, record["height"])
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
        dataset = json.loads(annotation_file.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{annotation_file}: invalid JSON at line {error.lineno} column {error.colno}: "
                        f"{error.msg}") from None
    if not annotated and isinstance(dataset, dict):
        dataset.setdefault("annotations", [])
    _check_instances(dataset, annotation_file)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_instances(dataset, path: Path) -> None:
    """Raise ``DataError`` naming ``path`` unless ``dataset`` has COCO's keys, known categories and xywh boxes."""
    missing = [key for key in REQUIRED_KEYS if not isinstance(dataset, dict) or key not in dataset]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; a COCO instances file has {list(REQUIRED_KEYS)}")
    category_ids = {category["id"] for category in dataset["categories"]}
    for annotation in dataset["annotations"]:
        bbox = annotation.get("bbox")
        if not _is_xywh(bbox):
            raise DataError(f"{path}: annotation {annotation.get('id')} has malformed bbox {bbox!r}, "
                            "expected [x, y, width, height] with width, height >= 0")
        if annotation.get("category_id") not in category_ids:
            raise DataError(f"{path}: annotation {annotation.get('id')} has unknown category_id "
                            f"{annotation.get('category_id')!r}")


def _is_xywh(bbox) -> bool:
    numbers = isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
    return numbers and all(math.isfinite(v) for v in bbox) and bbox[2] >= 0 and bbox[3] >= 0


def collate_detection(batch):
    """``(images, targets)`` lists: detection images differ in size, so they are not stacked."""
    images, targets = zip(*batch)
    return list(images), list(targets)
