"""Segmentation inference: whole image or sliding window, with flip and multi-scale averaging."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbbackbones.choices import check_choice

MODES = ("whole", "slide")


def sliding_window(model: nn.Module, images: Tensor, crop: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Logits from overlapping ``crop`` windows every ``stride`` pixels, averaged where they overlap."""
    _, _, height, width = images.shape
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    tops = list(range(0, max(height - crop_h, 0) + 1, stride[0]))
    lefts = list(range(0, max(width - crop_w, 0) + 1, stride[1]))
    tops += [height - crop_h] if tops[-1] != height - crop_h else []
    lefts += [width - crop_w] if lefts[-1] != width - crop_w else []
    total, count = None, images.new_zeros(1, 1, height, width)
    for top in tops:
        for left in lefts:
            logits = model(images[..., top:top + crop_h, left:left + crop_w])
            if total is None:
                total = images.new_zeros(images.shape[0], logits.shape[1], height, width)
            total[..., top:top + crop_h, left:left + crop_w] += logits
            count[..., top:top + crop_h, left:left + crop_w] += 1
    return total / count


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, mode: str = "whole", crop: Sequence[int] = (512, 1024),
            stride: Sequence[int] | None = None, flip: bool = False, scales: Sequence[float] = (1.0,)) -> Tensor:
    """Class probabilities ``[B, C, H, W]`` averaged over scales and (optionally) horizontal flips."""
    check_choice("mode", mode, MODES)
    stride = stride or [c * 2 // 3 for c in crop]
    height, width = images.shape[-2:]
    total = 0
    for scale in scales:
        scaled = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                         align_corners=False)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            logits = model(x) if mode == "whole" else sliding_window(model, x, crop, stride)
            logits = logits.flip(-1) if flipped else logits
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            total = total + logits.softmax(1)
    return total / (len(scales) * (2 if flip else 1))
