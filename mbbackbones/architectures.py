"""MobileNet V1, V2, V3 and V4 as tables, and the one function that sizes them.

Each ``Row`` is one block, with the columns of the MobileNetV3 paper's Tables 1-2:
kernel, expansion ("exp size": channels the depthwise conv sees), out, SE, activation, stride.
Each ``V4Row`` is one MobileNetV4 block, with the columns of the MobileNetV4 paper's architecture tables.
Width, reduced tail and output stride never edit a table: ``resolve`` applies them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from timm.layers import make_divisible


class Row(NamedTuple):
    kernel: int
    expansion: int
    out: int
    se: bool
    act: str
    stride: int


# MobileNetV3-Large, paper Table 1 (input 224: the stem is a 3x3 stride-2 conv with 16 channels)
V3_LARGE = (
    Row(3, 16, 16, False, "relu", 1),
    Row(3, 64, 24, False, "relu", 2),
    Row(3, 72, 24, False, "relu", 1),
    Row(5, 72, 40, True, "relu", 2),
    Row(5, 120, 40, True, "relu", 1),
    Row(5, 120, 40, True, "relu", 1),
    Row(3, 240, 80, False, "hswish", 2),
    Row(3, 200, 80, False, "hswish", 1),
    Row(3, 184, 80, False, "hswish", 1),
    Row(3, 184, 80, False, "hswish", 1),
    Row(3, 480, 112, True, "hswish", 1),
    Row(3, 672, 112, True, "hswish", 1),
    Row(5, 672, 160, True, "hswish", 2),
    Row(5, 960, 160, True, "hswish", 1),
    Row(5, 960, 160, True, "hswish", 1),
)

# MobileNetV3-Small, paper Table 2
V3_SMALL = (
    Row(3, 16, 16, True, "relu", 2),
    Row(3, 72, 24, False, "relu", 2),
    Row(3, 88, 24, False, "relu", 1),
    Row(5, 96, 40, True, "hswish", 2),
    Row(5, 240, 40, True, "hswish", 1),
    Row(5, 240, 40, True, "hswish", 1),
    Row(5, 120, 48, True, "hswish", 1),
    Row(5, 144, 48, True, "hswish", 1),
    Row(5, 288, 96, True, "hswish", 2),
    Row(5, 576, 96, True, "hswish", 1),
    Row(5, 576, 96, True, "hswish", 1),
)


def bottleneck_rows(stem: int, table) -> tuple[Row, ...]:
    """MobileNetV2's (t, c, n, s) table -> one Row per block (expansion = t * input channels)."""
    rows, in_channels = [], stem
    for t, c, n, s in table:
        for i in range(n):
            rows.append(Row(3, t * in_channels, c, False, "relu6", s if i == 0 else 1))
            in_channels = c
    return tuple(rows)


# MobileNetV2, paper Table 2: t (expansion factor), c (out), n (repeats), s (stride of the first)
V2 = bottleneck_rows(32, [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
])

# MobileNetV1, paper Table 1: depthwise-separable blocks (expansion = input channels: none)
V1 = (
    Row(3, 32, 64, False, "relu6", 1),
    Row(3, 64, 128, False, "relu6", 2),
    Row(3, 128, 128, False, "relu6", 1),
    Row(3, 128, 256, False, "relu6", 2),
    Row(3, 256, 256, False, "relu6", 1),
    Row(3, 256, 512, False, "relu6", 2),
    *[Row(3, 512, 512, False, "relu6", 1)] * 5,
    Row(3, 512, 1024, False, "relu6", 2),
    Row(3, 1024, 1024, False, "relu6", 1),
)


class V4Row(NamedTuple):
    """One MobileNetV4 block: the paper's columns (block, DW K1, DW K2, expanded dim, output dim, stride), then the
    Mobile MQA's own (heads, key dim, key/value stride).

    ``block`` is "uib" (universal inverted bottleneck), "fused" (fused IB: a full kxk conv expands, a 1x1 projects),
    "conv" (a full conv with BN and activation, as timm builds the small model's first rows) or "mqa" (Mobile MQA).
    For a UIB, ``start`` and ``middle`` are the kernels of its depthwise convs before and after the 1x1 expansion,
    0 = absent: both = ExtraDW, middle only = IB, start only = ConvNext, neither = FFN. Conv and fused rows keep
    their kernel in ``middle`` (the paper's DW K2 column), Mobile MQA the kernel of its key/value down-sampling.
    ``expansion`` 0 = none (conv and MQA rows). Every block uses the architecture's activation.
    """

    block: str
    start: int
    middle: int
    expansion: int
    out: int
    stride: int
    heads: int = 0
    key_dim: int = 0
    kv_stride: int = 1


def uib(start: int, middle: int, expansion: int, out: int, stride: int) -> V4Row:
    return V4Row("uib", start, middle, expansion, out, stride)


def fused(kernel: int, expansion: int, out: int, stride: int) -> V4Row:
    return V4Row("fused", 0, kernel, expansion, out, stride)


def conv(kernel: int, out: int, stride: int) -> V4Row:
    return V4Row("conv", 0, kernel, 0, out, stride)


def mqa(heads: int, key_dim: int, kv_stride: int, out: int) -> V4Row:
    """``heads`` queries of ``key_dim`` channels share one key and one value head, those down-sampled by a 3x3
    stride-``kv_stride`` depthwise conv (1: none)."""
    return V4Row("mqa", 0, 3, 0, out, 1, heads, key_dim, kv_stride)


# MobileNetV4 tables, one row per block as timm builds them (mobilenetv4_*): the paper's appendix tables (the paper
# names the blocks of the small model's first rows fused IBs; timm and the TensorFlow reference build them as a 3x3
# and a 1x1 conv, each with BN and ReLU). The stem is a 3x3 stride-2 conv, C5 a 1x1 conv to 960 channels.
# (Below width 1, timm keeps V4's stem at the table's width; ``resolve`` narrows it, as for V1-V3.)
# uib(start dw kernel, middle dw kernel, expansion, out, stride); fused(kernel, expansion, out, stride);
# conv(kernel, out, stride); mqa(heads, key dim, key/value stride, out)

# MobileNetV4-Conv-S; stem 32
V4_CONV_SMALL = (
    conv(3, 32, 2),
    conv(1, 32, 1),
    conv(3, 96, 2),
    conv(1, 64, 1),
    uib(5, 5, 192, 96, 2),
    *[uib(0, 3, 192, 96, 1)] * 4,
    uib(3, 0, 384, 96, 1),
    uib(3, 3, 576, 128, 2),
    uib(5, 5, 512, 128, 1),
    uib(0, 5, 512, 128, 1),
    uib(0, 5, 384, 128, 1),
    *[uib(0, 3, 512, 128, 1)] * 2,
)

# MobileNetV4-Conv-M; stem 32
V4_CONV_MEDIUM = (
    fused(3, 128, 48, 2),
    uib(3, 5, 192, 80, 2),
    uib(3, 3, 160, 80, 1),
    uib(3, 5, 480, 160, 2),
    *[uib(3, 3, 640, 160, 1)] * 2,
    uib(3, 5, 640, 160, 1),
    uib(3, 3, 640, 160, 1),
    uib(3, 0, 640, 160, 1),
    uib(0, 0, 320, 160, 1),
    uib(3, 0, 640, 160, 1),
    uib(5, 5, 960, 256, 2),
    uib(5, 5, 1024, 256, 1),
    *[uib(3, 5, 1024, 256, 1)] * 2,
    uib(0, 0, 1024, 256, 1),
    uib(3, 0, 1024, 256, 1),
    uib(3, 5, 512, 256, 1),
    uib(5, 5, 1024, 256, 1),
    *[uib(0, 0, 1024, 256, 1)] * 2,
    uib(5, 0, 512, 256, 1),
)

# MobileNetV4-Conv-L and Hybrid-L share these rows: strides 4 and 8 and the start of stride 16; the start of
# stride 32
V4_LARGE_TO_16 = (
    fused(3, 96, 48, 2),
    uib(3, 5, 192, 96, 2),
    uib(3, 3, 384, 96, 1),
    uib(3, 5, 384, 192, 2),
    *[uib(3, 3, 768, 192, 1)] * 3,
    uib(3, 5, 768, 192, 1),
)
V4_LARGE_32 = (
    uib(5, 5, 768, 512, 2),
    *[uib(5, 5, 2048, 512, 1)] * 3,
    uib(5, 0, 2048, 512, 1),
    uib(5, 3, 2048, 512, 1),
    *[uib(5, 0, 2048, 512, 1)] * 2,
    uib(5, 3, 2048, 512, 1),
    uib(5, 5, 2048, 512, 1),
)

# MobileNetV4-Conv-L; stem 24
V4_CONV_LARGE = (
    *V4_LARGE_TO_16,
    *[uib(5, 3, 768, 192, 1)] * 5,
    uib(3, 0, 768, 192, 1),
    *V4_LARGE_32,
    *[uib(5, 0, 2048, 512, 1)] * 3,
)

# MobileNetV4-Hybrid-M: Mobile MQA (4 heads of 64; keys and values down-sampled by 2 at stride 16) between the
# UIBs of strides 16 and 32; stem 32
V4_HYBRID_MEDIUM = (
    fused(3, 128, 48, 2),
    uib(3, 5, 192, 80, 2),
    uib(3, 3, 160, 80, 1),
    uib(3, 5, 480, 160, 2),
    uib(0, 0, 320, 160, 1),
    uib(3, 3, 640, 160, 1),
    uib(3, 5, 640, 160, 1),
    mqa(4, 64, 2, 160),
    uib(3, 3, 640, 160, 1),
    mqa(4, 64, 2, 160),
    uib(3, 0, 640, 160, 1),
    mqa(4, 64, 2, 160),
    uib(3, 3, 640, 160, 1),
    mqa(4, 64, 2, 160),
    uib(3, 0, 640, 160, 1),
    uib(5, 5, 960, 256, 2),
    uib(5, 5, 1024, 256, 1),
    *[uib(3, 5, 1024, 256, 1)] * 2,
    uib(0, 0, 512, 256, 1),
    uib(3, 5, 512, 256, 1),
    uib(0, 0, 512, 256, 1),
    uib(0, 0, 1024, 256, 1),
    mqa(4, 64, 1, 256),
    uib(3, 0, 1024, 256, 1),
    mqa(4, 64, 1, 256),
    uib(5, 5, 1024, 256, 1),
    mqa(4, 64, 1, 256),
    uib(5, 0, 1024, 256, 1),
    mqa(4, 64, 1, 256),
    uib(5, 0, 1024, 256, 1),
)

# MobileNetV4-Hybrid-L: Conv-L's shared rows, then Mobile MQA (8 heads of 48 at stride 16, keys and values
# down-sampled by 2; 8 heads of 64 at stride 32) between UIBs; stem 24, GELU
V4_HYBRID_LARGE = (
    *V4_LARGE_TO_16,
    *[uib(5, 3, 768, 192, 1)] * 2,
    *[mqa(8, 48, 2, 192), uib(5, 3, 768, 192, 1)] * 3,
    mqa(8, 48, 2, 192),
    uib(3, 0, 768, 192, 1),
    *V4_LARGE_32,
    *[mqa(8, 64, 1, 512), uib(5, 0, 2048, 512, 1)] * 4,
)


@dataclass(frozen=True)
class Arch:
    """Everything around the block table."""

    family: str                 # "v1" | "v2" | "v3" | "v4": picks the block types
    rows: tuple[Row, ...] | tuple[V4Row, ...]
    stem: int                   # channels of the 3x3 stride-2 stem conv
    act: str                    # activation of the stem, the last conv and the head
    last_conv: int | None       # 1x1 conv after the blocks (C5); None: the last block is C5
    last_conv_narrows: bool     # False: width < 1 keeps the table's last conv (V2's 1280)
    head_hidden: int | None     # Linear between pooling and classifier (V3's 1280 / 1024, V4's 1280)
    norm_eps: float
    norm_momentum: float
    head_norm: bool = False     # the hidden layer has BN (before its activation) instead of a bias (V4)
    layer_scale: float = 0.0    # initial layer scale of the UIB and MQA residual branches; 0: none (V4 hybrids)


ARCHS = {
    "v3_large": Arch("v3", V3_LARGE, 16, "hswish", 960, True, 1280, 1e-3, 0.01),
    "v3_small": Arch("v3", V3_SMALL, 16, "hswish", 576, True, 1024, 1e-3, 0.01),
    "v2": Arch("v2", V2, 32, "relu6", 1280, False, None, 1e-5, 0.1),
    "v1": Arch("v1", V1, 32, "relu6", None, True, None, 1e-5, 0.1),
    "v4_conv_small": Arch("v4", V4_CONV_SMALL, 32, "relu", 960, True, 1280, 1e-5, 0.1, head_norm=True),
    "v4_conv_medium": Arch("v4", V4_CONV_MEDIUM, 32, "relu", 960, True, 1280, 1e-5, 0.1, head_norm=True),
    "v4_conv_large": Arch("v4", V4_CONV_LARGE, 24, "relu", 960, True, 1280, 1e-5, 0.1, head_norm=True),
    "v4_hybrid_medium": Arch("v4", V4_HYBRID_MEDIUM, 32, "relu", 960, True, 1280, 1e-5, 0.1, head_norm=True,
                             layer_scale=1e-5),
    "v4_hybrid_large": Arch("v4", V4_HYBRID_LARGE, 24, "gelu", 960, True, 1280, 1e-5, 0.1, head_norm=True,
                            layer_scale=1e-5),
}


class BlockSpec(NamedTuple):
    in_channels: int
    expansion_channels: int
    out_channels: int
    kernel: int                 # the (middle) depthwise conv's; a V4 conv or fused row's conv; MQA's key/value one
    stride: int
    dilation: int
    se_channels: int
    act: str
    reduction: int              # nominal output stride of the block, before dilation
    block: str = "inverted"     # "separable" (V1), "inverted" (V2, V3), or a V4Row's block
    start_kernel: int = 0       # UIB: the depthwise conv before the expansion (0: none)
    heads: int = 0              # Mobile MQA: query heads, key (= value) channels, key/value down-sampling stride
    key_dim: int = 0
    kv_stride: int = 1
    layer_scale: float = 0.0    # initial layer scale of the residual branch (0: none)


class Resolved(NamedTuple):
    stem: int
    blocks: list[BlockSpec]
    last_conv: int | None
    head_hidden: int | None


def reduce_tail(arch: Arch) -> Arch:
    """Halve the channels between C4 and C5 and the last layers (paper Table 6 dagger, torchvision)."""
    last = max(i for i, row in enumerate(arch.rows) if row.stride > 1)
    rows = [*arch.rows[:last], arch.rows[last]._replace(out=arch.rows[last].out // 2)]
    rows += [row._replace(expansion=row.expansion // 2, out=row.out // 2) for row in arch.rows[last + 1:]]
    halve = lambda c: c // 2 if c else c  # noqa: E731
    return replace(arch, rows=tuple(rows), last_conv=halve(arch.last_conv), head_hidden=halve(arch.head_hidden))


def resolve(arch: Arch, width: float = 1.0, reduced_tail: bool = False, output_stride: int = 32) -> Resolved:
    """Concrete channels, strides and dilations for one configuration.

    Channels are ``make_divisible(c * width, 8)``; expansions keep the table's ratio to the block
    input (as the paper and timm do), so width 0.75 reproduces the paper's V3 0.75 models.
    Blocks that would exceed ``output_stride`` run at stride 1 with doubled dilation, the first of
    them included (torchvision's ``dilated=True``). The head's hidden layer is never narrowed below the table.
    """
    if reduced_tail:
        arch = reduce_tail(arch)
    scale = lambda c: make_divisible(c * width, 8)  # noqa: E731
    stem = scale(arch.stem)
    in_ref, in_channels, reduction, dilation, blocks = arch.stem, stem, 2, 1, []
    for row in arch.rows:
        expansion = make_divisible(in_channels * row.expansion / in_ref, 8) if row.expansion else in_channels
        reduction *= row.stride
        block_stride = row.stride if reduction <= output_stride else 1
        dilation *= row.stride // block_stride
        out = scale(row.out)
        if isinstance(row, V4Row):
            columns = dict(kernel=row.middle, se_channels=0, act=arch.act, block=row.block, start_kernel=row.start,
                           heads=row.heads, key_dim=row.key_dim, kv_stride=row.kv_stride,
                           layer_scale=arch.layer_scale)
        else:
            columns = dict(kernel=row.kernel, se_channels=make_divisible(expansion // 4, 8) if row.se else 0,
                           act=row.act, block="separable" if arch.family == "v1" else "inverted")
        blocks.append(BlockSpec(in_channels, expansion, out, stride=block_stride, dilation=dilation,
                                reduction=reduction, **columns))
        in_ref, in_channels = row.out, out
    last_width = width if arch.last_conv_narrows else max(width, 1.0)
    last_conv = make_divisible(arch.last_conv * last_width, 8) if arch.last_conv else None
    head_hidden = make_divisible(arch.head_hidden * max(width, 1.0), 8) if arch.head_hidden else None
    return Resolved(stem, blocks, last_conv, head_hidden)
