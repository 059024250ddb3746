"""One MobileNet class for V1, V2, V3 and V4, speaking timm's model API."""

from functools import partial
from itertools import groupby
from typing import List, Optional, Tuple, Union

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import checkpoint, checkpoint_seq
from timm.models._features import feature_take_indices
from torch import nn

from .architectures import ARCHS, resolve
from .choices import ArgumentError, check_choice
from .layers import ACTIVATIONS, BLOCKS, ConvNormAct, PointwiseBatchNorm, head_linear, relayout

OUTPUT_STRIDES = (8, 16, 32)
FEATURE_LOCATIONS = ("block", "downsample", "expansion")
# timm's names for the same taps; timm's own "expansion" reads other layers than ours, so it is not an alias
TIMM_FEATURE_LOCATIONS = {"bottleneck": "block"}
LEVELS = (2, 4, 8, 16, 32)  # nominal strides of C1..C5


class MobileNet(nn.Module):
    """MobileNet V1/V2/V3/V4 backbone and classifier.

    Args:
        arch: key of ``architectures.ARCHS`` ("v3_large", "v3_small", "v2", "v1", "v4_conv_small", ...).
        width: width multiplier alpha.
        reduced_tail: halve the channels between C4 and C5 (paper Table 6, torchvision).
        output_stride: 32, 16 or 8; the stages past it are dilated instead of strided (V4 hybrids: Mobile MQA's
            key/value down-sampling conv is dilated too and keeps its stride; attention without it is unchanged).
        feature_location: where C1..C4 are tapped: "block" (output of the last block at each
            stride), "downsample" (output of the first block at each stride, the one that strides:
            torchvision's C_n taps, read by its LR-ASPP) or "expansion" (output of the 1x1 expansion
            of the next strided block, before its depthwise conv: the paper's SSDLite attachment; the block's
            input where nothing expands before the stride, as in V1 and V4's conv and fused-IB rows).
            C5 is the last conv in every case. timm's "bottleneck" is accepted for "block".
        global_pool: timm's pooling type; ``''`` keeps the maps unpooled, and the head's layers then act at
            every position (as timm's 1x1 ``conv_head``): ``forward_head(x, pre_logits=True)`` gives
            [B, head_hidden_size, H, W], and with ``num_classes=0`` so does ``forward``. The head's layout
            follows the pooling, set here and by ``reset_classifier`` (``layers.head_linear``).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the residual blocks (V2, V3, V4), rising linearly to this rate;
            V1 has no residual branch, so a rate there is an error.
        norm_eps, norm_momentum: BatchNorm settings; default to the architecture's
            (torchvision's V3: 1e-3 / 0.01; timm checkpoints were trained with eps 1e-5, V4's default).
    """

    _block_taps: List[int]  # typed for TorchScript, which cannot infer an empty list
    _expansion_taps: List[int]
    _block_reductions: List[int]
    _block_channels: List[int]

    def __init__(
        self,
        arch: str = "v3_large",
        width: float = 1.0,
        reduced_tail: bool = False,
        output_stride: int = 32,
        feature_location: str = "block",
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        norm_eps: Optional[float] = None,
        norm_momentum: Optional[float] = None,
    ):
        super().__init__()
        check_choice("arch", arch, ARCHS)
        check_choice("output_stride", output_stride, OUTPUT_STRIDES)
        check_choice("feature_location", feature_location, (*FEATURE_LOCATIONS, *TIMM_FEATURE_LOCATIONS))
        feature_location = TIMM_FEATURE_LOCATIONS.get(feature_location, feature_location)
        if width <= 0:
            raise ArgumentError(f"width={width!r} must be positive")
        spec = ARCHS[arch]
        if spec.family == "v1" and drop_path_rate:
            raise ArgumentError(f"drop_path_rate={drop_path_rate!r} has no effect on MobileNetV1: its blocks have no "
                             "residual branch to drop; leave it at 0 (drop_rate is the classifier's dropout)")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_levels = len(LEVELS)
        norm_args = dict(eps=spec.norm_eps if norm_eps is None else norm_eps,
                         momentum=spec.norm_momentum if norm_momentum is None else norm_momentum)
        norm = partial(nn.BatchNorm2d, **norm_args)
        sizes = resolve(spec, width, reduced_tail, output_stride)

        self.stem = ConvNormAct(in_chans, sizes.stem, 3, stride=2, act=spec.act, norm=norm)
        rates = [drop_path_rate * i / max(len(sizes.blocks) - 1, 1) for i in range(len(sizes.blocks))]
        self.blocks = nn.Sequential(*[BLOCKS[b.block](b, norm, rate) for b, rate in zip(sizes.blocks, rates)])
        last_in = sizes.blocks[-1].out_channels
        self.last_conv = (ConvNormAct(last_in, sizes.last_conv, act=spec.act, norm=norm) if sizes.last_conv
                          else nn.Identity())
        self.num_features = sizes.last_conv or last_in

        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        pooled = self.num_features * self.global_pool.feat_mult()
        self.head_hidden_size = sizes.head_hidden or pooled
        hidden, per_position = sizes.head_hidden, self.global_pool.is_identity()
        self.head_fc = head_linear(pooled, hidden, per_position, bias=not spec.head_norm) if hidden else nn.Identity()
        self.head_norm = PointwiseBatchNorm(hidden, **norm_args) if hidden and spec.head_norm else nn.Identity()
        self.head_act = ACTIVATIONS[spec.act](inplace=True) if hidden else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = (head_linear(self.head_hidden_size, num_classes, per_position) if num_classes > 0
                           else nn.Identity())

        self.feature_info, self._block_taps, self._expansion_taps = self._declare_taps(
            sizes, feature_location, output_stride)
        self._block_reductions = [b.reduction for b in sizes.blocks]
        self._block_channels = [b.out_channels for b in sizes.blocks]
        self._init_weights()

    def _declare_taps(self, sizes, location: str, output_stride: int):
        """C1..C5 as timm ``feature_info`` dicts, plus where ``forward_intermediates`` reads them.

        Block taps are points in the block sequence (0: stem output, i + 1: after block i);
        expansion taps are indices of the blocks whose expansion output is read (their input where ``expand`` is
        an identity).
        """
        points = [(2, sizes.stem)] + [(b.reduction, b.out_channels) for b in sizes.blocks]
        info, block_taps, expansion_taps = [], [], []
        for level, next_level in zip(LEVELS[:-1], LEVELS[1:]):
            if location != "expansion":
                pick = max if location == "block" else min
                point = pick(p for p, (reduction, _) in enumerate(points) if reduction == level)
                block_taps.append(point)
                info.append((points[point][1], f"blocks.{point - 1}" if point else "stem"))
            else:
                index = min(i for i, b in enumerate(sizes.blocks) if b.reduction == next_level)
                expansion_taps.append(index)
                block = sizes.blocks[index]
                expands = not isinstance(self.blocks[index].expand, nn.Identity)
                info.append((block.expansion_channels if expands else block.in_channels, f"blocks.{index}.expand"))
        info.append((self.num_features, "last_conv" if sizes.last_conv else f"blocks.{len(sizes.blocks) - 1}"))
        feature_info = [dict(num_chs=channels, reduction=min(level, output_stride), module=module, stage=i)
                        for i, ((channels, module), level) in enumerate(zip(info, LEVELS))]
        return feature_info, block_taps, expansion_taps

    def _init_weights(self) -> None:
        for m in self.modules():  # torchvision's MobileNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Parameter groups (timm's layer-wise LR decay): the stem, each block (``coarse``: the blocks of each
        stride), the last conv."""
        if coarse:
            strides = groupby(range(len(self.blocks)), key=lambda i: self._block_reductions[i])
            blocks = [(rf"^blocks\.(?:{'|'.join(map(str, group))})\.", (stage,))
                      for stage, (_, group) in enumerate(strides)]
        else:
            blocks = [(r"^blocks\.(\d+)", None)]
        return dict(stem=r"^stem", blocks=[*blocks, (r"^last_conv", (99999,))])

    @torch.jit.ignore
    def layer_reductions(self) -> List[Tuple[str, int]]:
        """Its layers in forward order (the stem, each block, the last conv) with the nominal stride of their
        outputs (before dilation): where its stages begin, which feature taps inside blocks cannot tell."""
        layers = [("stem", 2)] + [(f"blocks.{i}", self._block_reductions[i]) for i in range(len(self.blocks))]
        if not isinstance(self.last_conv, nn.Identity):
            layers.append(("last_conv", layers[-1][1]))
        return layers

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool`` as in the constructor (None: unchanged).

        A new pooling also sets the head's layout: the hidden layer keeps its weights, acting per position or not.
        """
        if global_pool is not None:
            pool = SelectAdaptivePool2d(pool_type=global_pool)
            width = self.num_features * pool.feat_mult()
            if isinstance(self.head_fc, nn.Linear):
                if self.head_fc.in_features != width:
                    raise AssertionError(f"global_pool={global_pool!r} gives {width} channels, but the head's hidden "
                                         f"layer takes {self.head_fc.in_features}: build the model with this pooling")
                self.head_fc = relayout(self.head_fc, pool.is_identity())
            self.global_pool, self.flatten = pool, nn.Flatten(1) if global_pool else nn.Identity()
        if not isinstance(self.head_fc, nn.Linear):
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.num_classes = num_classes
        like = self.stem.conv.weight
        self.classifier = (head_linear(self.head_hidden_size, num_classes, self.global_pool.is_identity(),
                                       device=like.device, dtype=like.dtype) if num_classes > 0 else nn.Identity())

    def check_indices(self, indices, name: str = "indices") -> Tuple[List[int], int]:
        """timm's ``feature_take_indices``, raising its exception types with one line that names the valid range."""
        count = self.num_levels
        strides = ", ".join(str(f["reduction"]) for f in self.feature_info[:count])
        valid = f"valid indices are 0..{count - 1} (C1..C{count}, strides {strides}); an int n selects the last n"
        if indices is not None and not isinstance(indices, int) and len(indices) == 0:
            raise ArgumentError(f"{name}={indices!r} selects no feature map: {valid}")
        wanted = [indices] if isinstance(indices, int) else list(indices if indices is not None else range(count))
        if isinstance(indices, int) and not 0 < indices <= count or any(not -count <= i < count for i in wanted):
            raise AssertionError(f"{name}={indices!r} is out of range: {valid}")
        return feature_take_indices(count, indices)

    def _blocks_up_to(self, level: int) -> int:
        """How many blocks the tap of ``level`` needs (C5 also needs the last conv)."""
        if level == len(LEVELS) - 1:
            return len(self.blocks)
        return self._block_taps[level] if self._block_taps else self._expansion_taps[level] + 1

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """C1..C5 and the final map, as timm's ``forward_intermediates``.

        ``indices``: None = all, n = the last n, a list = those. The final map is ``forward_features``'s.
        ``stop_early`` (only with ``intermediates_only``) skips the layers after the last requested tap.
        ``norm`` changes nothing, as in timm's MobileNets: there is no final norm layer (every tap ends in BatchNorm).
        """
        torch._assert(output_fmt == "NCHW", "Output shape must be NCHW.")
        torch._assert(intermediates_only or not stop_early, "Must use intermediates_only for early stopping.")
        if torch.jit.is_scripting():
            take_indices, max_index = feature_take_indices(self.num_levels, indices)
        else:
            take_indices, max_index = self.check_indices(indices)
        features: List[torch.Tensor] = []
        x = self.stem(x)
        if 0 in self._block_taps:
            features.append(x)
        if torch.jit.is_scripting() or not stop_early:  # TorchScript cannot slice the blocks
            blocks = self.blocks
        else:
            blocks = self.blocks[:self._blocks_up_to(max_index)]
        for i, block in enumerate(blocks):
            if i in self._expansion_taps:
                expanded = block.expand(x)
                features.append(expanded)
                x = block.finish(x, expanded)
            elif self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i + 1 in self._block_taps:
                features.append(x)
        if not intermediates_only or max_index == self.num_levels - 1:
            x = self.last_conv(x)
            if len(features) < self.num_levels:  # C5, unless pruned away
                features.append(x)
        intermediates: List[torch.Tensor] = []
        for i in range(len(features)):  # in network order, as timm's
            if i in take_indices:
                intermediates.append(features[i])
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the layers after the last requested tap, and the classifier head with ``prune_head`` or when the
        trunk is cut: ``forward`` then returns the last map kept, unpooled, as timm's. ``prune_norm`` changes
        nothing (there is no final norm layer)."""
        take_indices, max_index = self.check_indices(indices, "out_indices")
        cut = max_index < self.num_levels - 1
        if cut:
            self.blocks = self.blocks[:self._blocks_up_to(max_index)]
            self.last_conv = nn.Identity()
            self.num_levels = max_index + 1
            self.num_features = (self._block_channels[len(self.blocks) - 1] if len(self.blocks)
                                 else self.stem.conv.out_channels)
        if prune_head or cut:
            self.head_fc, self.head_norm, self.head_act = nn.Identity(), nn.Identity(), nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.last_conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, the hidden layer (V3, V4), dropout and the classifier; unpooled, they act at every position."""
        x = self.head_drop(self.head_act(self.head_norm(self.head_fc(self.flatten(self.global_pool(x))))))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
