"""Task models by name: one table of detector / segmenter configurations on registered backbones."""
from __future__ import annotations

import os
from typing import NamedTuple

from torch import nn

from mbbackbones.checkpoint import CheckpointError, read_checkpoint
from mbbackbones.choices import did_you_mean
from mbbackbones.registry import Reference

from .backbone import create_backbone  # noqa: F401  (re-exported)
from .detection.ssdlite import SSDLite
from .segmentation.lraspp import LRASPP


class TaskEntry(NamedTuple):
    name: str
    model_cls: type
    backbone: str
    kwargs: dict
    references: tuple[Reference, ...] = ()


TABLE6 = "MobileNetV3 paper, Table 6 (COCO mAP)"
MODELS = (
    TaskEntry("ssdlite320_mbv3_large_reduced", SSDLite, "mbv3_large_reduced", {}, (
        Reference(TABLE6, 22.0, 3.22e6, 510),
        Reference("torchvision ssdlite320_mobilenet_v3_large (91 classes)", 21.3, 3_440_060, 583))),
    TaskEntry("ssdlite320_mbv3_large", SSDLite, "mbv3_large", {}, (Reference(TABLE6, 22.0, 4.97e6, 620),)),
    TaskEntry("ssdlite320_mbv3_small_reduced", SSDLite, "mbv3_small_reduced", {}, (
        Reference(TABLE6, 16.1, 1.77e6, 160),)),
    TaskEntry("ssdlite320_mbv3_small", SSDLite, "mbv3_small", {}, (Reference(TABLE6, 16.0, 2.49e6, 210),)),
    TaskEntry("ssdlite320_mbv2_100", SSDLite, "mbv2_100", {}, (Reference(TABLE6, 22.1, 4.3e6, 800),)),
    TaskEntry("ssdlite320_mbv1_100", SSDLite, "mbv1_100", {}, (Reference(TABLE6, 22.2, 5.1e6, 1300),)),
    # torchvision counts its 2086M MAdds at 520x520 (its preset resize); 15786M at 1024x2048
    # (tests/segmentation/test_lraspp.py)
    TaskEntry("lraspp_mbv3_large", LRASPP, "mbv3_large", {}, (
        Reference("torchvision lraspp_mobilenet_v3_large (21 classes, COCO-VOC mIoU)", 57.9, 3_221_538, 2086),)),
    # the paper's setting: reduced tail, output stride 16, 128 filters; its pooling is pooling="large_kernel"
    TaskEntry("lraspp_mbv3_large_reduced", LRASPP, "mbv3_large_reduced", {}, (
        Reference("MobileNetV3 paper §6.3 (Cityscapes val mIoU)", 72.6, None, None),)),
    TaskEntry("lraspp_mbv3_small", LRASPP, "mbv3_small", {}),
    TaskEntry("lraspp_mbv3_small_reduced", LRASPP, "mbv3_small_reduced", {}),
)
ENTRIES = {entry.name: entry for entry in MODELS}


def list_models(task: str | None = None) -> list[str]:
    """Registered task model names, optionally only those of one ``model_cls.task``."""
    return [e.name for e in MODELS if task is None or e.model_cls.task == task]


def check_name(name: str) -> TaskEntry:
    if name not in ENTRIES:
        raise ValueError(f"Unknown task model {name!r}.{did_you_mean(name, ENTRIES)} Available: {', '.join(ENTRIES)}")
    return ENTRIES[name]


def create_model(name: str, num_classes: int | None = None, pretrained: str | None = None,
                 pretrained_backbone: str | None = None, backbone: str | None = None, **kwargs) -> nn.Module:
    """Build a task model by name.

    Args:
        name: one of ``list_models()``.
        num_classes: number of classes (detection: including background at label 0).
        pretrained: a local file with weights for the whole model: ours, a training checkpoint
            from ``tools/train_*.py``, or torchvision's state dict for the same architecture.
        pretrained_backbone: a local file with backbone weights (ImageNet checkpoints).
        backbone: any registered backbone name, replacing the entry's default.
        kwargs: constructor arguments of the model class.
    """
    entry = check_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = entry.model_cls(backbone=backbone or entry.backbone, pretrained_backbone=pretrained_backbone,
                            **{**entry.kwargs, **kwargs})
    if pretrained:
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"{name}: pretrained file not found: {pretrained}")
        state = read_checkpoint(pretrained)  # a training checkpoint gives its EMA weights, else its model
        try:
            missing, unexpected = model.load_state_dict(model.convert_checkpoint(state), strict=False)
        except (RuntimeError, KeyError, CheckpointError) as error:
            reason = str(error).strip().splitlines()[0]
            raise CheckpointError(f"{name}: checkpoint {pretrained} does not fit: {reason}") from None
        if missing or unexpected:
            first = (missing or unexpected)[0]
            raise CheckpointError(f"{name}: checkpoint {pretrained} does not fit: {len(missing)} missing and "
                                  f"{len(unexpected)} unexpected keys (first: {first!r})")
    model.meta = describe(name, model)
    return model


def describe(name: str, model: nn.Module, categories: list[str] | None = None, **fields) -> dict:
    """A task model's metadata, as data (JSON-serialisable), like torchvision's weights ``meta``: what it is, the
    input it takes and how its outputs read. Exports and checkpoints carry the same dictionary.

    ``categories`` names the labels (index = label; detection's 0 is the background); ``fields`` add or
    replace entries (the published metric, the recipe, the weights file, dataset ids of the labels).
    """
    detection = model.task == "detection"
    if categories is None:
        categories = [("__background__" if detection and i == 0 else f"class {i}") for i in range(model.num_classes)]
    meta = dict(name=name, task=model.task, num_classes=model.num_classes, categories=list(categories),
                input_size=[model.size, model.size] if detection else None,  # None: any size
                mean=model.normalize.mean.flatten().tolist(), std=model.normalize.std.flatten().tolist())
    if detection:
        meta["postprocess"] = model.postprocess
    return {**meta, **fields}

