"""Cityscapes for semantic segmentation: the official label mapping and a reader of the official layout.

Layout read by :class:`Cityscapes` (``split=None`` drops the ``<split>`` level, as in the shipped sample)::

    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as OFFICIAL_LABELS
from cityscapesscripts.helpers.labels import trainId2label
from torch.utils.data import Dataset

from ..data import DataError, open_image, read_image, split_item

IGNORE_INDEX = 255
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def _is_train_id(train_id: int) -> bool:
    return 0 <= train_id < IGNORE_INDEX


_TRAIN_IDS = sorted({label.trainId for label in OFFICIAL_LABELS if _is_train_id(label.trainId)})
_TRAIN_LABELS = [trainId2label[train_id] for train_id in _TRAIN_IDS]
NUM_CLASSES = len(_TRAIN_LABELS)
CLASS_NAMES = tuple(label.name for label in _TRAIN_LABELS)
CATEGORIES = tuple(label.category for label in _TRAIN_LABELS)  # category of each train id, for category IoU

MAX_LABEL_ID = max(label.id for label in OFFICIAL_LABELS)  # 33; label files hold ids 0..33
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # label id -> train id; void ids -> 255
for _label in OFFICIAL_LABELS:
    if _label.id >= 0 and _is_train_id(_label.trainId):
        ID_TO_TRAIN_ID[_label.id] = _label.trainId

TRAIN_ID_TO_ID = np.zeros(256, dtype=np.uint8)  # train id -> label id for result files; 255 -> 0 (unlabeled)
TRAIN_ID_TO_ID[:NUM_CLASSES] = [label.id for label in _TRAIN_LABELS]

PALETTE = np.zeros((256, 3), dtype=np.uint8)  # RGB per train id; 255 (ignore) is black
PALETTE[:NUM_CLASSES] = [label.color for label in _TRAIN_LABELS]


def read_label_ids(path: str | Path) -> np.ndarray:
    """An H x W uint8 array of Cityscapes label ids from a single-channel PNG.

    As cityscapesScripts does, the stored values are taken as they are (8 or 16 bits, palette indices included);
    a value outside the label table (ids 0..33) is an error naming the file, not a silently ignored pixel.
    """
    ids = np.asarray(open_image(path, "label file"))
    if ids.ndim != 2 or ids.dtype.kind not in "uib":
        raise DataError(f"label file {path} must be a single-channel PNG of label ids, got shape {ids.shape} "
                        f"{ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_LABEL_ID):
        unknown = np.unique(ids[(ids < 0) | (ids > MAX_LABEL_ID)]).tolist()
        listed = f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        raise DataError(f"label file {path} holds label ids {listed} outside the Cityscapes label table "
                        f"(0..{MAX_LABEL_ID})")
    return ids.astype(np.uint8)


def _list_pairs(root: Path, split: str | None) -> list[tuple[Path, Path | None]]:
    if not root.is_dir():
        raise DataError(f"Cityscapes root not found: {root}")
    level = Path(split or "")
    image_dir = root / "leftImg8bit" / level
    images = sorted(image_dir.rglob("*" + IMAGE_SUFFIX))
    if not images:
        raise DataError(f"no *{IMAGE_SUFFIX} under {image_dir}: expected leftImg8bit/<split>/<city>/<stem>"
                        f"{IMAGE_SUFFIX} and gtFine/<split>/<city>/<stem>{LABEL_SUFFIX} (split=None: no <split>)")
    pairs = []
    for image in images:
        relative = image.relative_to(image_dir)
        label = root / "gtFine" / level / relative.parent / (relative.name[:-len(IMAGE_SUFFIX)] + LABEL_SUFFIX)
        if not label.is_file():
            if split != "test":
                raise DataError(f"label file missing for {image}: expected {label}")
            label = None
        pairs.append((image, label))
    return pairs


class Cityscapes(Dataset):
    """Cityscapes images with 19-class train-id masks (255 = ignore).

    Images are found recursively under ``root/leftImg8bit/<split>`` (``split=None``: under ``root/leftImg8bit``)
    and each label at the same relative place under ``gtFine``. The ``test`` split may lack labels (the official
    ones are all void): its masks are then all 255. Items are an index or an ``(index, seed)`` pair; they are
    ``(image, mask)``: a uint8 3 x H x W tensor (the model's ``normalize`` turns it into its input) and an int64
    H x W tensor of train ids.
    """

    num_classes = NUM_CLASSES
    ignore_index = IGNORE_INDEX
    class_names = CLASS_NAMES

    def __init__(self, root: str | Path, split: str | None = "train", transform=None):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.files = _list_pairs(self.root, split)
        self.stems = [image.name[:-len(IMAGE_SUFFIX)] for image, _ in self.files]  # <city>_<seq>_<frame>

    def __len__(self) -> int:
        return len(self.files)

    def image_paths(self) -> list[Path]:
        """The image file of each sample, in order."""
        return [image for image, _ in self.files]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw sample: an H x W x 3 uint8 RGB image and its H x W uint8 train-id mask."""
        image_path, label_path = self.files[index]
        image = read_image(image_path)
        if label_path is None:
            return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        mask = ID_TO_TRAIN_ID[read_label_ids(label_path)]
        if mask.shape != image.shape[:2]:
            raise DataError(f"label {label_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                            f"{image.shape[1]}x{image.shape[0]} (width x height)")
        return image, mask

    def __getitem__(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = split_item(item)
        image, mask = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask, seed=seed)
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return image, torch.from_numpy(mask.astype(np.int64))
