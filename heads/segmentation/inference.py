"""Segmentation inference (whole image or sliding window, flip and multi-scale) and dataset evaluation."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .evaluate import ConfusionMatrix, SegMetrics, plot_confusion, write_predictions

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
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; choose one of {', '.join(MODES)}")
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


def evaluate(model: nn.Module, dataset, device, limit: int | None = None, output: Path | None = None,
             write: bool = False, workers: int = 0, **inference) -> SegMetrics:
    """Confusion-matrix metrics of ``model`` on ``dataset`` (images decoded by ``workers`` processes); with
    ``output``, the tables and the confusion PNG are written there, and with ``write`` also label-id
    predictions and colourised overlays."""
    model.eval()
    confusion = ConfusionMatrix(class_names=dataset.class_names, ignore_index=dataset.ignore_index, device=device)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(count)), num_workers=workers)
    for index, (image, mask) in enumerate(tqdm(loader, desc="evaluate", leave=False)):
        pred = predict(model, image.to(device), **inference)[0].argmax(0)
        confusion.update(pred, mask[0].to(device))
        if write and output is not None:
            write_predictions(pred.cpu().numpy(), dataset.stems[index], Path(output) / "predictions",
                              image=dataset.load(index)[0])
    metrics = confusion.compute()
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.txt").write_text(metrics.table() + "\n")
        (output / "metrics.json").write_text(metrics.to_json())
        plot_confusion(metrics.confusion, dataset.class_names, output / "confusion.png")
    return metrics
