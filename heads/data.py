"""Shared by every dataset reader: image decoding with clear errors, per-sample seeds, built-in sets written once."""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .files import write_once

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # what image folders are searched for
_16_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ORIENTATION = 0x0112  # the EXIF tag saying how to turn the stored pixels upright
_TURNS = {  # orientation -> the turn, on H x W x C pixels (Pillow's ImageOps.exif_transpose, in numpy)
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1), 7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1),
}


class DataError(ValueError):
    """A dataset file that is missing, unreadable or malformed; the message names the file."""


def open_image(path: str | Path, kind: str = "image") -> Image.Image:
    """The decoded Pillow image at ``path``; a one-line ``DataError`` naming the file (``kind`` says what it is)
    when it is missing, unreadable, or over Pillow's decompression-bomb limit."""
    try:
        with Image.open(path) as image:
            image.load()
        return image
    except FileNotFoundError:
        raise DataError(f"{kind} not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"{kind} {path}: {error} If the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS "
                        "(None lifts the limit).") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"corrupt or unreadable {kind} {path}: {error}") from None


def read_image(path: str | Path) -> np.ndarray:
    """An H x W x 3 uint8 RGB array, upright: turned as its EXIF orientation says, as image viewers (and torchvision's
    ``decode_jpeg(apply_exif_orientation=True)``) show it. Grayscale, palette, CMYK and alpha images are converted.

    16-bit images keep their high byte (0..65535 scaled to 0..255, as Pillow reduces 16-bit RGB PNGs); 32-bit
    integer and float images have no fixed range and are refused.
    """
    return upright(*read_stored(path))


def read_stored(path: str | Path) -> tuple[np.ndarray, int]:
    """The pixels of the image at ``path`` as stored (see :func:`read_image`), and its EXIF orientation (1: none)."""
    image = open_image(path)
    orientation = image.getexif().get(_ORIENTATION, 1)
    if image.mode in _16_BIT_MODES:
        gray = (np.asarray(image) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), orientation
    if image.mode in ("I", "F") or image.mode.startswith(("I;", "F;")):
        raise DataError(f"{path}: mode {image.mode} (32-bit or signed pixels) has no 8-bit range; save it as an "
                        "8- or 16-bit image")
    return np.asarray(image.convert("RGB")), orientation


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored ``pixels`` turned as the EXIF ``orientation`` says (1 or an unknown value: as they are)."""
    turn = _TURNS.get(orientation)
    return pixels if turn is None else np.ascontiguousarray(turn(pixels))


def sample_seed(*parts: int) -> int:
    """A 32-bit seed that depends only on ``parts`` (run seed, epoch, index): augmentation is then
    the same whichever process, worker or resumed run draws the sample."""
    digest = hashlib.blake2b(np.asarray(parts, dtype=np.int64).tobytes(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def random_state(seed: int | None) -> tuple[np.random.Generator, random.Random]:
    """The numpy and Python generators an augmentation pipeline draws from (albumentations'
    ``set_random_state``), seeded by ``seed`` or, without one, by torch's generator (which DataLoader seeds
    differently in each worker). All ops share them: seeding each op alike would correlate their draws."""
    if seed is None:
        import torch

        seed = int(torch.randint(2**31, ()))
    return np.random.default_rng(seed), random.Random(seed)


def split_item(item) -> tuple[int, int | None]:
    """Dataset keys are an index, or ``(index, seed)`` pairs from ``engine.StepSampler``."""
    if isinstance(item, (tuple, list)):
        index, seed = item
        return int(index), int(seed)
    return int(item), None


def default_data_root() -> Path:
    """Where built-in datasets are written: ``$MBBACKBONES_DATA`` when set, else ``~/.cache/mbbackbones``."""
    return Path(os.environ.get("MBBACKBONES_DATA", "~/.cache/mbbackbones")).expanduser()


def generated_once(root: Path, settings: dict, write: Callable[[Path], None], name: str) -> Path:
    """``root``, a built-in set written on first use by ``write(folder)`` into a temporary folder renamed into place
    (:func:`~heads.files.write_once`), with ``settings`` recorded in ``root/builtin.json``; a ``DataError`` when an
    existing ``root`` was made with other settings (``name``: the set, for the message)."""
    record = root / "builtin.json"
    if not root.exists():
        def write_recorded(folder: Path) -> None:
            write(folder)
            (folder / record.name).write_text(json.dumps(settings))

        write_once(root, write_recorded)
    try:
        found = json.loads(record.read_text())
    except (OSError, ValueError):
        found = None
    if found != settings:
        raise DataError(f"{root} exists but is not the built-in {name} set for these arguments ({settings}); delete it "
                        "or pass another root")
    return root


def unwrap_worker_errors(batches: Iterable) -> Iterator:
    """Iterate ``batches`` (a DataLoader); a ``DataError`` raised in a worker process is re-raised with its own
    one-line message instead of torch's "Caught DataError in DataLoader worker process N. Original Traceback ..."
    text. Other exceptions, and ``DataError`` raised in this process, pass unchanged.

    The replacement is raised without the worker's exception as its context: that one's traceback holds the
    DataLoader's iterator, whose workers must be shut down now, not whenever the error is collected (torch's SIGCHLD
    handler checks on them until then, and crashes the process when a later child process exits)."""
    try:
        yield from batches
        return
    except DataError as error:
        message = str(error)
        name = type(error).__name__
        last_line = f"\n{type(error).__module__}.{type(error).__qualname__}: "  # traceback's final line
        if not message.startswith(f"Caught {name} in DataLoader worker") or last_line not in message:
            raise
        replacement = type(error)(message.rsplit(last_line, 1)[1].rstrip("\n"))
    raise replacement
