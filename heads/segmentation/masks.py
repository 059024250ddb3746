"""Semantic segmentation on your own classes: (image, class-mask) pairs and the names of the classes.

A mask is a single-channel PNG holding one class id per pixel: 0..N-1 for the N named classes, 255 for pixels to
ignore (borders, unlabelled areas). Palette PNGs (Pascal VOC's format) are read as their indices, never as colours.
:meth:`MaskDataset.from_folders` pairs an image folder with a mask folder by file stem::

    images/0001.jpg  masks/0001.png
    images/0002.png  masks/0002.png

Other layouts (Pascal VOC's ``ImageSets`` lists, Cityscapes) are other ways to list the pairs.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import IMAGE_SUFFIXES, DataError, open_image, read_image, split_item

IGNORE_INDEX = 255  # mask value of pixels that are neither scored nor trained on
MAX_CLASSES = IGNORE_INDEX  # ids 0..254


def listed(values) -> str:
    """Up to ten values of a list, for a message: ``[3, 7]``, ``[1, 2, ..., 10] ...``."""
    values = list(values)
    return f"{values[:10]}{' ...' if len(values) > 10 else ''}"


def read_single_channel(path: str | Path, kind: str, holds: str) -> np.ndarray:
    """The H x W integer values of a one-channel image file as stored (palette PNGs: their indices); a one-line
    ``DataError`` for a colour image or a file that cannot be read. ``kind`` names the file, ``holds`` its values."""
    values = np.asarray(open_image(path, kind))
    if values.ndim != 2 or values.dtype.kind not in "uib":
        hint = " (colours: save the ids as a grayscale or palette PNG)" if values.ndim == 3 else ""
        raise DataError(f"{kind} {path} must be a single-channel PNG of {holds}, got shape {values.shape} "
                        f"{values.dtype}{hint}")
    return values


def read_classes(classes: str | os.PathLike | Sequence[str]) -> tuple[str, ...]:
    """Class names in id order, from a list or a UTF-8 text file with one name a line (surrounding spaces and
    trailing empty lines dropped). At least two distinct non-empty names, at most :data:`MAX_CLASSES`."""
    if isinstance(classes, (str, os.PathLike)):
        source = f"classes file {classes}"
        try:
            lines = Path(classes).read_text(encoding="utf-8-sig").splitlines()
        except FileNotFoundError:
            raise DataError(f"classes file not found: {classes} (a text file with one class name a line)") from None
        except (OSError, UnicodeDecodeError) as error:
            reason = "a folder" if Path(classes).is_dir() else getattr(error, "strerror", None) or error
            raise DataError(f"{source} cannot be read as UTF-8 text: {reason}") from None
        while lines and not lines[-1].strip():
            lines.pop()
        names, where, start = [line.strip() for line in lines], "line", 1
    else:
        source, names, where, start = "classes", list(classes), "id", 0
    if not all(isinstance(name, str) for name in names):
        raise DataError(f"{source}: class names must be strings, got {listed(names)}")
    empty = [index for index, name in enumerate(names, start) if not name.strip()]
    if empty:
        raise DataError(f"{source}: {where} {empty[0]} is empty; every class id 0..N-1 needs a name")
    if len(names) < 2:
        raise DataError(f"{source}: {len(names)} class name{'s' if len(names) != 1 else ''}; a segmenter needs at "
                        "least two (e.g. background and your class)")
    if len(names) > MAX_CLASSES:
        raise DataError(f"{source}: {len(names)} class names; masks hold at most {MAX_CLASSES} (ids 0.."
                        f"{MAX_CLASSES - 1}, {IGNORE_INDEX} is ignore)")
    seen: dict[str, int] = {}
    for index, name in enumerate(names, start):
        if name in seen:
            raise DataError(f"{source}: {name!r} is named twice ({where}s {seen[name]} and {index}); class names "
                            "must be distinct")
        seen[name] = index
    return tuple(names)


def _files(folder: Path, key: str, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    """The files of ``folder`` with one of ``suffixes``, by stem (hidden files left out); errors name ``key``."""
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "not found"
        raise DataError(f"{key}: {what} folder {folder} {problem}")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes or path.name.startswith(".") or not path.is_file():
            continue
        if path.stem in files:
            raise DataError(f"{key}: {files[path.stem].name} and {path.name} in {folder} share the stem "
                            f"{path.stem!r}; images and masks pair by stem, so keep one")
        files[path.stem] = path
    if not files:
        raise DataError(f"{key}: no {what}s ({', '.join(suffixes)}) in {folder}")
    return files


def pair_by_stem(image_dir: str | os.PathLike, mask_dir: str | os.PathLike,
                 keys: tuple[str, str] = ("images", "masks")) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of two folders, by file stem (``0001.jpg`` with ``0001.png``), sorted; every image needs a
    mask and every mask an image. ``keys`` name the two folders in error messages (the config keys)."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    if image_dir.resolve() == mask_dir.resolve():
        raise DataError(f"{keys[0]} and {keys[1]} are the same folder {image_dir}; keep the masks in their own")
    images = _files(image_dir, keys[0], IMAGE_SUFFIXES, "image")
    masks = _files(mask_dir, keys[1], (".png",), "PNG mask")
    for stem, image in images.items():
        if stem not in masks:
            raise DataError(f"image {image} has no mask: expected {stem}.png in {mask_dir} ({keys[1]})")
    for stem, mask in masks.items():
        if stem not in images:
            raise DataError(f"mask {mask} has no image: expected {stem} with one of {', '.join(IMAGE_SUFFIXES)} in "
                            f"{image_dir} ({keys[0]})")
    return [(image, masks[stem]) for stem, image in images.items()]


class MaskDataset(Dataset):
    """Images with class masks: items are ``(image, mask)``, a uint8 3 x H x W tensor (the model's ``normalize``
    turns it into its input) and an int64 H x W tensor of class ids (255: ignore).

    Args:
        pairs: (image file, mask file) per sample; a ``None`` mask means unlabelled (all ignore).
        class_names: the names of class ids 0..N-1: a list, or a text file with one name a line
            (:func:`read_classes`).
        transform: ``transform(image, mask, seed=...)`` on the uint8 arrays (training augmentation).
        location: where the samples are, for messages.

    Items are an index or an ``(index, seed)`` pair. A mask value outside 0..N-1 and 255, or a mask whose size
    differs from its image's, stops with one line naming the file.
    """

    ignore_index = IGNORE_INDEX
    categories: tuple[str, ...] = ()  # a category per class, for category IoU; none here

    def __init__(self, pairs: Sequence[tuple[Path, Path | None]], class_names: str | os.PathLike | Sequence[str],
                 transform=None,
                 location: str = ""):
        self.files = [(Path(image), None if mask is None else Path(mask)) for image, mask in pairs]
        self.class_names = read_classes(class_names)
        self.transform = transform
        self.location = location
        self.stems = [image.stem for image, _ in self.files]

    @classmethod
    def from_folders(cls, image_dir: str | os.PathLike, mask_dir: str | os.PathLike,
                     classes: str | os.PathLike | Sequence[str], transform=None,
                     keys: tuple[str, str] = ("images", "masks")) -> MaskDataset:
        """The images of ``image_dir`` with the same-stem PNGs of ``mask_dir`` (:func:`pair_by_stem`), ``classes``
        a list of names or a text file with one name a line."""
        return cls(pair_by_stem(image_dir, mask_dir, keys), classes, transform,
                   location=f"{image_dir} with masks {mask_dir}")

    @classmethod
    def from_voc(cls, root: str | os.PathLike, split: str, transform=None) -> MaskDataset:
        """Pascal VOC's segmentation split: the ids of ``root/ImageSets/Segmentation/<split>.txt``, their
        ``JPEGImages/<id>.jpg`` and ``SegmentationClass/<id>.png`` (palette PNGs, 255 the void borders), and VOC's 21
        classes with the background at 0 (the label space of torchvision's VOC-labelled weights)."""
        from ..voc import SEGMENTATION_CLASSES, split_ids

        root = Path(root).expanduser()
        ids = split_ids(root, "Segmentation", split, {"JPEGImages": ".jpg", "SegmentationClass": ".png"})
        pairs = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
        return cls(pairs, SEGMENTATION_CLASSES, transform, location=f"{root} (ImageSets/Segmentation/{split}.txt)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dataset_ids(self) -> list[int]:
        """The value each class id has in the mask files (for result files): the id itself."""
        return list(range(self.num_classes))

    def __len__(self) -> int:
        return len(self.files)

    def image_paths(self) -> list[Path]:
        """The image file of each sample, in order."""
        return [image for image, _ in self.files]

    def read_mask(self, path: Path) -> np.ndarray:
        """The H x W uint8 class ids of a mask file; a value that is no class id and not 255 is an error."""
        values = read_single_channel(path, "mask", "class ids")
        if values.size and (values.min() < 0 or values.max() >= self.num_classes):
            wrong = (values < 0) | ((values >= self.num_classes) & (values != IGNORE_INDEX))
            if wrong.any():
                raise DataError(f"mask {path} holds values {listed(np.unique(values[wrong]).tolist())} that are no "
                                f"class id: {self.num_classes} classes ({', '.join(self.class_names[:4])}"
                                f"{', ...' if self.num_classes > 4 else ''}) take ids 0..{self.num_classes - 1}, "
                                f"and {IGNORE_INDEX} marks pixels to ignore")
        return values.astype(np.uint8)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw sample: an H x W x 3 uint8 RGB image and its H x W uint8 mask of class ids."""
        image_path, mask_path = self.files[index]
        image = read_image(image_path)
        if mask_path is None:
            return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        mask = self.read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                            f"{image.shape[1]}x{image.shape[0]} (width x height)")
        return image, mask

    def __getitem__(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = split_item(item)
        image, mask = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask, seed=seed)
        image = torch.from_numpy(np.require(image, requirements=("C", "W"))).permute(2, 0, 1)
        return image, torch.from_numpy(mask.astype(np.int64))
