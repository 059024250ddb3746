"""MobileNet V1, V2 and V3 as tables, and the one function that sizes them.

Each ``Row`` is one block, with the columns of the MobileNetV3 paper's Tables 1-2:
kernel, expansion ("exp size": channels the depthwise conv sees), out, SE, activation, stride.
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


@dataclass(frozen=True)
class Arch:
    """Everything around the block table."""

    family: str                 # "v1" | "v2" | "v3": picks the block type and the head
    rows: tuple[Row, ...]
    stem: int                   # channels of the 3x3 stride-2 stem conv
    act: str                    # activation of the stem, the last conv and the head
    last_conv: int | None       # 1x1 conv after the blocks (C5); None: the last block is C5
    last_conv_narrows: bool     # False: width < 1 keeps the table's last conv (V2's 1280)
    head_hidden: int | None     # Linear between pooling and classifier (V3's 1280 / 1024)
    norm_eps: float
    norm_momentum: float


ARCHS = {
    "v3_large": Arch("v3", V3_LARGE, 16, "hswish", 960, True, 1280, 1e-3, 0.01),
    "v3_small": Arch("v3", V3_SMALL, 16, "hswish", 576, True, 1024, 1e-3, 0.01),
    "v2": Arch("v2", V2, 32, "relu6", 1280, False, None, 1e-5, 0.1),
    "v1": Arch("v1", V1, 32, "relu6", None, True, None, 1e-5, 0.1),
}


class BlockSpec(NamedTuple):
    in_channels: int
    expansion_channels: int
    out_channels: int
    kernel: int
    stride: int
    dilation: int
    se_channels: int
    act: str
    reduction: int              # nominal output stride of the block, before dilation


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
        expansion = make_divisible(in_channels * row.expansion / in_ref, 8)
        reduction *= row.stride
        block_stride = row.stride if reduction <= output_stride else 1
        dilation *= row.stride // block_stride
        se = make_divisible(expansion // 4, 8) if row.se else 0
        out = scale(row.out)
        blocks.append(BlockSpec(in_channels, expansion, out, row.kernel, block_stride, dilation, se, row.act,
                                reduction))
        in_ref, in_channels = row.out, out
    last_width = width if arch.last_conv_narrows else max(width, 1.0)
    last_conv = make_divisible(arch.last_conv * last_width, 8) if arch.last_conv else None
    head_hidden = make_divisible(arch.head_hidden * max(width, 1.0), 8) if arch.head_hidden else None
    return Resolved(stem, blocks, last_conv, head_hidden)
