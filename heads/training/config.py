"""Training configuration: YAML files whose keys are the fields below, plus ``--key value`` overrides.

Every field documents itself (``help``) and states what values it takes (``rule``): a wrong value stops with one
line that names the key, where it came from (the YAML file or the command line) and what is valid.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import yaml

from mbbackbones.choices import did_you_mean


class ConfigError(ValueError):
    """An unknown key, a value of the wrong type or range, or an unreadable config file."""


class Rule(NamedTuple):
    """What a value must satisfy, and how to say it: ``<key> must be <text>``."""

    check: Callable[[Any], bool]
    text: str
    choices: tuple = ()  # for a did-you-mean hint


def at_least(low: int) -> Rule:
    return Rule(lambda value: value >= low, f">= {low}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda value: value in choices, f"one of {', '.join(choices)}", choices)


POSITIVE = Rule(lambda value: value > 0, "> 0")
FRACTION = Rule(lambda value: 0 < value < 1, "between 0 and 1 (exclusive)")
DEVICE = Rule(lambda value: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value) is not None,
              "auto, cpu, mps, cuda or cuda:N")
CLASS_NAMES = Rule(lambda value: isinstance(value, str) or all(isinstance(name, str) for name in value),
                  "a list of names (quote those YAML reads as numbers or booleans: '1', 'yes', 'on') or the path of "
                  "a text file with one name a line")
SIZE = Rule(lambda value: len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in value), "two positive integers [height, width]")


def option(default, help: str, rule: Rule | None = None, resumable: bool = False):
    """A config field: its default, its one-line documentation and the rule its values follow (``None`` passes).

    ``resumable``: a resumed run may change it (where the run runs, what it writes, how it evaluates). The other
    fields define what the checkpoint continues (the model, the data and its order, the optimisation): a resumed
    run that changes one is refused (:func:`resume_changes`)."""
    metadata = dict(help=help, rule=rule, resumable=resumable)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every option of ``heads.train`` and ``tools/train_*.py``; defaults follow torchvision's SSDLite recipe."""

    task: str = option("detection", "detection | segmentation", one_of("detection", "segmentation"))
    model: str = option("ssdlite320_mbv3_large_reduced", "registered task model (heads.list_models())")
    model_kwargs: dict = option({}, "extra constructor arguments (e.g. backbone, pooling)")
    pretrained: bool | str | None = option(None, "whole-model weights: true (published), a tag or a file")
    pretrained_backbone: bool | str | None = option(None, "backbone weights: true (ImageNet) or a file")
    trainable_backbone_layers: int | None = option(
        None, "backbone stages, counted from the top, that train (torchvision's convention, 6 for MobileNetV3; 0: "
              "none; null: all); frozen stages keep their BatchNorm in eval mode (torchvision's: in train mode)",
        at_least(0))
    freeze: str | None = option(None, "backbone: freeze the whole backbone (trainable_backbone_layers: 0)",
                                one_of("backbone"))
    # data
    dataset: str = option("builtin", "detection: coco | voc | builtin | builtin_voc; segmentation: cityscapes | masks "
                                     "(image and mask folders, your classes) | voc | builtin | builtin_masks | "
                                     "builtin_voc",
                          one_of("coco", "voc", "cityscapes", "masks", "builtin", "builtin_voc", "builtin_masks"))
    data_root: str | None = option(None, "dataset root (coco, cityscapes; voc: the VOC2012 or VOC2007 folder)")
    train_split: str = option("train2017", "training split (COCO: folder / annotation name; VOC: ImageSets list)")
    val_split: str = option("val2017", "validation split")
    train_annotations: str | None = option(None, "COCO: an annotation JSON for training, any path (default: the "
                                                 "split's under data_root/annotations)")
    val_annotations: str | None = option(None, "COCO: an annotation JSON for validation, any path")
    train_images: str | None = option(None, "the training image folder, any path (COCO: default data_root/split; "
                                            "masks: each image pairs with the same-stem PNG of train_masks)")
    val_images: str | None = option(None, "the validation image folder (COCO, masks)")
    train_masks: str | None = option(None, "masks: the training mask folder: single-channel or palette PNGs of class "
                                           "ids 0..N-1 (255: ignore), named as their images")
    val_masks: str | None = option(None, "masks: the validation mask folder")
    classes: list | str | None = option(None, "masks: the class names in id order, a list or a text file with one "
                                              "name a line", CLASS_NAMES)
    label_mode: str = option("contiguous", "COCO labels: contiguous | coco91 (torchvision's 91 classes)",
                             one_of("contiguous", "coco91"))
    skip_corrupt: bool = option(False, "skip unreadable images (counted) instead of stopping", resumable=True)
    augment: str = option("ssdlite", "detection: ssdlite | ssd | none; segmentation: default | none")
    crop_size: list = option([512, 1024], "segmentation training crop [height, width]", SIZE)
    workers: int = option(2, "data loading processes (0: in the main process)", at_least(0), resumable=True)
    # optimisation
    epochs: int = option(660, "passes over the training set", at_least(1))
    max_steps: int | None = option(None, "stop after this many optimizer steps (a budget), if set", at_least(1))
    batch_size: int = option(24, "images per process and micro-batch", at_least(1))
    accumulate: int = option(1, "micro-batches per optimizer step", at_least(1))
    optimizer: str = option("sgd", "sgd | adam | adamw", one_of("sgd", "adam", "adamw"))
    lr: float = option(0.15, "learning rate for a global batch of lr_batch, scaled linearly to the real one",
                       POSITIVE)
    lr_batch: int = option(192, "the global batch lr is given for", at_least(1))
    momentum: float = option(0.9, "SGD momentum", Rule(lambda value: 0 <= value < 1, "in [0, 1)"))
    weight_decay: float = option(4e-5, "L2 weight decay", at_least(0))
    scheduler: str = option("cosine", "cosine | poly | constant", one_of("cosine", "poly", "constant"))
    warmup_steps: int = option(1000, "linear warm-up steps, capped at one epoch", at_least(0))
    warmup_factor: float = option(0.001, "the learning rate's share at the first warm-up step",
                                  Rule(lambda value: 0 < value <= 1, "in (0, 1]"))
    grad_clip: float | None = option(None, "clip the gradient norm to this, if set", POSITIVE)
    amp: bool = option(False, "mixed precision: bfloat16 on CPU, float16 with a gradient scaler on CUDA")
    channels_last: bool = option(True, "train in the channels-last memory format (faster on CPUs and GPUs)")
    ema: bool = option(False, "keep an exponential moving average of the weights; evaluate and save it")
    ema_decay: float = option(0.9998, "EMA decay per step", FRACTION)
    sync_bn: bool = option(False, "SyncBatchNorm across processes (CUDA only)")
    # bookkeeping
    seed: int = option(0, "seed of weights, sampling and augmentation")
    device: str = option("auto", "auto | cpu | cuda | cuda:N", DEVICE, resumable=True)
    output: str = option("runs/train", "run folder; taken: the next free one (runs/x-2, ...), unless resuming",
                         resumable=True)
    checkpoint_every: int = option(500, "steps between checkpoints (also at every epoch end)", at_least(1),
                                   resumable=True)
    eval_every: int = option(1, "epochs between evaluations; 0: only at the end", at_least(0), resumable=True)
    eval_limit: int | None = option(None, "evaluate on the first N validation images only", at_least(1), resumable=True)
    log_every: int = option(10, "steps between log records", at_least(1), resumable=True)
    scorer: str = option("pycocotools", "detection: pycocotools | faster_coco_eval",
                         one_of("pycocotools", "faster_coco_eval"), resumable=True)
    bn_recalibrate: int = option(0, "batches to re-estimate BN statistics on before each evaluation", at_least(0),
                                 resumable=True)
    tensorboard: bool = option(True, "write TensorBoard event files into the run folder", resumable=True)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulate


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)
RESUMABLE = tuple(name for name, field in FIELDS.items() if field.metadata["resumable"])  # the rest: fixed per run


def _kind_name(kind) -> str:
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}[kind]


def _kinds(name: str) -> tuple:
    """The types field ``name`` takes (``float | None`` -> ``(float, NoneType)``)."""
    return typing.get_args(HINTS[name]) or (HINTS[name],)


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))


def _number(text: str):
    """``text`` as a float when Python reads it as one (YAML 1.1 reads ``1e-3`` and ``4e-05``, exponents without a
    dot, as strings), else ``text`` unchanged."""
    try:
        return float(text)
    except ValueError:
        return text


def check_value(name: str, value, source: str):
    """``value`` for field ``name``, with ints and float spellings (``"1e-3"``) turned into floats where a float is
    due; else a ``ConfigError``. Non-finite floats are refused."""
    allowed = _kinds(name)
    if isinstance(value, str) and float in allowed and str not in allowed:
        value = _number(value)
    for kind in allowed:
        if kind is float and _is(value, int):
            value = float(value)
        if _is(value, kind):
            break
    else:
        expected = " or ".join(_kind_name(kind) for kind in allowed)
        raise ConfigError(f"{source}: {name} must be {expected}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {name} must be a finite number, got {value!r}")
    rule = FIELDS[name].metadata["rule"]
    if rule is not None and value is not None and not isinstance(value, bool) and not rule.check(value):
        hint = did_you_mean(value, rule.choices) if rule.choices and isinstance(value, str) else ""
        raise ConfigError(f"{source}: {name} must be {rule.text}, got {value!r}" + (f".{hint}" if hint else ""))
    return value


def _unknown(key: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: unknown key {key!r}.{did_you_mean(key, FIELDS)} Valid keys: {', '.join(FIELDS)}")


# Each task's recipe: the TrainConfig values that differ from the field defaults (torchvision's SSDLite recipe).
# Segmentation follows mmsegmentation's LR-ASPP Cityscapes schedule: SGD 0.01 per 16 images, poly decay, 512x1024
# crops.
RECIPES = {
    "detection": {},
    "segmentation": dict(model="lraspp_mbv3_large", dataset="builtin", train_split="train", val_split="val",
                         augment="default", lr=0.01, lr_batch=16, weight_decay=4e-5, scheduler="poly", warmup_steps=0,
                         batch_size=4, epochs=1721, output="runs/segmentation"),
}

# the split names of datasets whose lists are not COCO's train2017 / val2017 (the TrainConfig defaults)
DATASET_SPLITS = {name: dict(train_split="train", val_split="val") for name in ("voc", "builtin_voc")}


def make_config(values: dict, source: str | dict[str, str] = "config") -> TrainConfig:
    """A validated ``TrainConfig`` from a mapping of field names to values, over the recipe of its task
    (:data:`RECIPES`); ``source`` names where the values came from, for the error messages (one name, or one per
    key)."""
    def where(key: str) -> str:
        return source.get(key, "config") if isinstance(source, dict) else source

    for key in values:
        if key not in FIELDS:
            raise _unknown(key, where(key))
    task = check_value("task", values.get("task", FIELDS["task"].default), where("task"))
    dataset = values.get("dataset", RECIPES[task].get("dataset", FIELDS["dataset"].default))
    values = {**RECIPES[task], **DATASET_SPLITS.get(dataset, {}), **values}
    return TrainConfig(**{key: check_value(key, value, where(key)) for key, value in values.items()})


def read_yaml(path: str | Path) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass a YAML file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def parse_overrides(args: list[str]) -> dict:
    """``["--lr", "0.1", "--amp"]`` -> ``{"lr": 0.1, "amp": True}``; values are read as YAML, keys may use dashes
    (``--data-root=/data/my-coco`` keeps the value's dashes). Only true/false keys can stand alone."""
    values, args = {}, list(args)
    while args:
        item = args.pop(0)
        if not item.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {item!r}")
        key, equals, raw = item[2:].partition("=")
        key = key.replace("-", "_")
        if key not in FIELDS:
            raise _unknown(key, "command line")
        if not equals:
            if args and not args[0].startswith("--"):
                raw = args.pop(0)
            elif HINTS[key] is bool:
                raw = "true"
            else:
                raise ConfigError(f"command line: --{key} needs a value ({FIELDS[key].metadata['help']})")
        values[key] = _read_value(key, raw)
    return values


def _read_value(key: str, raw: str):
    """A command-line value read as YAML; the text itself for a string field when YAML reads a number or a boolean
    that the field does not take (``--train-split 2017``), or when YAML cannot read it (a path with ``: ``)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    allowed = _kinds(key)
    if isinstance(value, (bool, int, float)) and str in allowed and not any(_is(value, kind) for kind in allowed):
        return raw
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                **defaults) -> TrainConfig:
    """Defaults < YAML file < overrides (command-line ``--key value`` words, or a mapping from Python)."""
    values, sources = dict(defaults), {}
    if path:
        from_file = read_yaml(path)
        values.update(from_file)
        sources.update(dict.fromkeys(from_file, str(path)))
    if isinstance(overrides, dict):
        values.update(overrides)
        sources.update(dict.fromkeys(overrides, "overrides"))
    else:
        given = parse_overrides(overrides or [])
        values.update(given)
        sources.update(dict.fromkeys(given, "command line"))
    return make_config(values, sources)


def resume_changes(stored: TrainConfig, cfg: TrainConfig, run: str | Path) -> list[str]:
    """The keys in which ``cfg`` differs from the ``stored`` config of ``run``, as ``"key old -> new"``: all of them
    resumable, or else a ``ConfigError`` that names every changed key which is not."""
    changes = {name: (getattr(stored, name), getattr(cfg, name)) for name in FIELDS
               if getattr(stored, name) != getattr(cfg, name)}
    described = {name: f"{name} {_show(old)} -> {_show(new)}" for name, (old, new) in changes.items()}
    refused = [text for name, text in described.items() if name not in RESUMABLE]
    if refused:
        raise ConfigError(f"cannot resume {run} with other values of keys that define the training it continues: "
                          f"{', '.join(refused)}; drop them, or start a new run (only {', '.join(RESUMABLE)} may "
                          "change)")
    return list(described.values())


def _show(value) -> str:
    """A value as YAML writes it (``null``, ``true``, ``0.001``, ``[512, 1024]``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("\n...\n").strip()


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def describe_fields() -> str:
    """One line per key: name, default and help (the training tools' ``--help`` epilog)."""
    width = max(map(len, FIELDS))
    return "\n".join(f"  --{name:<{width}}  {field.metadata['help']} (default: {_default(field)})"
                     for name, field in FIELDS.items())


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
