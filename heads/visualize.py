"""Pictures of predictions: labelled boxes and colourised masks over uint8 RGB images."""
from __future__ import annotations

import colorsys
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

# a scalable font that ships with matplotlib, found without importing it
FONT = Path(importlib.util.find_spec("matplotlib").origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
GOLDEN_RATIO = 0.618033988749895


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright colour per class; hues step by the golden ratio, so neighbouring labels differ most."""
    red, green, blue = colorsys.hsv_to_rgb((label * GOLDEN_RATIO) % 1.0, 0.8, 0.95)
    return round(255 * red), round(255 * green), round(255 * blue)


def class_palette(class_names: Sequence[str]) -> np.ndarray:
    """A 256 x 3 uint8 colour per class id of a segmenter: Cityscapes' own colours for its 19 classes, else Pascal
    VOC's colour map (:func:`heads.voc.palette`; VOC's own colours for its 21 classes)."""
    if len(class_names) == 19:  # read the Cityscapes tables only where they may apply
        from .segmentation.cityscapes import CLASS_NAMES, PALETTE

        if tuple(class_names) == CLASS_NAMES:
            return PALETTE
    from .voc import palette

    return palette()


def text_colour(background: tuple[int, int, int]) -> str:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    red, green, blue = background
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "white"


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
    return image


def draw_detections(image, boxes, labels, scores, class_names: Sequence[str], score_thresh: float = 0.3) -> Image.Image:
    """Boxes (xyxy pixels) scoring at least ``score_thresh``, each captioned '<class name> <score>' on a label
    filled with its class colour. Line width and font size follow the image size."""
    image = _check_image(image)
    scores = torch.as_tensor(scores)
    keep = scores >= score_thresh
    if not keep.any():
        return Image.fromarray(image)
    labels = torch.as_tensor(labels)[keep].tolist()
    colours = [class_colour(label) for label in labels]
    captions = [f"{class_names[label]} {score:.2f}" for label, score in zip(labels, scores[keep].tolist())]
    short_side = min(image.shape[:2])
    drawn = draw_bounding_boxes(torch.tensor(image).permute(2, 0, 1), torch.as_tensor(boxes)[keep], captions,
                                colours, width=max(1, short_side // 160), font=str(FONT),
                                font_size=max(10, short_side // 32), fill_labels=True,
                                label_colors=[text_colour(colour) for colour in colours])
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def overlay_mask(image, train_id_mask, palette, alpha: float = 0.5, ignore_index: int = 255) -> Image.Image:
    """``palette[class_id]`` (:func:`class_palette`) blended over the image with weight ``alpha``; ``ignore_index``
    pixels stay as they are."""
    image = _check_image(image)
    mask = np.asarray(train_id_mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask of shape {mask.shape} does not match the image's {image.shape[:2]}")
    valid = (mask != ignore_index)[..., None]
    colours = np.asarray(palette, dtype=np.float32)[np.where(valid[..., 0], mask, 0)]
    blended = np.where(valid, (1 - alpha) * image + alpha * colours, image)
    return Image.fromarray(blended.round().astype(np.uint8))
