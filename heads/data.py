"""What every dataset reader here shares: image decoding with clear errors, per-sample seeds."""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A dataset file that is missing, unreadable or malformed; the message names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """An H x W x 3 uint8 RGB array; grayscale, palette, CMYK and alpha images are converted."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"corrupt or unreadable image {path}: {error}") from None


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
