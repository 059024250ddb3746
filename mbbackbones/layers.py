"""The few blocks every MobileNet is made of."""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import GELU, DropPath, LayerScale2d, MultiQueryAttention2d
from torch import nn
from torchvision.ops import SqueezeExcitation

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish, "gelu": GELU}  # timm's GELU: F.gelu


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> optional activation; 'same' padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 dilation: int = 1, groups: int = 1, act: str | None = "relu", norm=nn.BatchNorm2d):
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = norm(out_channels)
        if act is not None:
            self.act = ACTIVATIONS[act](inplace=True)


class ResidualBlock(nn.Module):
    """What the blocks with a residual branch share.

    ``forward`` is split at the expansion output (``expand`` then ``finish``) so that feature taps
    can read it: that is where SSDLite attaches its first head. ``residual`` adds the input back, through
    stochastic depth, where the block keeps the shape of its input.
    """

    def __init__(self, spec, drop_path_rate: float = 0.0):
        super().__init__()
        self.has_residual = spec.stride == 1 and spec.in_channels == spec.out_channels
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(out) if self.has_residual else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.expand(x))


class InvertedResidual(ResidualBlock):
    """MobileNetV2/V3 bottleneck: 1x1 expand -> depthwise -> [SE] -> linear 1x1 project (+ residual)."""

    def __init__(self, spec, norm=nn.BatchNorm2d, drop_path_rate: float = 0.0):
        super().__init__(spec, drop_path_rate)
        conv = partial(ConvNormAct, norm=norm)
        exp = spec.expansion_channels
        self.expand = conv(spec.in_channels, exp, act=spec.act) if exp != spec.in_channels else nn.Identity()
        self.depthwise = conv(exp, exp, spec.kernel, spec.stride, spec.dilation, groups=exp, act=spec.act)
        self.se = (SqueezeExcitation(exp, spec.se_channels, scale_activation=nn.Hardsigmoid) if spec.se_channels
                   else nn.Identity())  # pool -> 1x1 -> ReLU -> 1x1 -> hard-sigmoid gate
        self.project = conv(exp, spec.out_channels, act=None)

    def finish(self, x: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.project(self.se(self.depthwise(expanded))))


class UniversalInvertedBottleneck(ResidualBlock):
    """MobileNetV4's UIB: [start depthwise] -> 1x1 expand -> [middle depthwise] -> linear 1x1 project -> [layer
    scale] (+ residual). Both depthwise convs: ExtraDW; the middle one: IB; the start one: ConvNext; none: FFN.

    The middle depthwise strides, else the start one. ``expand`` holds the start depthwise and the 1x1 expansion,
    so that the expansion tap reads the expanded features (timm's ``pw_exp`` output).
    """

    def __init__(self, spec, norm=nn.BatchNorm2d, drop_path_rate: float = 0.0):
        super().__init__(spec, drop_path_rate)
        conv = partial(ConvNormAct, norm=norm)
        channels, exp = spec.in_channels, spec.expansion_channels
        start = [("start", conv(channels, channels, spec.start_kernel, 1 if spec.kernel else spec.stride,
                                spec.dilation, groups=channels, act=None))] if spec.start_kernel else []
        # expand.start (if any), then the 1x1 conv's own conv / bn / act: the same keys as InvertedResidual.expand
        self.expand = nn.Sequential(OrderedDict([*start, *conv(channels, exp, act=spec.act).named_children()]))
        self.depthwise = (conv(exp, exp, spec.kernel, spec.stride, spec.dilation, groups=exp, act=spec.act)
                          if spec.kernel else nn.Identity())
        self.project = conv(exp, spec.out_channels, act=None)
        self.layer_scale = LayerScale2d(spec.out_channels, spec.layer_scale) if spec.layer_scale else nn.Identity()

    def finish(self, x: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.layer_scale(self.project(self.depthwise(expanded))))


class FusedInvertedBottleneck(ResidualBlock):
    """Fused IB (MobileNetV4, timm's EdgeResidual): a full kxk conv expands and strides -> linear 1x1 project
    (+ residual). The expansion is the strided conv itself, so the expansion tap reads the block's input."""

    def __init__(self, spec, norm=nn.BatchNorm2d, drop_path_rate: float = 0.0):
        super().__init__(spec, drop_path_rate)
        conv = partial(ConvNormAct, norm=norm)
        exp = spec.expansion_channels
        self.expand = nn.Identity()
        self.fused = conv(spec.in_channels, exp, spec.kernel, spec.stride, spec.dilation, act=spec.act)
        self.project = conv(exp, spec.out_channels, act=None)

    def finish(self, x: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.project(self.fused(expanded)))


class MobileMQA(ResidualBlock):
    """MobileNetV4's Mobile MQA: BN -> multi-query attention -> layer scale (+ residual); nothing expands.

    The attention is timm's ``MultiQueryAttention2d``: ``heads`` query heads share one key and one value head; with
    ``kv_stride`` 2, a strided depthwise conv and BN down-sample the keys and values. Dilated (output stride 8),
    that conv is dilated as the other depthwise convs and keeps its stride: the keys and values come from a grid
    twice as dense, with the same receptive field.
    """

    def __init__(self, spec, norm=nn.BatchNorm2d, drop_path_rate: float = 0.0):
        super().__init__(spec, drop_path_rate)
        self.expand = nn.Identity()
        self.norm = norm(spec.in_channels)
        self.attn = MultiQueryAttention2d(spec.in_channels, spec.out_channels, spec.heads, spec.key_dim, spec.key_dim,
                                          kv_stride=spec.kv_stride, dw_kernel_size=spec.kernel,
                                          dilation=spec.dilation, norm_layer=norm)
        self.layer_scale = LayerScale2d(spec.out_channels, spec.layer_scale) if spec.layer_scale else nn.Identity()

    def finish(self, x: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.layer_scale(self.attn(self.norm(expanded))))


class ConvBlock(nn.Module):
    """A full conv -> BN -> activation as a block (MobileNetV4-Conv-S's first rows); no residual branch. Nothing
    expands before its conv, so the expansion tap reads its input. (``drop_path_rate``: unused, no residual.)"""

    def __init__(self, spec, norm=nn.BatchNorm2d, drop_path_rate: float = 0.0):
        super().__init__()
        self.expand = nn.Identity()
        self.conv = ConvNormAct(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.dilation,
                                act=spec.act, norm=norm)

    def finish(self, x: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        return self.conv(expanded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.expand(x))  # an identity, called so that an FX graph has the expansion tap


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise 3x3 -> BN -> act -> 1x1 projection -> BN -> act; no expansion, no residual
    (``drop_path_rate``: unused)."""

    def __init__(self, spec, norm=nn.BatchNorm2d, drop_path_rate: float = 0.0):
        super().__init__()
        conv = partial(ConvNormAct, norm=norm, act=spec.act)
        channels = spec.in_channels
        self.expand = nn.Identity()
        self.depthwise = conv(channels, channels, spec.kernel, spec.stride, spec.dilation, groups=channels)
        self.project = conv(channels, spec.out_channels)

    def finish(self, x: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        return self.project(self.depthwise(expanded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.expand(x))  # an identity, called so that an FX graph has the expansion tap


class PointwiseBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the channels of [B, C] as of [B, C, H, W]: the norm after the head's hidden PointwiseLinear
    (MobileNetV4's head), pooled or not. ``F.batch_norm`` normalises dim 1 of either."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


BLOCKS = {"separable": DepthwiseSeparable, "inverted": InvertedResidual, "uib": UniversalInvertedBottleneck,
          "fused": FusedInvertedBottleneck, "mqa": MobileMQA, "conv": ConvBlock}


class PointwiseLinear(nn.Linear):
    """An ``nn.Linear`` over the channels at every position: [B, C, H, W] -> [B, out, H, W], a 1x1 conv.

    The layout of the classifier head's layers when the model does not pool (timm's ``global_pool=''``, whose 1x1
    ``conv_head`` acts at every position). Its weight is Linear's, so checkpoints load into either layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


def head_linear(in_features: int, out_features: int, per_position: bool, **factory) -> nn.Linear:
    """A head layer in the layout the pooling decides: ``nn.Linear`` on [B, C], or ``PointwiseLinear`` on maps.

    The layout is chosen when the head is built (and by ``relayout`` when the pooling changes), not from the input's
    rank at every call: a branch on ``x.dim()`` is control flow on the input, which ``torch.fx`` cannot trace.
    """
    return (PointwiseLinear if per_position else nn.Linear)(in_features, out_features, **factory)


def relayout(linear: nn.Linear, per_position: bool) -> nn.Linear:
    """``linear`` in the layout ``per_position`` asks for (itself if it has it); the parameters are shared, not
    copied."""
    if isinstance(linear, PointwiseLinear) == per_position:
        return linear
    swapped = head_linear(linear.in_features, linear.out_features, per_position, bias=linear.bias is not None,
                          device="meta")
    swapped.weight, swapped.bias = linear.weight, linear.bias
    return swapped.train(linear.training)
