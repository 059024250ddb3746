"""Cityscapes for semantic segmentation: the official label mapping, a reader, training augmentation and a
small generated street-scene set in the exact Cityscapes layout.

Layout read by :class:`Cityscapes` (``split=None`` drops the ``<split>`` level, as in the shipped sample)::

    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
"""
from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as OFFICIAL_LABELS
from cityscapesscripts.helpers.labels import name2label, trainId2label
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from ..data import DataError, default_data_root, read_image, split_item, write_once

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

ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # label id -> train id; void and unknown ids -> 255
for _label in OFFICIAL_LABELS:
    if _label.id >= 0 and _is_train_id(_label.trainId):
        ID_TO_TRAIN_ID[_label.id] = _label.trainId

TRAIN_ID_TO_ID = np.zeros(256, dtype=np.uint8)  # train id -> label id for result files; 255 -> 0 (unlabeled)
TRAIN_ID_TO_ID[:NUM_CLASSES] = [label.id for label in _TRAIN_LABELS]

PALETTE = np.zeros((256, 3), dtype=np.uint8)  # RGB per train id; 255 (ignore) is black
PALETTE[:NUM_CLASSES] = [label.color for label in _TRAIN_LABELS]


def read_label_ids(path: str | Path) -> np.ndarray:
    """An H x W uint8 array of Cityscapes label ids from a single-channel PNG."""
    try:
        with Image.open(path) as image:
            ids = np.asarray(image)
    except FileNotFoundError:
        raise DataError(f"label file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"corrupt or unreadable label file {path}: {error}") from None
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise DataError(f"label file {path} must be a single-channel 8-bit PNG, got shape {ids.shape} {ids.dtype}")
    return ids


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
    ``(image, mask)``: a normalised float32 3 x H x W tensor and an int64 H x W tensor of train ids.
    """

    num_classes = NUM_CLASSES
    ignore_index = IGNORE_INDEX
    class_names = CLASS_NAMES

    def __init__(self, root: str | Path, split: str | None = "train", transform=None,
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.files = _list_pairs(self.root, split)
        self.stems = [image.name[:-len(IMAGE_SUFFIX)] for image, _ in self.files]  # <city>_<seq>_<frame>

    def __len__(self) -> int:
        return len(self.files)

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
        image = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).div_(255)
        return (image - self.mean) / self.std, torch.from_numpy(mask.astype(np.int64))


class SegTrainTransform:
    """Random scale, crop (padded with the mean colour / ignore where the image is smaller), horizontal flip and
    colour jitter, on uint8 arrays. Masks are only ever resampled with nearest neighbour. A call with ``seed``
    gives the same result whatever ran before."""

    def __init__(self, crop_size: tuple[int, int] = (512, 1024), scale_range: tuple[float, float] = (0.5, 2.0),
                 mean=IMAGENET_DEFAULT_MEAN, jitter: float = 0.3, hue: float = 0.05):
        low, high = scale_range
        self.pipeline = A.Compose([
            A.RandomScale(scale_limit=(low - 1, high - 1), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST, p=1.0),
            A.RandomCrop(*crop_size, pad_if_needed=True, border_mode=cv2.BORDER_CONSTANT,
                         fill=tuple(round(255 * m) for m in mean), fill_mask=IGNORE_INDEX),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=hue, p=0.8),
        ], mask_interpolation=cv2.INTER_NEAREST)

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int | None = None):
        if seed is None:  # torch's generator, which DataLoader seeds differently in each worker
            seed = int(torch.randint(2**31, ()))
        self.pipeline.set_random_seed(seed)
        out = self.pipeline(image=image, mask=mask)
        return out["image"], out["mask"]


# Built-in street scenes ------------------------------------------------------------------------------------------

BUILTIN_CITIES = {"train": ("synthberg", "synthstadt"), "val": ("synthfurt",)}
_COLOURS = {  # label name: (base RGB, per-pixel noise sigma)
    "unlabeled": ((105, 95, 80), 20), "road": ((80, 80, 88), 8), "sidewalk": ((175, 150, 160), 10),
    "building": ((125, 110, 95), 10), "vegetation": ((55, 115, 40), 28), "sky": ((140, 185, 235), 5),
    "person": ((200, 45, 70), 12), "car": ((35, 45, 150), 10),
}
_ID = {name: name2label[name].id for name in _COLOURS}


def _ellipse(shape, centre_y, centre_x, radius_y, radius_x) -> np.ndarray:
    y, x = np.ogrid[:shape[0], :shape[1]]
    return ((y - centre_y) / radius_y) ** 2 + ((x - centre_x) / radius_x) ** 2 < 1


class _Canvas:
    """A label-id map and a colour image painted together, far objects first."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng = rng
        self.ids = np.full((height, width), _ID["unlabeled"], dtype=np.uint8)
        self.colour = np.tile(np.array(_COLOURS["unlabeled"][0], dtype=np.float32), (height, width, 1))

    def paint(self, region, name: str, tint: float = 8) -> None:
        """Label ``region`` as ``name``, in its base colour shifted by a random shade (mostly grey)."""
        shade = self.rng.normal(0, tint) + self.rng.normal(0, tint / 3, 3)
        self.ids[region] = _ID[name]
        self.colour[region] = np.array(_COLOURS[name][0]) + shade

    def render(self) -> np.ndarray:
        sigma = np.zeros(256, dtype=np.float32)
        for name, (_, noise) in _COLOURS.items():
            sigma[_ID[name]] = noise
        noise = self.rng.normal(0, 1, self.colour.shape) * sigma[self.ids][..., None]
        return np.clip(self.colour * self.rng.uniform(0.8, 1.2) + noise, 0, 255).astype(np.uint8)


def _street_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its label ids: sky, buildings, trees, road and sidewalks in perspective, cars, people."""
    canvas = _Canvas(rng, height, width)
    horizon = int(height * rng.uniform(0.38, 0.5))
    canvas.paint(np.s_[:horizon], "sky", tint=10)
    canvas.colour[:horizon] *= np.linspace(0.85, 1.1, horizon)[:, None, None]
    left = 0
    while left < width:
        right = min(width, left + int(rng.uniform(0.08, 0.25) * width))
        top = int(rng.uniform(0.05, 0.75) * horizon)
        canvas.paint(np.s_[top:horizon, left:right], "building", tint=25)
        rows, cols = np.ogrid[top:horizon, left:right]
        windows = ((rows - top) % 12 < 5) & ((cols - left) % 10 < 4)
        canvas.colour[top:horizon, left:right][windows] *= 0.55
        left = right + int(rng.uniform(0, 0.05) * width)
    for _ in range(rng.integers(1, 4)):
        canvas.paint(_ellipse(canvas.ids.shape, horizon - height * rng.uniform(0, 0.1), rng.uniform(0, width),
                              height * rng.uniform(0.08, 0.18), width * rng.uniform(0.04, 0.1)), "vegetation")

    rows, cols = np.ogrid[:height, :width]
    depth = np.clip((rows - horizon) / (height - horizon), 0, None)  # 0 at the horizon, 1 at the bottom row
    vanish_x = width * rng.uniform(0.35, 0.65)
    offset = np.abs(cols - vanish_x)
    below = (rows >= horizon) & (offset < depth * width * rng.uniform(0.8, 1.1))
    canvas.paint(below, "sidewalk")
    canvas.paint(below & (offset < depth * width * rng.uniform(0.45, 0.6)), "road")

    objects = [("car", d) for d in rng.uniform(0.15, 0.9, rng.integers(1, 5))]
    objects += [("person", d) for d in rng.uniform(0.15, 0.9, rng.integers(1, 4))]
    for name, d in sorted(objects, key=lambda o: o[1]):
        bottom = horizon + d * (height - horizon)
        side = rng.choice([-1, 1])
        if name == "car":
            radius_x = 0.12 * width * d
            centre_x = vanish_x + side * rng.uniform(0.1, 0.35) * width * d
            canvas.paint(_ellipse(canvas.ids.shape, bottom - 0.4 * radius_x, centre_x, 0.45 * radius_x, radius_x),
                         name, tint=30)
        else:
            radius_y = 0.25 * (height - horizon) * d + 4
            centre_x = vanish_x + side * rng.uniform(0.65, 0.9) * width * d
            body = _ellipse(canvas.ids.shape, bottom - radius_y, centre_x, radius_y, 0.3 * radius_y)
            head = _ellipse(canvas.ids.shape, bottom - 2.1 * radius_y, centre_x, 0.2 * radius_y, 0.2 * radius_y)
            canvas.paint(body | head, name, tint=25)
    return canvas.render(), canvas.ids


def _write_builtin(root: Path, counts: dict[str, int], size: tuple[int, int], seed: int) -> None:
    sample = 0
    for split, count in counts.items():
        cities = BUILTIN_CITIES[split]
        for frame in range(count):
            city = cities[frame % len(cities)]
            stem = f"{city}_000000_{frame:06d}"
            image, ids = _street_scene(np.random.default_rng([seed, sample]), *size)
            sample += 1
            image_dir, label_dir = (root / kind / split / city for kind in ("leftImg8bit", "gtFine"))
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(image_dir / f"{stem}{IMAGE_SUFFIX}")
            Image.fromarray(ids).save(label_dir / f"{stem}{LABEL_SUFFIX}")
            Image.fromarray(ID_TO_TRAIN_ID[ids]).save(label_dir / f"{stem}_gtFine_labelTrainIds.png")
            Image.fromarray(PALETTE[ID_TO_TRAIN_ID[ids]]).save(label_dir / f"{stem}_gtFine_color.png")


def builtin_cityscapes(root: str | Path | None = None, num_train: int = 60, num_val: int = 12,
                       size: tuple[int, int] = (256, 512), seed: int = 0) -> Path:
    """Generate (once) street scenes in the exact Cityscapes layout and naming, and return their root.

    Label files hold real label ids (road 7, sidewalk 8, building 11, vegetation 21, sky 23, person 24, car 26,
    unlabeled 0), plus ``_gtFine_labelTrainIds.png`` and ``_gtFine_color.png``. ``size`` is (height, width). The
    default root is ``$MBBACKBONES_DATA/builtin_cityscapes`` (``~/.cache/mbbackbones`` without the variable).
    Writing goes through a temporary folder renamed into place, so readers never see a partial set.
    """
    root = Path(root).expanduser() if root is not None else default_data_root() / "builtin_cityscapes"
    settings = {"num_train": num_train, "num_val": num_val, "size": list(size), "seed": seed}
    record = root / "builtin.json"
    if not root.exists():
        def write(folder: Path) -> None:
            _write_builtin(folder, {"train": num_train, "val": num_val}, tuple(size), seed)
            (folder / record.name).write_text(json.dumps(settings))

        write_once(root, write)
    try:
        found = json.loads(record.read_text())
    except (OSError, ValueError):
        found = None
    if found != settings:
        raise DataError(f"{root} exists but is not the built-in Cityscapes set for these arguments ({settings}); "
                        "delete it or pass another root")
    return root
