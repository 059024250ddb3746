"""Checkpoint formats: detect torchvision / timm / our own MobileNet state dicts and convert them."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# a key that only one format has -> that format
SIGNATURES = {
    "stem.conv.weight": "mbbackbones",
    "features.0.0.weight": "torchvision",
    "conv_stem.weight": "timm",
}
CLASSIFIER = ("classifier.weight", "classifier.bias")


class CheckpointError(ValueError):
    """A checkpoint that is not a MobileNet state dict, or does not fit the model."""


def detect_format(state_dict: Mapping) -> str:
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError("not a state dict (expected a mapping of parameter names to tensors)")
    for key, name in SIGNATURES.items():
        if key in state_dict:
            return name
    first = next(iter(state_dict), None)
    raise CheckpointError(f"unrecognised state dict (first key {first!r}); expected a torchvision, timm or "
                          f"mbbackbones MobileNet, with one of the keys {', '.join(SIGNATURES)}")


def convert(state_dict: Mapping, model: nn.Module) -> dict:
    """Rename a torchvision or timm MobileNet state dict to this model's keys (a pure function).

    torchvision, timm and this package register their layers in the order the network computes
    them, so the tensors of a checkpoint line up with the model's one by one once the classifier
    (the last two tensors) is set aside; a 1x1 conv head (timm) becomes our Linear. Every pair is
    checked by shape, and the first that does not fit is named.
    """
    source = detect_format(state_dict)
    target = model.state_dict()
    if source == "mbbackbones":
        converted, origin = dict(state_dict), {}
    else:
        items = list(state_dict.items())
        head = dict(items[-2:]) if all(k.startswith("classifier.") for k, _ in items[-2:]) else {}
        body = items[: len(items) - len(head)]
        names = [k for k in target if k not in CLASSIFIER]
        if len(body) != len(names):
            raise CheckpointError(f"{source} checkpoint has {len(body)} tensors before its classifier, the model "
                                  f"has {len(names)}: it is a different architecture")
        converted = {name: value.reshape(target[name].shape) if value.dim() == 4 and target[name].dim() == 2 else value
                     for name, (_, value) in zip(names, body)}
        converted.update(zip(CLASSIFIER, head.values()))
        origin = {name: key for name, (key, _) in zip(names, body)}
    check_shapes(converted, target, origin)
    return converted


def check_shapes(converted: Mapping, target: Mapping, source_names: Mapping) -> None:
    """Raise on the first missing key or shape mismatch (the stem's input channels and the
    classifier are left to timm, which adapts ``in_chans`` and drops a classifier of another size)."""
    for name, expected in target.items():
        if name in CLASSIFIER or name == "stem.conv.weight":
            continue
        if name not in converted:
            raise CheckpointError(f"missing key {name!r}")
        got = converted[name].shape
        if got != expected.shape:
            origin = f" (checkpoint key {source_names[name]!r})" if name in source_names else ""
            raise CheckpointError(f"shape mismatch at {name!r}{origin}: checkpoint {tuple(got)}, "
                                  f"model {tuple(expected.shape)}")
