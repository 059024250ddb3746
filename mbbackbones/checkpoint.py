"""Checkpoint formats: detect torchvision / timm / our own MobileNet state dicts and convert them."""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from timm.models import clean_state_dict
from torch import nn

# a key that only one format has -> that format
SIGNATURES = {
    "stem.conv.weight": "mbbackbones",
    "features.0.0.weight": "torchvision",
    "conv_stem.weight": "timm",
}
# timm block layers (a layer's name, or its first part) -> ours; layers not named keep their names
TIMM_INVERTED = {"conv_pw": "expand.conv", "bn1": "expand.bn", "conv_dw": "depthwise.conv", "bn2": "depthwise.bn",
                 "se.conv_reduce": "se.fc1", "se.conv_expand": "se.fc2", "conv_pwl": "project.conv",
                 "bn3": "project.bn"}
TIMM_SEPARABLE = {"conv_dw": "depthwise.conv", "bn1": "depthwise.bn", "se.conv_reduce": "se.fc1",
                  "se.conv_expand": "se.fc2", "conv_pw": "project.conv", "bn2": "project.bn"}
# each timm block type, told apart by a layer that only it has (the first match counts), and its table
TIMM_BLOCKS = (
    ("pw_exp", {"dw_start": "expand.start", "pw_exp": "expand", "dw_mid": "depthwise", "pw_proj": "project"}),  # UIB
    ("conv_exp", {"conv_exp": "fused.conv", "bn1": "fused.bn", "conv_pwl": "project.conv", "bn2": "project.bn"}),
    ("attn", {}),  # Mobile MQA: norm, attn.*, layer_scale as ours
    ("conv_pwl", TIMM_INVERTED),
    ("conv", {"conv": "conv.conv", "bn1": "conv.bn"}),  # ConvBnAct
    ("conv_dw", TIMM_SEPARABLE),
)
TIMM_TOP = {"conv_stem": "stem.conv", "bn1": "stem.bn", "norm_head": "head_norm", "classifier": "classifier"}
# torchvision: the conv+BN units of a block, by how many it has
TORCHVISION_UNITS = {2: ("depthwise", "project"), 3: ("expand", "depthwise", "project")}
CLASSIFIER = ("classifier.weight", "classifier.bias")


class CheckpointError(ValueError):
    """A checkpoint that is not a MobileNet state dict, or does not fit the model."""


class WeightsUnavailable(RuntimeError):
    """Published weights that are not there: none published, or neither cached nor downloadable (offline).

    ``template`` says so and ends with ``{alternative}``: how to pass a local file instead, which depends on the
    caller (``pretrained_cfg_overlay=dict(file=PATH)`` for timm, ``pretrained_backbone=PATH`` for heads).
    """

    def __init__(self, template: str, alternative: str):
        self.template = template
        super().__init__(template.format(alternative=alternative))

    @classmethod
    def offline(cls, owner: str, file: str, folder: str, reason: str, alternative: str) -> WeightsUnavailable:
        return cls(f"{owner}: weights {file} are not in {folder} and could not be downloaded ({reason}); put the "
                   "file there, or pass {alternative}", alternative)

    def instead(self, alternative: str) -> WeightsUnavailable:
        """The same error, suggesting another way to pass a local file."""
        return WeightsUnavailable(self.template, alternative)


def load_file(path: str | os.PathLike) -> dict:
    """The one guarded reader of checkpoint files: a .safetensors file, or a torch file with ``weights_only=True``.

    Whatever is wrong with the file (missing, empty, truncated, not a checkpoint, holding pickled code) becomes one
    ``CheckpointError`` line that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" if not path.exists() else
                              f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy? Fetch it again")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path)
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else may be a legacy file...
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # ...or not a checkpoint at all, and the legacy unpickler fails in many ways on those
                raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint (neither a complete zip "
                                      "archive nor a legacy torch file); fetch it again") from None
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error).lower():
            raise CheckpointError(f"{path} holds pickled Python objects besides tensors: refused (weights_only=True); "
                                  "load it with code you trust and save its state_dict") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (unpickling failed)") from None
    except (RuntimeError, EOFError, safetensors.SafetensorError) as error:
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
        raise CheckpointError(f"{path} is truncated or not a {kind} checkpoint "
                              f"({str(error).strip().splitlines()[0][:80]}); fetch it again") from None


def weights_of(checkpoint: dict) -> dict:
    """The weights in a checkpoint as a state dict: a training checkpoint's EMA weights when it has them, else its
    model (the keys timm's ``load_state_dict`` looks for), with DDP / compile prefixes removed."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    return clean_state_dict(checkpoint)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The weights of a checkpoint file (:func:`load_file`, then :func:`weights_of`)."""
    return weights_of(load_file(path))


def detect_format(state_dict: Mapping) -> str:
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError("not a state dict (expected a mapping of parameter names to tensors)")
    for key, name in SIGNATURES.items():
        if key in state_dict:
            return name
    first = next(iter(state_dict), None)
    raise CheckpointError(f"unrecognised state dict (first key {first!r}); expected a torchvision, timm or "
                          f"mbbackbones MobileNet, with one of the keys {', '.join(SIGNATURES)}")


def _number(prefixes) -> dict[str, int]:
    """Consecutive indices for block prefixes such as 'blocks.2.1', in numeric order."""
    ordered = sorted(prefixes, key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
    return {prefix: index for index, prefix in enumerate(ordered)}


def _timm_layer(layer: str, names: set[str]) -> str:
    """A timm block layer's name here; ``names``: all the layers of its block, which tell the block type."""
    parts = {name.split(".")[0] for name in names}
    table = next((table for signature, table in TIMM_BLOCKS if signature in parts), TIMM_SEPARABLE)
    head, dot, rest = layer.partition(".")
    return table.get(layer) or (table[head] + dot + rest if head in table else layer)


def timm_names(keys) -> dict[str, str]:
    """timm ``EfficientNet`` / ``MobileNetV3`` (V3, V4) keys -> ours."""
    keys = list(keys)
    layers = defaultdict(set)
    for key in keys:
        if m := re.match(r"(blocks\.\d+\.\d+)\.(.+)\.\w+$", key):
            layers[m[1]].add(m[2])
    order = _number(layers)
    last = max(order, key=order.get, default=None)
    last_conv = {last} if layers.get(last) == {"conv", "bn1"} else set()  # the final 1x1 'cn' stage (V3, V4)
    index = _number(set(layers) - last_conv)
    top = dict(TIMM_TOP, conv_head="last_conv.conv" if "bn2.weight" in keys else "head_fc", bn2="last_conv.bn")
    names = {}
    for key in keys:
        m = re.match(r"(blocks\.\d+\.\d+)\.(.+)\.(\w+)$", key) or re.match(r"()(.+)\.(\w+)$", key)
        prefix, layer, param = m.groups()
        if prefix in last_conv:
            new = {"conv": "last_conv.conv", "bn1": "last_conv.bn"}.get(layer)
        elif prefix:
            new = f"blocks.{index[prefix]}.{_timm_layer(layer, layers[prefix])}"
        else:
            new = top.get(layer)
        names[key] = f"{new}.{param}" if new else key
    return names


def torchvision_names(keys) -> dict[str, str]:
    """torchvision ``MobileNetV3`` / ``MobileNetV2`` keys -> ours."""
    keys = list(keys)
    parts = defaultdict(lambda: defaultdict(set))  # block prefix -> sub-layer index -> first key parts
    for key in keys:
        if m := re.match(r"(features\.\d+)\.(?:block|conv)\.(\d+)\.(\w+)", key):
            parts[m[1]][int(m[2])].add(m[3])
    kinds = {"0": "cna", "fc1": "se", "running_mean": "bn"}  # conv+BN unit, squeeze-excite, bare BN; else conv
    layers = {prefix: {sub: next((kinds[p] for p in kinds if p in names), "conv") for sub, names in subs.items()}
              for prefix, subs in parts.items()}
    index = _number(layers)
    stages = [int(k.split(".")[1]) for k in keys if re.match(r"features\.\d+\.0\.weight$", k)]
    last = max(stages) if len(stages) > 1 else None
    classifier = {"0": "head_fc", "3": "classifier"} if "classifier.3.weight" in keys else {"1": "classifier"}
    units = {}  # (block prefix, sub-layer) -> our layer name
    for prefix, subs in layers.items():
        convs = [s for s in sorted(subs) if subs[s] in ("cna", "conv")]
        for sub, role in zip(convs, TORCHVISION_UNITS.get(len(convs), ())):
            units[prefix, sub] = f"blocks.{index[prefix]}.{role}"
    names = {}
    for key in keys:
        new = key
        if m := re.match(r"features\.0\.([01])\.(\w+)$", key):
            new = f"stem.{'conv' if m[1] == '0' else 'bn'}.{m[2]}"
        elif last is not None and (m := re.match(rf"features\.{last}\.([01])\.(\w+)$", key)):
            new = f"last_conv.{'conv' if m[1] == '0' else 'bn'}.{m[2]}"
        elif m := re.match(r"(features\.\d+)\.(?:block|conv)\.(\d+)\.(.+)$", key):
            prefix, sub, rest = m[1], int(m[2]), m[3]
            if layers[prefix][sub] == "se":
                new = f"blocks.{index[prefix]}.se.{rest}"
            elif layers[prefix][sub] == "bn":  # V2's projection: a bare conv followed by its BN
                new = f"{units.get((prefix, sub - 1), key)}.bn.{rest}"
            elif layers[prefix][sub] == "conv":
                new = f"{units.get((prefix, sub), key)}.conv.{rest}"
            elif (prefix, sub) in units:
                part, param = rest.split(".")
                new = f"{units[prefix, sub]}.{'conv' if part == '0' else 'bn'}.{param}"
        elif m := re.match(r"classifier\.(\d+)\.(\w+)$", key):
            new = f"{classifier.get(m[1], 'classifier.' + m[1])}.{m[2]}"
        names[key] = new
    return names


RENAMERS = {"mbbackbones": lambda keys: {k: k for k in keys}, "torchvision": torchvision_names, "timm": timm_names}


def convert(state_dict: Mapping, model: nn.Module) -> dict:
    """Rename a torchvision, timm or own MobileNet state dict to this model's keys (a pure function).

    A 1x1-conv head (timm's ``conv_head``) becomes our Linear. The result is checked against the
    model: the first missing, unexpected or mis-shaped key is named.
    """
    source = detect_format(state_dict)
    names = RENAMERS[source](state_dict.keys())
    target = model.state_dict()
    converted = {}
    for key, value in state_dict.items():
        name = names[key]
        if name in target and value.dim() == 4 and target[name].dim() == 2:
            value = value.flatten(1)
        converted[name] = value
    origin = {new: old for old, new in names.items() if old != new}
    check(converted, target, origin, source)
    return converted


def check(converted: Mapping, target: Mapping, origin: Mapping, source: str) -> None:
    """Raise on the first missing, unexpected or mis-shaped key. The stem's input channels and the
    classifier are left to timm, which adapts ``in_chans`` and drops a classifier of another size."""
    def named(name):
        return f"{name!r}" + (f" (checkpoint key {origin[name]!r})" if name in origin else "")

    for name in converted:
        if name not in target and name not in CLASSIFIER:
            raise CheckpointError(f"{source} checkpoint has a tensor the model lacks: {named(name)}")
    for name, expected in target.items():
        if name in CLASSIFIER or name == "stem.conv.weight":
            continue
        if name not in converted:
            raise CheckpointError(f"{source} checkpoint lacks {name!r}")
        if converted[name].shape != expected.shape:
            raise CheckpointError(f"shape mismatch at {named(name)}: checkpoint {tuple(converted[name].shape)}, "
                                  f"model {tuple(expected.shape)}")
