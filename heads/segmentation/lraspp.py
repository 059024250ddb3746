"""LR-ASPP semantic segmentation (MobileNetV3 paper §6.3) on any registered backbone."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from mbbackbones.checkpoint import CheckpointError, convert
from mbbackbones.choices import ArgumentError, check_choice
from mbbackbones.layers import ConvNormAct

from ..backbone import Normalize, plug_backbone
from ..deploy.tflite_metadata import AppMetadata, OutputTensor
from ..results import Segmentation
from ..task_model import Check, TaskModel, as_size

POOLINGS = ("global", "large_kernel")
MAX_PIXELS = 2048 * 2048  # larger images are segmented at this size and the mask scaled back
EXPORT_SIZE = (512, 1024)
FP32_LOGIT_TOLERANCE = 1e-4
FP32_MASK_AGREEMENT = 0.999  # pixels with the same class; arg-max ties of near-equal logits may differ
INT8_MASK_AGREEMENT = 0.9
# torchvision LRASPPHead layers -> ours
TORCHVISION_HEAD = {"classifier.cbr.0": "head.high.conv", "classifier.cbr.1": "head.high.bn",
                    "classifier.scale.1": "head.gate.conv", "classifier.low_classifier": "head.low_classifier",
                    "classifier.high_classifier": "head.high_classifier"}


class LargeKernelAvgPool(nn.Module):
    """The paper's average pool (49x49, stride (16, 20) at 1024x2048 input, output stride 16).

    Along an axis shorter than the kernel, the kernel shrinks to the feature map: at small inputs
    this becomes global pooling instead of failing. ONNX export fixes the kernel at the export size.
    """

    def __init__(self, kernel_size: tuple[int, int] = (49, 49), stride: tuple[int, int] = (16, 20)):
        super().__init__()
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.stride = (int(stride[0]), int(stride[1]))

    def forward(self, x: Tensor) -> Tensor:
        kernel = [min(self.kernel_size[0], x.shape[-2]), min(self.kernel_size[1], x.shape[-1])]
        return F.avg_pool2d(x, kernel, list(self.stride))


class PoolingGate(nn.Module):
    """Pool -> 1x1 conv -> sigmoid: a per-channel (or coarse spatial) gate, resized to the input's size."""

    def __init__(self, in_channels: int, out_channels: int, pool: nn.Module):
        super().__init__()
        self.pool = pool
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.act = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        gate = self.act(self.conv(self.pool(x)))
        if gate.shape[-2] * gate.shape[-1] == 1:
            return gate  # broadcasts
        return F.interpolate(gate, size=x.shape[-2:], mode="bilinear", align_corners=False)


class LRASPPHead(nn.Module):
    """Gated high-level branch upsampled onto the low-level map; class logits at the low resolution."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int,
                 pool: nn.Module):
        super().__init__()
        self.high = ConvNormAct(high_channels, inter_channels, act="relu")
        self.gate = PoolingGate(high_channels, inter_channels, pool)
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        x = self.high(high) * self.gate(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPP(TaskModel):
    """Lite R-ASPP: normalised images [B, 3, H, W] -> class logits [B, num_classes, H, W].

    As torchvision's, ``forward`` takes images normalised with the statistics of the backbone's weights;
    ``model.normalize`` turns images in [0, 1] (or uint8) into them, and ``forward_batch`` takes those images.

    The low branch reads the backbone's stride-8 'downsample' tap (the output of the first block at
    stride 8, as torchvision's ``lraspp_mobilenet_v3_large``), the high branch its last conv (C5, at
    ``output_stride``).

    Args:
        backbone: a registered mbbackbones name (taps: 'downsample' at strides 8 and ``output_stride``), or a module
            with timm's ``features_only`` contract returning the low and the high map, used as it is (its
            ``pretrained_cfg`` mean and std, else ImageNet's, normalise the input).
        num_classes: output classes (19 for Cityscapes train ids).
        inter_channels: width of the high branch (the paper's 128 filters).
        pooling: "global" (adaptive average pool to 1x1, as torchvision) or "large_kernel"
            (the paper's average pool, gate upsampled bilinearly).
        pool_kernel, pool_stride: the "large_kernel" pool's (default: the paper's 49x49, stride (16, 20)).
        output_stride: backbone output stride (8, 16 or 32); the stages past it are dilated.
        backbone_kwargs: passed to the backbone; its BatchNorm defaults to the architecture's
            (V3: torchvision's eps 1e-3, momentum 0.01).
    """

    task = "segmentation"
    result_type = Segmentation
    output_names = ("logits",)
    final_output_names = ("mask",)
    app_output_names = ("class_logits",)
    class_layers = ("head.low_classifier.", "head.high_classifier.")

    def __init__(self, backbone: str | nn.Module = "mbv3_large", num_classes: int = 19, inter_channels: int = 128,
                 pooling: str = "global", pool_kernel: tuple[int, int] | None = None,
                 pool_stride: tuple[int, int] | None = None, output_stride: int = 16, **backbone_kwargs):
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        pool_sizes = {name: value for name, value in (("kernel_size", pool_kernel), ("stride", pool_stride))
                      if value is not None}
        if pooling == "global" and pool_sizes:
            raise ArgumentError("pool_kernel and pool_stride size the pooling='large_kernel' pool; with "
                             "pooling='global' they have no effect: drop them or set pooling='large_kernel'")
        self.backbone_args = dict(output_stride=output_stride, feature_location="downsample", out_indices=(2, 4),
                                  **backbone_kwargs)
        self.backbone = plug_backbone(backbone, self.backbone_args, backbone_kwargs)
        if len(self.backbone.feature_info.channels()) != 2:
            raise ArgumentError(f"LR-ASPP reads two feature maps (low, high); the backbone gives "
                                f"{len(self.backbone.feature_info.channels())}: select two with out_indices")
        low_channels, high_channels = self.backbone.feature_info.channels()
        pool = nn.AdaptiveAvgPool2d(1) if pooling == "global" else LargeKernelAvgPool(**pool_sizes)
        self.head = LRASPPHead(low_channels, high_channels, num_classes, inter_channels, pool)
        self.num_classes = num_classes
        statistics = getattr(self.backbone, "pretrained_cfg", {})
        self.normalize = Normalize(statistics.get("mean", IMAGENET_DEFAULT_MEAN),
                                   statistics.get("std", IMAGENET_DEFAULT_STD))

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        assert isinstance(features, list)  # narrows timm's Union return type for TorchScript
        return F.interpolate(self.head(features[0], features[1]), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)

    def forward_batch(self, images: Tensor) -> tuple[Tensor]:
        """Images [B, 3, H, W] (uint8, or float in [0, 1]) -> logits [B, num_classes, H, W]."""
        return (self(self.normalize(images)),)

    def forward_postprocessed(self, images: Tensor, nms_op: bool = True) -> tuple[Tensor]:
        """RGB uint8 images [B, H, W, 3] -> the class of each pixel, uint8 [B, H, W]: the arg-max of the logits
        upsampled to the input size (bilinear), as :meth:`results` finds it. (The arg-max at stride 8, upsampled
        nearest, loses 3.9 mIoU on the built-in val set.)"""
        return (self.forward_batch(images.permute(0, 3, 1, 2))[0].argmax(1).to(torch.uint8),)

    def forward_app(self, images: Tensor, nms_op: bool = True) -> tuple[Tensor]:
        """RGB uint8 images [B, H, W, 3] -> logits [B, H, W, num_classes] at the input size, channels last: what
        MediaPipe's ``ImageSegmenter`` reads (its metadata says to apply softmax for the confidences)."""
        return (self.forward_batch(images.permute(0, 3, 1, 2))[0].permute(0, 2, 3, 1),)

    def app_metadata(self, meta: dict) -> AppMetadata:
        logits = OutputTensor("segmentation_masks", "Class logits of each pixel at the input size (softmax: the "
                              "confidences)", content="mask", axes=(1, 2), labels=tuple(meta["categories"]))
        return AppMetadata("ImageSegmenter", f"{meta.get('name') or 'LR-ASPP'}: the class of each pixel",
                           (logits,), activation="softmax")

    def metadata(self) -> dict:
        return dict(categories=[f"class {i}" for i in range(self.num_classes)], input_size=None,
                    feature_location=getattr(self.backbone, "feature_location", None))

    def export_size(self, size: int | Sequence[int] | None = None) -> tuple[int, int]:
        return as_size(EXPORT_SIZE if size is None else size)

    def dynamic_size(self) -> bool:
        """Any size, except with the large-kernel pooling (its kernel is fixed at the export size)."""
        return not isinstance(self.head.gate.pool, LargeKernelAvgPool)

    @staticmethod
    def input_size(meta: dict, height: int, width: int) -> tuple[int, int]:
        """The image's own size; the shorter side at ``meta["resize"]`` where the weights were trained so (the
        published VOC weights: 520), and at most :data:`MAX_PIXELS` pixels; a fixed-size file's own size."""
        if meta.get("input_size"):
            return tuple(meta["input_size"])
        if meta.get("resize"):
            scale = meta["resize"] / min(height, width)
            return round(height * scale), round(width * scale)
        if height * width > MAX_PIXELS:
            scale = (MAX_PIXELS / (height * width)) ** 0.5
            return int(height * scale), int(width * scale)
        return height, width

    @staticmethod
    def results(outputs: Sequence[Tensor], meta: dict, input_size: Sequence[int],
                original_size: Sequence[int]) -> dict:
        """The class of each pixel (:func:`class_map`, then nearest to the original size)."""
        mask = class_map(outputs[0], meta)
        if tuple(mask.shape) != tuple(original_size):
            mask = F.interpolate(mask[None, None], size=tuple(original_size), mode="nearest-exact")[0, 0]
        return {"mask": mask.cpu().numpy()}

    @staticmethod
    def agreement(expected: Sequence[Tensor], got: Sequence[Tensor], meta: dict, int8: bool) -> list[Check]:
        """fp32 logits (raw, or channels last for apps): the largest difference; fp32 masks (the post-processing
        inside): the share of pixels of the same class (near-equal logits may swap); INT8: that share."""
        if not int8 and expected[0].is_floating_point():
            return [Check("max |logits difference|", (got[0] - expected[0]).abs().max().item(), FP32_LOGIT_TOLERANCE,
                          True)]
        same = (class_map(got[0], meta) == class_map(expected[0], meta)).float().mean().item()
        return [Check("pixels of the same class", same, INT8_MASK_AGREEMENT if int8 else FP32_MASK_AGREEMENT, False)]

    def convert_checkpoint(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Our state dict as is, or torchvision's ``lraspp_mobilenet_v3_large`` one renamed to ours."""
        if "backbone.model.stem.conv.weight" in state_dict:
            return dict(state_dict)
        if "backbone.0.0.weight" not in state_dict:
            raise CheckpointError(f"not an LR-ASPP state dict (first key {next(iter(state_dict), None)!r})")
        features = {f"features.{k[len('backbone.'):]}": v for k, v in state_dict.items() if k.startswith("backbone.")}
        result = {f"backbone.model.{k}": v for k, v in convert(features, self.backbone.model).items()}
        for key, value in state_dict.items():
            if key.startswith("backbone."):
                continue
            layer, param = key.rsplit(".", 1)
            if layer not in TORCHVISION_HEAD:
                raise CheckpointError(f"torchvision LR-ASPP checkpoint has an unknown tensor {key!r}")
            result[f"{TORCHVISION_HEAD[layer]}.{param}"] = value
        return result


def class_map(output: Tensor, meta: dict) -> Tensor:
    """The class of each pixel, uint8, from an output of the kind ``meta`` says (an image's or a batch's): logits
    [..., C, H, W] (raw), the mask itself (the post-processing inside) or channels-last logits [..., H, W, C]
    (:meth:`LRASPP.forward_app`)."""
    if meta.get("outputs") == list(LRASPP.app_output_names):
        return output.argmax(-1).to(torch.uint8)
    return output if meta.get("postprocessed") else output.argmax(-3).to(torch.uint8)
