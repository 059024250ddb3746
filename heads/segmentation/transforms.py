"""Segmentation training augmentation on albumentations: random scale, crop, flip and colour jitter."""
from __future__ import annotations

from numbers import Integral

import albumentations as A
import cv2
import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN

from mbbackbones.choices import ArgumentError

from ..data import random_state
from .masks import IGNORE_INDEX


class SegTrainTransform:
    """Random scale, crop (padded with the mean colour / ignore where the image is smaller), horizontal flip and
    colour jitter, on uint8 arrays. Masks are only ever resampled with nearest neighbour. A call with ``seed``
    gives the same result whatever ran before; each op draws independently of the others."""

    def __init__(self, crop_size: tuple[int, int] = (512, 1024), scale_range: tuple[float, float] = (0.5, 2.0),
                 mean=IMAGENET_DEFAULT_MEAN, jitter: float = 0.3, hue: float = 0.05):
        if not (isinstance(crop_size, (tuple, list)) and len(crop_size) == 2
                and all(isinstance(side, Integral) and not isinstance(side, bool) and side > 0 for side in crop_size)):
            raise ArgumentError(f"crop_size={crop_size!r} must be two positive integers (height, width), "
                             "e.g. [512, 1024]")
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
        self.pipeline.set_random_state(*random_state(seed))
        out = self.pipeline(image=image, mask=mask)
        return out["image"], out["mask"]
