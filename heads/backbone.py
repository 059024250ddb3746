"""What every task head builds on: a ``features_only`` backbone (a registered mbbackbones model, or a module with
timm's features_only contract), and the input normalisation its weights expect."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

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
    except (KeyError, ValueError, AssertionError, TypeError) as error:  # timm: no such feature location (or none)
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


class Stage(NamedTuple):
    reduction: int  # output stride of its first layer
    layers: list[str]  # the names of its layers in the backbone


def backbone_stages(backbone: nn.Module) -> list[Stage]:
    """The backbone's stages as ``trainable_backbone_layers`` counts them, first to last: torchvision's SSDLite
    convention, where a stage begins at the stem and at every layer that lowers the resolution, and the last layer
    (C5's) is a stage of its own. MobileNetV3-Large has 6."""
    layers = _layer_reductions(backbone)
    stages: list[Stage] = []
    for i, (name, reduction) in enumerate(layers):
        if not stages or reduction > layers[i - 1][1] or i == len(layers) - 1:
            stages.append(Stage(reduction, []))
        stages[-1].layers.append(name)
    return stages


def _layer_reductions(backbone: nn.Module) -> list[tuple[str, int]]:
    """The backbone's layers that hold weights, in forward order, with their output strides: as an mbbackbones model
    declares them, else (a timm model) read from ``feature_info``, each layer at the stride of the next tap at or
    after it (for a dilated timm backbone: the dilated strides, so its last stages count as one)."""
    inner = getattr(backbone, "model", backbone)
    if hasattr(inner, "layer_reductions"):
        prefix = "model." if inner is not backbone else ""
        return [(prefix + name, reduction) for name, reduction in inner.layer_reductions()]
    info = getattr(getattr(backbone, "feature_info", None), "info", None)
    if info is None:
        raise ArgumentError(f"backbone {type(backbone).__name__}: its feature_info names no modules, so its stages "
                            "cannot be counted; freeze its parameters yourself (requires_grad_(False))")
    layers = []  # direct children, the items of a Sequential or ModuleList one level down
    for name, child in backbone.named_children():
        items = child.named_children() if isinstance(child, (nn.Sequential, nn.ModuleList)) else [("", child)]
        layers += [(f"{name}.{item}" if item else name, module) for item, module in items]
    layers = [(name, module) for name, module in layers if list(module.parameters())]
    reductions: list[int | None] = [None] * len(layers)
    for tap in info:
        inside = [i for i, (name, _) in enumerate(layers) if f"{tap['module']}.".startswith(f"{name}.")
                  or name.startswith(f"{tap['module']}.")]
        if not inside:
            raise ArgumentError(f"backbone {type(backbone).__name__}: its feature tap {tap['module']!r} is none of its "
                                "layers, so its stages cannot be counted")
        reductions[inside[-1]] = tap["reduction"]
    for i in reversed(range(len(layers))):  # untapped layers: the stride of the next tap
        if reductions[i] is None:
            reductions[i] = reductions[i + 1] if i + 1 < len(layers) else max(tap["reduction"] for tap in info)
    return [(name, reduction) for (name, _), reduction in zip(layers, reductions)]


def freeze_stages(backbone: nn.Module, trainable_layers: int | None, name: str) -> int:
    """Freeze (``requires_grad`` off) all but the last ``trainable_layers`` stages of :func:`backbone_stages`
    (None: all train); the number of frozen stages. A task model keeps the BatchNorm of frozen layers in eval mode
    (:meth:`heads.task_model.TaskModel.train`)."""
    if trainable_layers is None:
        return 0
    stages = backbone_stages(backbone)
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not (
            0 <= trainable_layers <= len(stages)):
        strides = ", ".join(str(stage.reduction) for stage in reversed(stages))
        raise ArgumentError(f"trainable_backbone_layers={trainable_layers!r}: backbone {name} has {len(stages)} stages "
                            f"(from the top, at output strides {strides}), so it takes 0.."
                            f"{len(stages)} (0: all frozen; None: all train)")
    frozen = len(stages) - trainable_layers
    for stage in stages[:frozen]:
        for layer in stage.layers:
            backbone.get_submodule(layer).requires_grad_(False)
    return frozen


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
