"""Task models by name: one table of detector / segmenter configurations on registered backbones, their published
weights, and their metadata as data."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights
from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights

from mbbackbones.checkpoint import CheckpointError, WeightsUnavailable, load_file, weights_of
from mbbackbones.choices import ArgumentError, did_you_mean
from mbbackbones.registry import Reference

from .backbone import create_backbone, freeze_stages
from .detection.ssdlite import SSDLite
from .segmentation.lraspp import LRASPP


class Weights(NamedTuple):
    """Published weights of a task model: where they are, and their metadata (as torchvision's weights carry it)."""

    url: str
    meta: dict  # categories, dataset_ids, metrics, recipe, and how inputs are resized

    @property
    def file(self) -> str:
        return os.path.basename(self.url)


def _torchvision(weights, **meta) -> Weights:
    """torchvision's published weights, with the metadata torchvision gives them."""
    return Weights(weights.url, dict(categories=list(weights.meta["categories"]), metrics=weights.meta["_metrics"],
                                     recipe=weights.meta["recipe"], weights=os.path.basename(weights.url), **meta))


class TaskEntry(NamedTuple):
    name: str
    model_cls: type
    backbone: str
    kwargs: dict
    references: tuple[Reference, ...] = ()
    weights: dict[str, Weights] = {}  # tag -> published weights; the first tag is the default


TABLE6 = "MobileNetV3 paper, Table 6 (COCO mAP)"
MODELS = (
    TaskEntry("ssdlite320_mbv3_large_reduced", SSDLite, "mbv3_large_reduced", {}, (
        Reference(TABLE6, 22.0, 3.22e6, 510),
        Reference("torchvision ssdlite320_mobilenet_v3_large (91 classes)", 21.3, 3_440_060, 583)),
        {"coco_v1": _torchvision(SSDLite320_MobileNet_V3_Large_Weights.COCO_V1,
                                 dataset_ids=list(range(91)))}),  # torchvision's labels are COCO's category ids
    TaskEntry("ssdlite320_mbv3_large", SSDLite, "mbv3_large", {}, (Reference(TABLE6, 22.0, 4.97e6, 620),)),
    TaskEntry("ssdlite320_mbv3_small_reduced", SSDLite, "mbv3_small_reduced", {}, (
        Reference(TABLE6, 16.1, 1.77e6, 160),)),
    TaskEntry("ssdlite320_mbv3_small", SSDLite, "mbv3_small", {}, (Reference(TABLE6, 16.0, 2.49e6, 210),)),
    TaskEntry("ssdlite320_mbv2_100", SSDLite, "mbv2_100", {}, (Reference(TABLE6, 22.1, 4.3e6, 800),)),
    TaskEntry("ssdlite320_mbv1_100", SSDLite, "mbv1_100", {}, (Reference(TABLE6, 22.2, 5.1e6, 1300),)),
    TaskEntry("ssdlite320_mbv4_conv_small", SSDLite, "mbv4_conv_small", {}),
    TaskEntry("ssdlite320_mbv4_conv_medium", SSDLite, "mbv4_conv_medium", {}),
    # torchvision counts its 2086M MAdds at 520x520 (its preset resize); 15786M at 1024x2048
    # (tests/segmentation/test_lraspp.py)
    TaskEntry("lraspp_mbv3_large", LRASPP, "mbv3_large", {}, (
        Reference("torchvision lraspp_mobilenet_v3_large (21 classes, COCO-VOC mIoU)", 57.9, 3_221_538, 2086),),
        {"coco_with_voc_labels_v1": _torchvision(LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
                                                 dataset_ids=list(range(21)), resize=520)}),
    # the paper's setting: reduced tail, output stride 16, 128 filters; its pooling is pooling="large_kernel"
    TaskEntry("lraspp_mbv3_large_reduced", LRASPP, "mbv3_large_reduced", {}, (
        Reference("MobileNetV3 paper §6.3 (Cityscapes val mIoU)", 72.6, None, None),)),
    TaskEntry("lraspp_mbv3_small", LRASPP, "mbv3_small", {}),
    TaskEntry("lraspp_mbv3_small_reduced", LRASPP, "mbv3_small_reduced", {}),
    TaskEntry("lraspp_mbv4_conv_small", LRASPP, "mbv4_conv_small", {}),
)
ENTRIES = {entry.name: entry for entry in MODELS}
TASK_MODELS = {cls.task: cls for cls in (SSDLite, LRASPP)}  # the class whose hooks read a task's metadata
DESCRIPTIVE = ("dataset_ids", "metrics", "recipe", "weights", "resize", "model_kwargs")  # metadata carried over


def list_models(task: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered task model names, optionally only one ``model_cls.task``'s or only those with published weights."""
    return [e.name for e in MODELS if (task is None or e.model_cls.task == task) and (e.weights or not pretrained)]


def check_name(name: str) -> TaskEntry:
    if name not in ENTRIES:
        raise ArgumentError(f"Unknown task model {name!r}.{did_you_mean(name, ENTRIES)} Available: "
                          f"{', '.join(ENTRIES)}")
    return ENTRIES[name]


def create_model(name: str, num_classes: int | None = None, pretrained: bool | str | os.PathLike | None = None,
                 pretrained_backbone: bool | str | os.PathLike | None = None, backbone: str | nn.Module | None = None,
                 trainable_backbone_layers: int | None = None, **kwargs) -> nn.Module:
    """Build a task model by name, in train mode, with its metadata in ``model.meta``.

    Args:
        name: one of ``list_models()``.
        num_classes: number of classes (detection: including background at label 0); by default the published
            weights' or the checkpoint's, else the model's default.
        pretrained: whole-model weights: ``True`` (the published default), a published tag (``list_weights(name)``),
            or a file: ours, a training checkpoint (``best.pt`` / ``last.pt``) or torchvision's state dict for the
            same architecture. Published files are downloaded once into torch's hub cache (``$TORCH_HOME``).
        pretrained_backbone: ``True`` (the backbone's default ImageNet weights) or a file with backbone weights.
        backbone: any registered backbone name, replacing the entry's default, or a module with timm's
            ``features_only`` contract (used as it is: no ``pretrained_backbone`` then).
        trainable_backbone_layers: how many backbone stages, counted from the top, train (torchvision's convention:
            0 freezes the backbone; None, the default, trains all; stages as ``heads.backbone.backbone_stages``
            counts them, 6 for MobileNetV3). Frozen stages keep their BatchNorm in eval mode when the model trains,
            unlike torchvision's, which leaves it in train mode; and they are frozen even without pretrained weights
            (with a warning), where torchvision trains them all instead.
        kwargs: constructor arguments of the model class.
    """
    entry = check_name(name)
    if pretrained and pretrained_backbone:
        raise ArgumentError(f"{name}: pretrained and pretrained_backbone together; the whole-model weights replace the "
                          "backbone's, so pass one of them")
    checkpoint, meta, source = _weights(entry, pretrained)
    return _build(entry, checkpoint, meta, source, num_classes, pretrained_backbone, backbone,
                  trainable_backbone_layers, kwargs)


def load_checkpoint(path: str | os.PathLike, name: str | None = None, **kwargs) -> tuple[nn.Module, dict]:
    """The model a weights file holds, and the file's contents (read once).

    A training checkpoint names its model in its metadata; a plain state dict needs ``name``, unless it is one of
    the registry's published files. ``kwargs`` are :func:`create_model`'s.
    """
    checkpoint = load_file(path)
    meta = checkpoint.get("meta") or {}
    published = {weights.file: entry.name for entry in MODELS for weights in entry.weights.values()}
    name = name or meta.get("name") or published.get(Path(path).name)
    if name is None:
        raise ArgumentError(f"{path} is a plain state dict: say which model it belongs to (one of "
                          f"{', '.join(ENTRIES)})")
    num_classes, backbone = kwargs.pop("num_classes", None), kwargs.pop("backbone", None)
    model = _build(check_name(name), checkpoint, meta, str(path), num_classes, None, backbone,
                   kwargs.pop("trainable_backbone_layers", None), kwargs)
    return model, checkpoint


def _build(entry: TaskEntry, checkpoint: dict | None, meta: dict, source: str, num_classes: int | None,
           pretrained_backbone, backbone: str | None, trainable_backbone_layers: int | None,
           kwargs: dict) -> nn.Module:
    """The model of ``entry`` with the weights of ``checkpoint`` (None: none) and its metadata."""
    explicit_classes = num_classes is not None
    if num_classes is None and meta.get("categories"):
        num_classes = len(meta["categories"])
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs = {**entry.kwargs, **meta.get("model_kwargs", {}), **kwargs}
    backbone = backbone if backbone is not None else kwargs.pop("backbone", entry.backbone)
    if pretrained_backbone and not isinstance(backbone, str):
        raise ArgumentError(f"{entry.name}: pretrained_backbone loads a named backbone's weights; a backbone module "
                            "is used as it is")
    model = entry.model_cls(backbone=backbone, **kwargs)
    if pretrained_backbone:
        weights = create_backbone(backbone, pretrained_backbone, **model.backbone_args)
        model.backbone.load_state_dict(weights.state_dict())
    if checkpoint is not None:
        try:
            state = model.convert_checkpoint(weights_of(checkpoint))
        except CheckpointError as error:
            raise CheckpointError(f"{entry.name}: {source} does not fit: {error}") from None
        load_weights(model, state, f"{entry.name}: {source}", new_head=explicit_classes)
    frozen = freeze_stages(model.backbone, trainable_backbone_layers, backbone if isinstance(backbone, str) else
                           type(backbone).__name__)
    if frozen and checkpoint is None and not pretrained_backbone and isinstance(backbone, str):
        warnings.warn(f"{entry.name}: trainable_backbone_layers={trainable_backbone_layers} freezes {frozen} backbone "
                      "stages that hold random weights: pass pretrained or pretrained_backbone", stacklevel=3)
    fields = {key: meta[key] for key in DESCRIPTIVE if key in meta}
    categories = meta.get("categories")
    if categories is not None and len(categories) != model.num_classes:  # a new head: its classes are new
        categories = fields["dataset_ids"] = None
    model.meta = describe(entry.name, model, categories, **fields)
    return model


def list_weights(name: str) -> list[str]:
    """The tags of a model's published weights, the default first."""
    return list(check_name(name).weights)


def _weights(entry: TaskEntry, pretrained) -> tuple[dict | None, dict, str]:
    """The checkpoint (a dict, as read), its metadata and a name for it in messages, for ``pretrained``."""
    if pretrained is None or pretrained is False:
        return None, {}, ""
    if pretrained is True or (isinstance(pretrained, str) and pretrained in entry.weights):
        if not entry.weights:
            published = ", ".join(list_models(pretrained=True))
            raise WeightsUnavailable(f"{entry.name} has no published weights (models with published weights: "
                                     f"{published}); pass {{alternative}}", "pretrained=PATH to a file of weights")
        weights = entry.weights[next(iter(entry.weights)) if pretrained is True else pretrained]
        return load_file(download(entry.name, weights)), weights.meta, weights.file
    path = Path(pretrained)
    if not path.exists() and isinstance(pretrained, str) and not path.suffix and os.sep not in pretrained:
        tags = ", ".join(entry.weights) or "none"
        raise ArgumentError(f"{entry.name}: {pretrained!r} is neither a published weights tag (tags: {tags}) nor a "
                            "file")
    checkpoint = load_file(path)
    return checkpoint, checkpoint.get("meta") or {}, str(path)


def download(owner: str, weights: Weights) -> Path:
    """The published file in torch's hub cache, downloaded there first when missing (hash-checked, as
    ``torch.hub.load_state_dict_from_url`` does)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / weights.file
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(weights.file)
        try:
            torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None, progress=True)
        except (OSError, RuntimeError) as error:  # offline (URLError is an OSError), or a hash mismatch
            raise WeightsUnavailable.offline(owner, weights.file, str(path.parent), type(error).__name__,
                                             "pretrained=PATH to a copy of the file") from None
    return path


def load_weights(model: nn.Module, state: dict, source: str, new_head: bool = False) -> None:
    """Load a state dict that must fit exactly; else one line naming the first key that does not, and its shapes.

    With ``new_head`` (the caller asked for another number of classes than the weights have), the layers whose
    shapes follow the class count (``model.class_layers``) keep their initialisation instead, and a warning says so.
    """
    target = model.state_dict()
    mismatched = [key for key, value in state.items() if key in target and value.shape != target[key].shape]
    fresh = [key for key in mismatched if new_head and key.startswith(model.class_layers)]
    for key in mismatched:
        if key not in fresh:
            hint = " (a head for another number of classes: pass num_classes)" if key.startswith(
                model.class_layers) else ""
            raise CheckpointError(f"{source} does not fit: {key} is {tuple(state[key].shape)} in the checkpoint but "
                                  f"{tuple(target[key].shape)} in the model{hint}")
    state = {key: value for key, value in state.items() if key not in fresh}
    missing = sorted(target.keys() - state.keys() - set(fresh))
    unexpected = sorted(state.keys() - target.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit: {len(missing)} missing and {len(unexpected)} unexpected keys "
                              f"(first: {(missing or unexpected)[0]!r})")
    model.load_state_dict(state, strict=not fresh)
    if fresh:
        warnings.warn(f"{source}: its classification layers are for another number of classes, so the model's "
                      f"{model.num_classes}-class layers start untrained (re-initialised: {layer_names(fresh)})",
                      stacklevel=3)


def layer_names(keys: list[str]) -> str:
    """The layers that state-dict ``keys`` belong to, in order, those that differ in one index written once
    (``head.cls.{0,1,2}.1``)."""
    layers = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in keys))
    groups: dict[str, list[str]] = {}
    for layer in layers:
        index = re.search(r"(?<=\.)\d+(?=\.|$)", layer)
        pattern = layer[:index.start()] + "{}" + layer[index.end():] if index else layer
        groups.setdefault(pattern, []).append(index[0] if index else "")
    return ", ".join(pattern.format("{" + ",".join(indices) + "}") if len(indices) > 1 else
                     pattern.format(*indices) for pattern, indices in groups.items())


def describe(name: str, model: nn.Module, categories: list[str] | None = None, **fields) -> dict:
    """A task model's metadata, as data (JSON-serialisable), like torchvision's weights ``meta``: what it is, the
    input it takes and how its outputs read. Exports and checkpoints carry the same dictionary.

    ``categories`` names the labels (index = label; detection's 0 is the background); ``fields`` add or
    replace entries (the published metric, the recipe, the weights file, dataset ids of the labels).
    """
    meta = dict(name=name, task=model.task, num_classes=model.num_classes, dataset_ids=None, resize=None,
                mean=model.normalize.statistics[0], std=model.normalize.statistics[1],
                metrics={}, recipe=None, weights=None, model_kwargs={}, **model.metadata())
    if categories is not None:
        meta["categories"] = list(categories)
    return {**meta, **fields}
