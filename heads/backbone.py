"""Backbones for task heads: any registered mbbackbones model as a ``features_only`` network."""
from __future__ import annotations

from torch import nn

import mbbackbones


def create_backbone(name: str, pretrained_backbone: str | None = None, **kwargs) -> nn.Module:
    """A timm ``features_only`` backbone; ``pretrained_backbone`` is a local file (torchvision, timm or ours)."""
    if pretrained_backbone:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_backbone))
    return mbbackbones.create_model(name, pretrained=bool(pretrained_backbone), features_only=True, **kwargs)


def normal_init(module: nn.Module, std: float = 0.03) -> None:
    """torchvision's SSDLite initialisation of conv layers (normal weights, zero bias)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
