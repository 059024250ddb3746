"""LR-ASPP semantic segmentation (MobileNetV3 paper §6.3) on any registered backbone."""
from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from mbbackbones.checkpoint import CheckpointError, convert
from mbbackbones.choices import ArgumentError, check_choice
from mbbackbones.layers import ConvNormAct

from ..backbone import Normalize, create_backbone

POOLINGS = ("global", "large_kernel")
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


class LRASPP(nn.Module):
    """Lite R-ASPP: normalised images [B, 3, H, W] -> class logits [B, num_classes, H, W].

    As torchvision's, ``forward`` takes images normalised with the statistics of the backbone's weights;
    ``model.normalize`` turns images in [0, 1] (or uint8) into them.

    The low branch reads the backbone's stride-8 'downsample' tap (the output of the first block at
    stride 8, as torchvision's ``lraspp_mobilenet_v3_large``), the high branch its last conv (C5, at
    ``output_stride``).

    Args:
        backbone: registered mbbackbones name.
        num_classes: output classes (19 for Cityscapes train ids).
        pretrained_backbone: True (the backbone's ImageNet weights) or a local file with backbone weights.
        inter_channels: width of the high branch (the paper's 128 filters).
        pooling: "global" (adaptive average pool to 1x1, as torchvision) or "large_kernel"
            (the paper's average pool, gate upsampled bilinearly).
        pool_kernel, pool_stride: the "large_kernel" pool's (default: the paper's 49x49, stride (16, 20)).
        output_stride: backbone output stride (8, 16 or 32); the stages past it are dilated.
        backbone_kwargs: passed to the backbone; its BatchNorm defaults to the architecture's
            (V3: torchvision's eps 1e-3, momentum 0.01).
    """

    task = "segmentation"
    class_layers = ("head.low_classifier.", "head.high_classifier.")  # state-dict prefixes that follow num_classes

    def __init__(self, backbone: str = "mbv3_large", num_classes: int = 19, pretrained_backbone: str | None = None,
                 inter_channels: int = 128, pooling: str = "global", pool_kernel: tuple[int, int] | None = None,
                 pool_stride: tuple[int, int] | None = None, output_stride: int = 16, **backbone_kwargs):
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        pool_sizes = {name: value for name, value in (("kernel_size", pool_kernel), ("stride", pool_stride))
                      if value is not None}
        if pooling == "global" and pool_sizes:
            raise ArgumentError("pool_kernel and pool_stride size the pooling='large_kernel' pool; with "
                             "pooling='global' they have no effect: drop them or set pooling='large_kernel'")
        self.backbone = create_backbone(backbone, pretrained_backbone, output_stride=output_stride,
                                        feature_location="downsample", out_indices=(2, 4), **backbone_kwargs)
        low_channels, high_channels = self.backbone.feature_info.channels()
        pool = nn.AdaptiveAvgPool2d(1) if pooling == "global" else LargeKernelAvgPool(**pool_sizes)
        self.head = LRASPPHead(low_channels, high_channels, num_classes, inter_channels, pool)
        self.num_classes = num_classes
        self.normalize = Normalize(self.backbone.pretrained_cfg["mean"], self.backbone.pretrained_cfg["std"])

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        assert isinstance(features, list)  # narrows timm's Union return type for TorchScript
        return F.interpolate(self.head(features[0], features[1]), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)

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
