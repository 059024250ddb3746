"""The registered models: one table of names, architectures, weights and reference numbers.

Importing this module registers every name into timm (``timm.create_model("mbv3_large")``).
"""
from __future__ import annotations

import inspect
import os
from typing import NamedTuple

import huggingface_hub.constants
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg

from .checkpoint import CheckpointError, WeightsUnavailable, convert, read_checkpoint
from .choices import ArgumentError, UnknownArgument, did_you_mean
from .model import MobileNet

TORCHVISION = "https://download.pytorch.org/models/"


class Reference(NamedTuple):
    """Numbers published for the same configuration, by backbones and task models alike."""

    source: str
    metric: float | None = None   # the source's headline metric: ImageNet top-1, COCO mAP, mIoU
    params: float | None = None
    madds_m: float | None = None  # millions of multiply-adds at the source's input size


class Entry(NamedTuple):
    name: str
    arch: str
    width: float
    reduced_tail: bool
    params: int          # ours, 1000 classes (checked by tests)
    madds_m: float       # ours at 224x224, millions (one multiply-add = one MAdd)
    weights: dict        # tag -> pretrained cfg fields; the first tag is the default
    references: tuple[Reference, ...] = ()


def _cfg(**kwargs) -> dict:
    return {**dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                   interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                   first_conv="stem.conv", classifier="classifier"), **kwargs}


def _torchvision(file: str, resize: int = 256) -> dict:
    return _cfg(url=TORCHVISION + file, crop_pct=round(224 / resize, 4), license="bsd-3-clause",
                origin_url="https://github.com/pytorch/vision")


def _timm(hub_id: str, **kwargs) -> dict:
    return _cfg(hf_hub_id=hub_id, interpolation="bicubic", license="apache-2.0",
                origin_url="https://github.com/huggingface/pytorch-image-models", **kwargs)


def _timm_v4(name: str, size: int = 224, crop_pct: float = 0.875, test: tuple[int, float] | None = None,
             **kwargs) -> dict:
    """timm's cfg of ``mobilenetv4_<name>``: its input ``size`` and ``crop_pct``, and its ``test`` (size, crop)."""
    if test:
        kwargs.update(test_input_size=(3, test[0], test[0]), test_crop_pct=test[1])
    return _timm(f"timm/mobilenetv4_{name}", input_size=(3, size, size), pool_size=(size // 32, size // 32),
                 crop_pct=crop_pct, **kwargs)


PAPER_V3 = "MobileNetV3 paper, Table 3"
MODELS = (
    Entry("mbv3_large", "v3_large", 1.0, False, 5_483_032, 216.6, {
        "tv2_in1k": _torchvision("mobilenet_v3_large-5c1a4163.pth", resize=232),
        "tv_in1k": _torchvision("mobilenet_v3_large-8738ca79.pth"),
    }, (Reference(PAPER_V3, 75.2, 5.4e6, 219), Reference("torchvision mobilenet_v3_large", 75.274, 5_483_032, 216.6))),
    Entry("mbv3_large_reduced", "v3_large", 1.0, True, 2_569_352, 182.3, {},
          (Reference("torchvision mobilenet_v3_large(reduced_tail=True)", None, 2_569_352, None),)),
    Entry("mbv3_large_075", "v3_large", 0.75, False, 3_993_528, 154.6, {},
          (Reference(PAPER_V3, 73.3, 4.0e6, 155), Reference("timm mobilenetv3_large_075", None, 3_993_528, 154.6))),
    Entry("mbv3_small", "v3_small", 1.0, False, 2_542_856, 56.5, {
        "tv_in1k": _torchvision("mobilenet_v3_small-047dcff4.pth"),
    }, (Reference(PAPER_V3, 67.4, 2.5e6, 56), Reference("torchvision mobilenet_v3_small", 67.668, 2_542_856, 56.5))),
    Entry("mbv3_small_reduced", "v3_small", 1.0, True, 1_099_672, 43.8, {},
          (Reference("torchvision mobilenet_v3_small(reduced_tail=True)", None, 1_099_672, None),)),
    Entry("mbv3_small_075", "v3_small", 0.75, False, 2_041_872, 43.4, {},
          (Reference(PAPER_V3, 65.4, 2.0e6, 44), Reference("timm mobilenetv3_small_075", None, 2_041_872, 43.4))),
    Entry("mbv2_100", "v2", 1.0, False, 3_504_872, 300.8, {
        "tv2_in1k": _torchvision("mobilenet_v2-7ebf99e0.pth", resize=232),
        "tv_in1k": _torchvision("mobilenet_v2-b0353104.pth"),
    }, (Reference("MobileNetV2 paper, Table 4", 72.0, 3.4e6, 300),
        Reference("torchvision mobilenet_v2", 72.154, 3_504_872, 300.8))),
    Entry("mbv2_050", "v2", 0.5, False, 1_968_680, 97.1, {
        "lamb_in1k": _timm("timm/mobilenetv2_050.lamb_in1k"),
    }, (Reference("MobileNetV2 paper, Table 6 (0.5)", 65.4, 1.95e6, 97),
        Reference("torchvision mobilenet_v2(width_mult=0.5)", None, 1_968_680, 97.1))),
    Entry("mbv2_035", "v2", 0.35, False, 1_677_128, 59.3, {},
          (Reference("MobileNetV2 paper, Table 6 (0.35)", 60.3, 1.66e6, 59),
           Reference("torchvision mobilenet_v2(width_mult=0.35)", None, 1_677_128, 59.3))),
    Entry("mbv1_100", "v1", 1.0, False, 4_231_976, 568.7, {
        "ra4_e3600_r224_in1k": _timm("timm/mobilenetv1_100.ra4_e3600_r224_in1k", mean=IMAGENET_INCEPTION_MEAN,
                                     std=IMAGENET_INCEPTION_STD),
    }, (Reference("MobileNetV1 paper, Table 8", 70.6, 4.2e6, 569),
        Reference("timm mobilenetv1_100", None, 4_231_976, 568.7))),
    Entry("mbv1_050", "v1", 0.5, False, 1_331_592, 149.5, {},
          (Reference("MobileNetV1 paper, Table 8 (0.5)", 63.7, 1.3e6, 149),
           Reference("timm builder, width 0.5", None, 1_331_592, 149.5))),
    # MobileNetV4: timm's published weights, its tags in its order (the first is timm's default too); the metric of
    # those is not stored here. The counts are at 224 for all, although timm's default input is larger for some;
    # the paper's MACs are at its own resolution for each model (1.0G for Conv-M is at 256 px).
    Entry("mbv4_conv_small", "v4_conv_small", 1.0, False, 3_774_024, 186.0, {
        "e2400_r224_in1k": _timm_v4("conv_small.e2400_r224_in1k", test=(256, 0.95)),
        "e1200_r224_in1k": _timm_v4("conv_small.e1200_r224_in1k", test=(256, 0.95)),
        "e3600_r256_in1k": _timm_v4("conv_small.e3600_r256_in1k", 256, 0.95, (320, 1.0), mean=IMAGENET_INCEPTION_MEAN,
                                    std=IMAGENET_INCEPTION_STD),
    }, (Reference("MobileNetV4 paper, ImageNet-1k at 224 px", 73.8, 3.8e6, 200),
        Reference("timm mobilenetv4_conv_small", None, 3_774_024, 186.0))),
    Entry("mbv4_conv_medium", "v4_conv_medium", 1.0, False, 9_715_512, 827.6, {
        "e500_r256_in1k": _timm_v4("conv_medium.e500_r256_in1k", 256, 0.95, (320, 1.0)),
        "e500_r224_in1k": _timm_v4("conv_medium.e500_r224_in1k", 224, 0.95, (256, 1.0)),
        "e250_r384_in12k_ft_in1k": _timm_v4("conv_medium.e250_r384_in12k_ft_in1k", 384, 0.95),
    }, (Reference("MobileNetV4 paper, ImageNet-1k at 256 px", 79.9, 9.2e6, 1000),
        Reference("timm mobilenetv4_conv_medium", None, 9_715_512, 827.6))),
    Entry("mbv4_conv_large", "v4_conv_large", 1.0, False, 32_590_864, 2171.3, {
        "e600_r384_in1k": _timm_v4("conv_large.e600_r384_in1k", 384, 0.95, (448, 1.0)),
        "e500_r256_in1k": _timm_v4("conv_large.e500_r256_in1k", 256, 0.95, (320, 1.0)),
    }, (Reference("MobileNetV4 paper, ImageNet-1k at 384 px", 82.9, 31e6, 5900),
        Reference("timm mobilenetv4_conv_large", None, 32_590_864, 2171.3))),
    Entry("mbv4_hybrid_medium", "v4_hybrid_medium", 1.0, False, 11_074_648, 941.7, {
        "e200_r256_in12k_ft_in1k": _timm_v4("hybrid_medium.e200_r256_in12k_ft_in1k", 256, 0.95, (320, 1.0)),
        "ix_e550_r256_in1k": _timm_v4("hybrid_medium.ix_e550_r256_in1k", 256, 0.95, (320, 1.0)),
        "ix_e550_r384_in1k": _timm_v4("hybrid_medium.ix_e550_r384_in1k", 384, 0.95, (448, 1.0)),
        "e500_r224_in1k": _timm_v4("hybrid_medium.e500_r224_in1k", 224, 0.95, (256, 1.0)),
    }, (Reference("MobileNetV4 paper, ImageNet-1k at 256 px", 80.7, 10.5e6, 1200),
        Reference("timm mobilenetv4_hybrid_medium", None, 11_074_648, 941.7))),
    Entry("mbv4_hybrid_large", "v4_hybrid_large", 1.0, False, 37_764_624, 2510.2, {
        "ix_e600_r384_in1k": _timm_v4("hybrid_large.ix_e600_r384_in1k", 384, 0.95, (448, 1.0)),
        "e600_r384_in1k": _timm_v4("hybrid_large.e600_r384_in1k", 384, 0.95, (448, 1.0)),
    }, (Reference("MobileNetV4 paper, ImageNet-1k at 384 px", 83.4, 35.9e6, 7200),
        Reference("timm mobilenetv4_hybrid_large", None, 37_764_624, 2510.2))),
)
ENTRIES = {entry.name: entry for entry in MODELS}

default_cfgs = generate_default_cfgs({
    f"{entry.name}.{tag}": cfg for entry in MODELS for tag, cfg in (entry.weights or {"untrained": _cfg()}).items()
})

# timm's spellings of our arguments (timm's EfficientNet / MobileNetV3 builders read bn_eps and bn_momentum)
TIMM_SPELLINGS = {"bn_eps": "norm_eps", "bn_momentum": "norm_momentum"}
# what timm.create_model may pass besides the model's own arguments (not those _build sets itself)
_BUILDER_ARGS = {name for name, p in inspect.signature(build_model_with_cfg).parameters.items()
                 if p.kind is not p.VAR_KEYWORD} | {"features_only", "out_indices", "feature_cls", "pruned"}
_VALID_ARGS = sorted((set(inspect.signature(MobileNet).parameters) | _BUILDER_ARGS | set(TIMM_SPELLINGS)) - {
    "arch", "width", "model_cls", "variant", "pretrained", "pretrained_filter_fn", "feature_cfg", "model_cfg"})


def _build(entry: Entry, pretrained: bool = False, **kwargs) -> MobileNet:
    unknown = sorted(set(kwargs) - set(_VALID_ARGS))
    if unknown:
        raise UnknownArgument(f"{entry.name}: unknown argument(s) {', '.join(unknown)}; valid: "
                              f"{', '.join(_VALID_ARGS)}")
    for timm_name, name in TIMM_SPELLINGS.items():
        if timm_name in kwargs:
            if name in kwargs:
                raise UnknownArgument(f"{entry.name}: {timm_name} is timm's spelling of {name}; pass only {name}")
            kwargs[name] = kwargs.pop(timm_name)
    file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if pretrained and file and not os.path.isfile(file):
        raise FileNotFoundError(f"{entry.name}: pretrained file not found: {file}")
    if pretrained and not file and not entry.weights and not kwargs.get("pretrained_cfg"):
        raise WeightsUnavailable(f"{entry.name} has no published weights; pass {{alternative}}",
                                 "a local file with pretrained_cfg_overlay=dict(file=PATH), or pretrained=False")
    kwargs.setdefault("reduced_tail", entry.reduced_tail)
    try:
        return build_model_with_cfg(
            MobileNet, entry.name, pretrained, pretrained_filter_fn=convert,
            feature_cfg=dict(feature_cls="getter"), arch=entry.arch, width=entry.width, **kwargs)
    except CheckpointError as error:
        raise CheckpointError(f"{entry.name}: checkpoint {file or 'download'} does not fit: {error}") from None
    except Exception as error:
        if pretrained and file:
            read_checkpoint(file)  # a clear error if the file is what failed
        elif pretrained and isinstance(error, OSError):
            file, folder = _download_source(entry, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
            raise WeightsUnavailable.offline(entry.name, file, folder, type(error).__name__,
                                             "pretrained_cfg_overlay=dict(file=PATH)") from None
        raise


def _download_source(entry: Entry, pretrained_cfg, overlay: dict | None) -> tuple[str, str]:
    """The published file of a model's weights and the cache folder it is looked for in."""
    cfg = {**resolve_pretrained_cfg(entry.name, pretrained_cfg=pretrained_cfg).to_dict(), **(overlay or {})}
    if cfg.get("hf_hub_id"):
        return f"{cfg['hf_hub_id']} (Hugging Face Hub)", huggingface_hub.constants.HF_HUB_CACHE
    return os.path.basename(cfg["url"]), os.path.join(torch.hub.get_dir(), "checkpoints")


def _entrypoint(entry: Entry):
    def create(pretrained: bool = False, **kwargs) -> MobileNet:
        return _build(entry, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = entry.name
    create.__doc__ = f"MobileNet {entry.arch}, width {entry.width}{', reduced tail' if entry.reduced_tail else ''}."
    return create


for _entry in MODELS:
    globals()[_entry.name] = register_model(_entrypoint(_entry))


def list_models() -> list[str]:
    """Names this package registers into timm."""
    return [entry.name for entry in MODELS]


def check_name(name: str) -> str:
    base = name.split(".", 1)[0]
    if base not in ENTRIES:
        raise ArgumentError(f"Unknown model {name!r}.{did_you_mean(base, ENTRIES)} Available: {', '.join(ENTRIES)}")
    return name


def create_model(name: str, pretrained: bool = False, **kwargs):
    """``timm.create_model`` for this package's names, with a did-you-mean error for unknown ones."""
    return timm.create_model(check_name(name), pretrained=pretrained, **kwargs)
