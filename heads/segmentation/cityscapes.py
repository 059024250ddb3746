"""Cityscapes for semantic segmentation: the official label mapping and a reader of the official layout.

Layout read by :class:`Cityscapes` (``split=None`` drops the ``<split>`` level, as in the shipped sample)::

    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as OFFICIAL_LABELS
from cityscapesscripts.helpers.labels import trainId2label

from ..data import DataError
from .masks import IGNORE_INDEX, MaskDataset, listed, read_single_channel

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
    ids = read_single_channel(path, "label file", "label ids")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_LABEL_ID):
        unknown = np.unique(ids[(ids < 0) | (ids > MAX_LABEL_ID)]).tolist()
        raise DataError(f"label file {path} holds label ids {listed(unknown)} outside the Cityscapes label table "
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


class Cityscapes(MaskDataset):
    """Cityscapes images with 19-class train-id masks (255 = ignore), as :class:`MaskDataset` items.

    Images are found recursively under ``root/leftImg8bit/<split>`` (``split=None``: under ``root/leftImg8bit``)
    and each label at the same relative place under ``gtFine``. The ``test`` split may lack labels (the official
    ones are all void): its masks are then all 255. Label files hold label ids, mapped to train ids on reading.
    """

    categories = CATEGORIES

    def __init__(self, root: str | Path, split: str | None = "train", transform=None):
        self.root = Path(root)
        self.split = split
        super().__init__(_list_pairs(self.root, split), CLASS_NAMES, transform, location=str(self.root))
        self.stems = [image.name[:-len(IMAGE_SUFFIX)] for image, _ in self.files]  # <city>_<seq>_<frame>

    @property
    def dataset_ids(self) -> list[int]:
        """The Cityscapes label id of each train id (for result files)."""
        return TRAIN_ID_TO_ID[:NUM_CLASSES].tolist()

    def read_mask(self, path: Path) -> np.ndarray:
        return ID_TO_TRAIN_ID[read_label_ids(path)]
