"""What every task head builds on: a ``features_only`` backbone (a registered mbbackbones model, or a module with
timm's features_only contract), and the input normalisation its weights expect."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import mbbackbones
from mbbackbones.checkpoint import WeightsUnavailable
from mbbackbones.choices import ArgumentError, did_you_mean

TIMM_PREFIX = "timm/"  # a timm model name behind it: any features_only-capable timm model, as smp's "tu-"
OURS_ONLY = ("norm_eps", "norm_momentum")  # our backbones' BatchNorm settings; timm's models keep their own


def create_backbone(name: str, pretrained_backbone: bool | str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """A ``features_only`` backbone: a registered mbbackbones name, or ``"timm/<any timm model>"``;
    ``pretrained_backbone``: ``True`` for its default published (ImageNet) weights, or a local file.

    The module's ``feature_location`` says where its taps are. A timm model without the asked location (ours are
    'expansion' and 'downsample') gives its block taps instead, with a warning naming them.
    """
    if pretrained_backbone and pretrained_backbone is not True:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_backbone))
    location = kwargs.get("feature_location", "block")
    try:
        if not name.startswith(TIMM_PREFIX):
            backbone = mbbackbones.create_model(name, pretrained=bool(pretrained_backbone), features_only=True,
                                                **kwargs)
        else:
            backbone = _timm_backbone(name, bool(pretrained_backbone), kwargs)
            location = getattr(backbone, "feature_location", location)
    except WeightsUnavailable as error:
        raise error.instead("a local file with pretrained_backbone=PATH, or pretrained_backbone=False") from None
    backbone.feature_location = location
    return backbone


def _timm_backbone(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    model, options = name[len(TIMM_PREFIX):], {k: v for k, v in kwargs.items() if k not in OURS_ONLY}
    if not timm.is_model(model):
        raise ArgumentError(f"{name}: timm has no model {model!r}.{did_you_mean(model, timm.list_models())}")
    try:
        return timm.create_model(model, pretrained=pretrained, features_only=True, **options)
    except (KeyError, ValueError, AssertionError) as error:  # timm: no such feature location for this model
        location = options.pop("feature_location", "block")
        if location == "block":
            raise
        backbone = timm.create_model(model, pretrained=pretrained, features_only=True, **options)
        warnings.warn(f"{name} has no {location!r} feature taps in timm ({type(error).__name__}: {error}); the head "
                      f"reads its block taps instead: {backbone.feature_info.channels()} channels at strides "
                      f"{backbone.feature_info.reduction()}", stacklevel=4)
        backbone.feature_location = "block"
        return backbone


def plug_backbone(backbone: str | nn.Module, args: dict, given: dict) -> nn.Module:
    """A named backbone built with ``args`` (the head's taps and norms, and the caller's ``given`` options), or a
    module as it is (``given`` options are then a mistake: they would have no effect)."""
    if isinstance(backbone, str):
        return create_backbone(backbone, **args)
    if given:
        raise ArgumentError(f"{', '.join(given)}: options of a named backbone; a backbone module is used as it is")
    if not hasattr(backbone, "feature_info"):
        raise ArgumentError(f"backbone {type(backbone).__name__} has no feature_info: pass a registered name or a "
                            "module with timm's features_only contract (feature_info.channels(), .reduction())")
    return backbone


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
