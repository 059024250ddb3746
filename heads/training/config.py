"""Training configuration: YAML files whose keys are the fields below, plus ``--key value`` overrides."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mbbackbones.choices import did_you_mean


class ConfigError(ValueError):
    """An unknown key, a value of the wrong type or an unreadable config file."""


@dataclass
class TrainConfig:
    """Every option of ``tools/train_det.py`` / ``tools/train_seg.py``; defaults follow torchvision's SSDLite recipe."""

    task: str = "detection"                  # detection | segmentation
    model: str = "ssdlite320_mbv3_large_reduced"
    model_kwargs: dict = field(default_factory=dict)  # extra constructor arguments (e.g. backbone, pooling)
    pretrained: str | None = None            # whole-model weights (file)
    pretrained_backbone: str | None = None   # backbone weights (file)
    # data
    dataset: str = "builtin"                 # coco | builtin (detection); cityscapes | builtin (segmentation)
    data_root: str | None = None             # dataset root; builtin: where it is generated (default: cache)
    train_split: str = "train2017"
    val_split: str = "val2017"
    label_mode: str = "contiguous"           # COCO labels: contiguous | coco91 (torchvision's 91 classes)
    skip_corrupt: bool = False               # skip unreadable images (counted) instead of stopping
    augment: str = "ssdlite"                 # detection: ssdlite | ssd | none; segmentation: default | none
    crop_size: list = field(default_factory=lambda: [512, 1024])  # segmentation crop (H, W)
    workers: int = 2
    # optimisation
    epochs: int = 660
    max_steps: int | None = None             # stop after this many optimizer steps (a budget), if set
    batch_size: int = 24                     # per process and per micro-batch
    accumulate: int = 1                      # micro-batches per optimizer step
    optimizer: str = "sgd"                   # sgd | adam | adamw
    lr: float = 0.15                         # for a global batch of lr_batch; scaled linearly to the real one
    lr_batch: int = 192
    momentum: float = 0.9
    weight_decay: float = 4e-5
    scheduler: str = "cosine"                # cosine | poly | constant
    warmup_steps: int = 1000                 # linear warm-up, capped at one epoch
    warmup_factor: float = 0.001
    grad_clip: float | None = None
    amp: bool = False                        # bfloat16 autocast on CPU, float16 + GradScaler on CUDA
    ema: bool = False
    ema_decay: float = 0.9998
    sync_bn: bool = False                    # SyncBatchNorm across processes (CUDA only)
    # bookkeeping
    seed: int = 0
    device: str = "auto"                     # auto | cpu | cuda | cuda:N
    output: str = "runs/train"
    checkpoint_every: int = 500              # steps; also at every epoch end
    eval_every: int = 1                      # epochs; 0 disables periodic evaluation
    eval_limit: int | None = None            # evaluate on the first N validation images only
    log_every: int = 10
    eval_backend: str = "pycocotools"        # detection: pycocotools | faster_coco_eval
    bn_recalibrate: int = 0                  # batches to re-estimate BN statistics before evaluation

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulate


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)


def _check_type(name: str, value, source: str):
    hint = HINTS[name]
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return value
    for kind in allowed:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is not type(None) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(f"{source}: {name} must be {names}, got {value!r}")


def _unknown(key: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: unknown key {key!r}.{did_you_mean(key, FIELDS)} Valid keys: {', '.join(FIELDS)}")


def make_config(values: dict, source: str = "config") -> TrainConfig:
    """A validated ``TrainConfig`` from a mapping of field names to values."""
    for key in values:
        if key not in FIELDS:
            raise _unknown(key, source)
    return TrainConfig(**{k: _check_type(k, v, source) for k, v in values.items()})


def read_yaml(path: str | Path) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def parse_overrides(args: list[str]) -> dict:
    """``["--lr", "0.1", "--amp", "true"]`` -> ``{"lr": 0.1, "amp": True}``; values are read as YAML."""
    values, args = {}, list(args)
    while args:
        key = args.pop(0)
        if not key.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {key!r}")
        key = key[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
        elif args and not args[0].startswith("--"):
            raw = args.pop(0)
        else:
            raw = "true"  # a bare flag
        if key not in FIELDS:
            raise _unknown(key, "command line")
        values[key] = yaml.safe_load(raw)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **defaults) -> TrainConfig:
    """Defaults < YAML file < command-line overrides."""
    values = dict(defaults)
    if path:
        values.update(read_yaml(path))
    values.update(parse_overrides(overrides or []))
    return make_config(values, str(path or "config"))


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
