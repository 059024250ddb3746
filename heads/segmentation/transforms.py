"""Segmentation training augmentation on albumentations: random scale, crop, flip and colour jitter."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN

from .cityscapes import IGNORE_INDEX


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
