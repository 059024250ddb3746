"""SSD training augmentation on albumentations, equal to torchvision's detection reference recipe.

torchvision's ``references/detection/presets.py`` (``DetectionPresetTrain``) has two SSD policies, each
followed by ``SanitizeBoundingBoxes`` (boxes under a pixel wide or high are dropped):

- ``"ssd"``: ``RandomPhotometricDistort()``, ``RandomZoomOut(fill=mean)``, ``RandomIoUCrop()``,
  ``RandomHorizontalFlip(0.5)``: ``SSDTrainTransform()`` (the defaults);
- ``"ssdlite"``: ``RandomIoUCrop()``, ``RandomHorizontalFlip(0.5)``:
  ``SSDTrainTransform(zoom_out=False, photometric=False)``.

The ops here draw their parameters as the ``torchvision.transforms.v2`` classes of the same names do (same
probabilities, ranges and order of application) and apply them to uint8 arrays. Deliberate differences:

- the colour kernels are albumentations' (OpenCV's): contrast and saturation round where torchvision's
  truncate and hue converts to HSV its own way, each leaving pixels within 1/255 of torchvision's on uint8
  tensors (brightness is exact);
- the result is resized to ``size`` here (torchvision's model resizes), after the boxes are filtered as
  ``SanitizeBoundingBoxes`` filters them, so resizing drops no box.
"""
from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.augmentations.pixel import functional as pixel
from albumentations.core.bbox_utils import denormalize_bboxes
from torchvision.ops import box_iou

from ..data import random_state

MEAN_FILL = (123, 117, 104)  # presets.py's mean (RGB, uint8): the colour of zoom-out canvases


class RandomPhotometricDistort(A.ImageOnlyTransform):
    """torchvision's ``RandomPhotometricDistort``: brightness, contrast, saturation and hue factors, each drawn
    from its range with probability ``p``; contrast applies before saturation or after hue, one or the other
    with probability 1/2; then, with probability ``p``, the channels are permuted (any permutation, identity
    included). The parameters carry torchvision's names."""

    def __init__(self, brightness: tuple[float, float] = (0.875, 1.125), contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5), hue: tuple[float, float] = (-0.05, 0.05),
                 p: float = 0.5):
        super().__init__(p=1.0)
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.p_each = p

    def get_params(self):
        ranges = {"brightness_factor": self.brightness, "contrast_factor": self.contrast,
                  "saturation_factor": self.saturation, "hue_factor": self.hue}
        params = {name: self.py_random.uniform(*bounds) if self.py_random.random() < self.p_each else None
                  for name, bounds in ranges.items()}
        params["contrast_before"] = self.py_random.random() < 0.5
        shuffle = self.py_random.random() < self.p_each
        params["channel_permutation"] = self.random_generator.permutation(3).tolist() if shuffle else None
        return params

    def apply(self, img, brightness_factor, contrast_factor, saturation_factor, hue_factor, contrast_before,
              channel_permutation, **params):
        steps = [(pixel.adjust_brightness_torchvision, brightness_factor),
                 (pixel.adjust_contrast_torchvision, contrast_factor if contrast_before else None),
                 (pixel.adjust_saturation_torchvision, saturation_factor),
                 (_adjust_hue, hue_factor),
                 (pixel.adjust_contrast_torchvision, None if contrast_before else contrast_factor)]
        for adjust, factor in steps:
            if factor is not None:
                img = adjust(img, factor)
        return img if channel_permutation is None else pixel.channel_shuffle(img, channel_permutation)


def _adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's ``adjust_hue`` of a uint8 image: the shift in float HSV, converted back as torchvision does
    (OpenCV's 8-bit HSV would quantise the hue to 2-degree steps)."""
    shifted = pixel.adjust_hue_torchvision(img.astype(np.float32) / 255, factor)
    return np.clip(shifted * (256 - 1e-3), 0, 255).astype(np.uint8)


class RandomZoomOut(A.Pad):
    """torchvision's ``RandomZoomOut``: with probability ``p``, the image placed at a random spot of a canvas
    ``side_range`` times its size, filled with ``fill``; boxes move with it."""

    def __init__(self, fill=MEAN_FILL, side_range: tuple[float, float] = (1.0, 4.0), p: float = 0.5):
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

    Draws a minimum IoU from ``sampler_options`` (1.0 or more: keep the whole image), then up to ``trials``
    crops of ``min_scale``-``max_scale`` of each side with an aspect ratio between ``min_aspect_ratio`` and
    ``max_aspect_ratio``; the first crop that contains the centre of a box and overlaps one such box with at
    least that IoU is taken, else a new minimum IoU is drawn. Boxes whose centres fall outside the crop are
    dropped, the rest clipped. Images without boxes pass unchanged (torchvision's loop ends there too, when
    it draws the keep option). The parameters record the drawn ``min_iou`` (None: whole image kept).
    """

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, min_aspect_ratio: float = 0.5,
                 max_aspect_ratio: float = 2.0, sampler_options=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
                 trials: int = 40, p: float = 1.0):
        super().__init__(p=p)
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect_ratio, self.max_aspect_ratio = min_aspect_ratio, max_aspect_ratio
        self.options = tuple(sampler_options)
        self.trials = trials

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        boxes = denormalize_bboxes(data["bboxes"], (height, width))[:, :4].astype(np.float32)
        while len(boxes) and (min_iou := self.py_random.choice(self.options)) < 1.0:
            for _ in range(self.trials):
                crop = self._sample_crop(width, height)
                if crop is not None and _overlaps(boxes, crop, min_iou):
                    return {"crop_coords": crop, "min_iou": min_iou}
        return {"crop_coords": (0, 0, width, height), "min_iou": None}

    def _sample_crop(self, width: int, height: int) -> tuple[int, int, int, int] | None:
        crop_width = int(width * self.py_random.uniform(self.min_scale, self.max_scale))
        crop_height = int(height * self.py_random.uniform(self.min_scale, self.max_scale))
        if not crop_width or not crop_height:
            return None
        if not self.min_aspect_ratio <= crop_width / crop_height <= self.max_aspect_ratio:
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

    ``image`` is H x W x 3 uint8 RGB, ``boxes`` float32 [N, 4] xyxy pixels, ``labels`` int64 [N]; the result
    is a ``size`` x ``size`` uint8 image and its boxes. Boxes are clipped to the image, and those under a pixel
    wide or high before resizing are dropped together with their labels. ``seed`` fixes every draw of the
    call, whatever ran before; without one it is drawn from torch's generator. The defaults are torchvision's
    "ssd" policy; ``zoom_out=False, photometric=False`` is its "ssdlite" policy.
    """

    def __init__(self, size: int = 320, zoom_out: bool = True, iou_crop: bool = True, photometric: bool = True,
                 hflip: float = 0.5, fill=MEAN_FILL):
        steps = [RandomPhotometricDistort()] if photometric else []
        steps += [RandomZoomOut(fill=fill)] if zoom_out else []
        steps += [RandomIoUCrop()] if iou_crop else []
        steps += [A.HorizontalFlip(p=hflip)]
        sanitize = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, min_width=1, min_height=1,
                                filter_invalid_bboxes=True)
        self.augment = A.Compose(steps, bbox_params=sanitize)
        self.resize = A.Compose([A.Resize(size, size)],
                                bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]))

    def __call__(self, image: np.ndarray, boxes, labels, seed: int | None = None):
        self.augment.set_random_state(*random_state(seed))
        out = self.resize(**self.augment(image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                                         labels=np.asarray(labels, dtype=np.int64)))
        return out["image"], out["bboxes"].astype(np.float32).reshape(-1, 4), np.asarray(out["labels"], np.int64)
