"""The few blocks every MobileNet is made of."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torchvision.ops import SqueezeExcitation

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish}


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


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 bottleneck: 1x1 expand -> depthwise -> [SE] -> linear 1x1 project (+ residual).

    ``forward`` is split at the expansion output (``expand`` then ``finish``) so that feature taps
    can read it: that is where SSDLite attaches its first head.
    """

    def __init__(self, spec, norm=nn.BatchNorm2d, drop_path_rate: float = 0.0):
        super().__init__()
        conv = partial(ConvNormAct, norm=norm)
        exp = spec.expansion_channels
        self.expand = conv(spec.in_channels, exp, act=spec.act) if exp != spec.in_channels else nn.Identity()
        self.depthwise = conv(exp, exp, spec.kernel, spec.stride, spec.dilation, groups=exp, act=spec.act)
        self.se = (SqueezeExcitation(exp, spec.se_channels, scale_activation=nn.Hardsigmoid) if spec.se_channels
                   else nn.Identity())  # pool -> 1x1 -> ReLU -> 1x1 -> hard-sigmoid gate
        self.project = conv(exp, spec.out_channels, act=None)
        self.has_residual = spec.stride == 1 and spec.in_channels == spec.out_channels
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def finish(self, x: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(expanded)))
        return x + self.drop_path(out) if self.has_residual else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.expand(x))


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise 3x3 -> BN -> act -> 1x1 projection -> BN -> act; no expansion."""

    def __init__(self, spec, norm=nn.BatchNorm2d):
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
