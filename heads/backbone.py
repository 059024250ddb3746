"""What every task head builds on: a registered mbbackbones model as a ``features_only`` network, and the input
normalisation its weights expect."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import mbbackbones
from mbbackbones.checkpoint import WeightsUnavailable


def create_backbone(name: str, pretrained_backbone: bool | str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """A timm ``features_only`` backbone; ``pretrained_backbone``: ``True`` for its default published (ImageNet)
    weights, or a local file (torchvision, timm or ours)."""
    if pretrained_backbone and pretrained_backbone is not True:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_backbone))
    try:
        return mbbackbones.create_model(name, pretrained=bool(pretrained_backbone), features_only=True, **kwargs)
    except WeightsUnavailable as error:
        raise error.instead("a local file with pretrained_backbone=PATH, or pretrained_backbone=False") from None


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for images in [0, 1] or uint8 images in [0, 255].

    A task model keeps its statistics here (``model.normalize``): the one place they are read from.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.statistics = [float(v) for v in mean], [float(v) for v in std]  # as data, for the model's metadata
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if not images.is_floating_point():
            images = images.float().div_(255)
        return (images - self.mean) / self.std
