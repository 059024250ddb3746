"""What every task head builds on: a registered mbbackbones model as a ``features_only`` network, and the input
normalisation its weights expect."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import mbbackbones


def create_backbone(name: str, pretrained_backbone: str | None = None, **kwargs) -> nn.Module:
    """A timm ``features_only`` backbone; ``pretrained_backbone`` is a local file (torchvision, timm or ours)."""
    if pretrained_backbone:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_backbone))
    return mbbackbones.create_model(name, pretrained=bool(pretrained_backbone), features_only=True, **kwargs)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for images in [0, 1] or uint8 images in [0, 255].

    A task model keeps its statistics here (``model.normalize``): the one place they are read from.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if not images.is_floating_point():
            images = images.float().div_(255)
        return (images - self.mean) / self.std
