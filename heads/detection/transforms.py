"""SSD training augmentation on albumentations, after torchvision's detection reference recipe.

torchvision's ``references/detection/presets.py`` has two policies; ``SSDTrainTransform`` flags map onto them:

- ``"ssd"``: photometric distort, zoom-out, IoU crop, flip: ``SSDTrainTransform()`` (the defaults).
- ``"ssdlite"``: IoU crop and flip only: ``SSDTrainTransform(zoom_out=False, photometric=False)``.
"""
from __future__ import annotations

import random

import albumentations as A
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.core.bbox_utils import denormalize_bboxes
from torchvision.ops import box_iou

MEAN_FILL = (124, 116, 104)  # ImageNet mean in uint8, the colour of zoom-out canvases
NO_JITTER = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0), "hue": (0.0, 0.0)}
PHOTOMETRIC_RANGES = {"brightness": (0.875, 1.125), "contrast": (0.5, 1.5), "saturation": (0.5, 1.5),
                      "hue": (-0.05, 0.05)}  # torchvision RandomPhotometricDistort


def photometric_distort(p: float = 0.5, channel_shuffle: float = 0.05) -> list[A.BasicTransform]:
    """torchvision's ``RandomPhotometricDistort``: brightness, contrast, saturation and hue, each applied with
    probability ``p`` in that order (torchvision puts contrast last half of the time); channels are shuffled
    with probability ``channel_shuffle`` (torchvision: ``p``, which destroys the colour cues of small datasets)."""
    jitters = [A.ColorJitter(**{**NO_JITTER, name: value}, p=p) for name, value in PHOTOMETRIC_RANGES.items()]
    return [*jitters, A.ChannelShuffle(p=channel_shuffle)]


class RandomZoomOut(A.Pad):
    """torchvision's ``RandomZoomOut``: the image placed at a random spot of a canvas ``side_range`` times its
    size, filled with ``fill``; boxes move with it."""

    def __init__(self, side_range: tuple[float, float] = (1.0, 4.0), fill=MEAN_FILL, p: float = 0.5):
        super().__init__(fill=fill, p=p)
        self.side_range = side_range

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(*self.side_range)
        pad_x, pad_y = int(width * ratio) - width, int(height * ratio) - height
        left, top = int(pad_x * self.py_random.random()), int(pad_y * self.py_random.random())
        return {"pad_left": left, "pad_right": pad_x - left, "pad_top": top, "pad_bottom": pad_y - top}


class RandomIoUCrop(BaseCrop):
    """torchvision's ``RandomIoUCrop`` (the SSD paper's sampler).

    Draws a minimum IoU from ``MIN_IOUS`` (``None``: keep the whole image), then up to ``trials`` crops of
    ``min_scale``-``max_scale`` of each side with an aspect ratio in ``aspect_range``; the first crop that
    contains the centre of a box and overlaps one such box with at least that IoU is taken. Boxes whose
    centres fall outside the crop are dropped, the rest clipped. Images without boxes pass unchanged.
    """

    MIN_IOUS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, None)
    MAX_DRAWS = 50  # torchvision redraws the minimum IoU forever; bounded here

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, aspect_range: tuple[float, float] = (0.5, 2.0),
                 trials: int = 40, p: float = 1.0):
        super().__init__(p=p)
        self.min_scale, self.max_scale = min_scale, max_scale
        self.aspect_range = aspect_range
        self.trials = trials

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        boxes = denormalize_bboxes(data["bboxes"], (height, width))[:, :4].astype(np.float32)
        for _ in range(self.MAX_DRAWS if len(boxes) else 0):
            min_iou = self.py_random.choice(self.MIN_IOUS)
            if min_iou is None:
                break
            for _ in range(self.trials):
                crop = self._sample_crop(width, height)
                if crop is not None and _overlaps(boxes, crop, min_iou):
                    return {"crop_coords": crop}
        return {"crop_coords": (0, 0, width, height)}

    def _sample_crop(self, width: int, height: int) -> tuple[int, int, int, int] | None:
        crop_width = int(width * self.py_random.uniform(self.min_scale, self.max_scale))
        crop_height = int(height * self.py_random.uniform(self.min_scale, self.max_scale))
        low, high = self.aspect_range
        if not crop_width or not crop_height or not low <= crop_width / crop_height <= high:
            return None
        left = int((width - crop_width) * self.py_random.random())
        top = int((height - crop_height) * self.py_random.random())
        return left, top, left + crop_width, top + crop_height

    def apply_to_bboxes(self, bboxes, crop_coords, **params):
        keep = _centres_inside(denormalize_bboxes(bboxes, params["shape"][:2]), crop_coords)
        return super().apply_to_bboxes(bboxes[keep], crop_coords, **params)


def _centres_inside(boxes: np.ndarray, crop) -> np.ndarray:
    """Which xyxy ``boxes`` have their centre strictly inside the xyxy ``crop``."""
    centres = (boxes[:, :2] + boxes[:, 2:4]) / 2
    return (centres > np.asarray(crop[:2])).all(axis=1) & (centres < np.asarray(crop[2:])).all(axis=1)


def _overlaps(boxes: np.ndarray, crop, min_iou: float) -> bool:
    """Whether ``crop`` contains the centre of a box and overlaps one of those boxes with IoU >= ``min_iou``."""
    inside = _centres_inside(boxes, crop)
    crop = torch.tensor([crop], dtype=torch.float32)
    return bool(inside.any()) and box_iou(torch.from_numpy(boxes[inside]), crop).max().item() >= min_iou


class SSDTrainTransform:
    """SSD augmentation: ``(image, boxes, labels, seed) -> (image, boxes, labels)``.

    ``image`` is H x W x 3 uint8, ``boxes`` float32 [N, 4] xyxy pixels, ``labels`` int64 [N]; the result is a
    ``size`` x ``size`` uint8 image with boxes clipped to it (boxes under a pixel wide are dropped together with
    their labels). ``seed`` fixes every draw of the call, whatever ran before; without one it is drawn from
    torch's generator. The defaults are torchvision's "ssd" policy; ``zoom_out=False, photometric=False`` is
    its "ssdlite" policy.
    """

    def __init__(self, size: int = 320, zoom_out: bool = True, iou_crop: bool = True, photometric: bool = True,
                 hflip: float = 0.5, fill=MEAN_FILL):
        steps = photometric_distort() if photometric else []
        steps += [RandomZoomOut(fill=fill)] if zoom_out else []
        steps += [RandomIoUCrop()] if iou_crop else []
        steps += [A.HorizontalFlip(p=hflip), A.Resize(size, size)]
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, min_width=1,
                                   min_height=1, filter_invalid_bboxes=True)
        self.pipeline = A.Compose(steps, bbox_params=bbox_params)

    def __call__(self, image: np.ndarray, boxes, labels, seed: int | None = None):
        if seed is None:  # torch's generator, which DataLoader seeds differently in each worker
            seed = int(torch.randint(2**31, ()))
        # one generator shared by all steps: seeding each step alike (Compose(seed=...)) would correlate them
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.pipeline(image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                            labels=np.asarray(labels, dtype=np.int64))
        return out["image"], out["bboxes"].astype(np.float32).reshape(-1, 4), np.asarray(out["labels"], np.int64)
