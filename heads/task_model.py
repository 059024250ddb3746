"""The one interface of task models: how a detector or segmenter takes images, runs a batch, turns its outputs
into results, and what an export needs to know. Prediction, export, evaluation and the benchmark call these and
never ask which task a model does.

A task model takes images as uint8 [0, 255] or float [0, 1] and normalises them itself (``model.normalize``, the
statistics of its backbone's weights). Post-processing (:meth:`TaskModel.results`) and resizing
(:meth:`TaskModel.input_size`) read the model's metadata only, so that an exported file, which carries that metadata,
is post-processed by the same code as the PyTorch model.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor, nn

from mbbackbones.choices import ArgumentError

if TYPE_CHECKING:
    from .deploy.tflite_metadata import AppMetadata


class Check(NamedTuple):
    """One comparison of a runtime's outputs with PyTorch's: a measured value against its limit."""

    name: str
    value: float
    limit: float
    at_most: bool  # the value must be <= limit (else >=)

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def __str__(self) -> str:
        return (f"{self.name} {self.value:.3g} ({'<=' if self.at_most else '>='} {self.limit:g}): "
                f"{'PASS' if self.passed else 'FAIL'}")


class TaskModel(nn.Module):
    """What every task model (``SSDLite``, ``LRASPP``) states.

    Class attributes:
        task: its kind, as the registry's table names it ('detection', 'segmentation').
        result_type: the :class:`heads.results.Result` of one image.
        output_names: the names of :meth:`forward_batch`'s outputs (and of a raw exported graph's).
        final_output_names: the names of :meth:`forward_postprocessed`'s outputs (and of an exported graph's with
            the post-processing inside).
        app_output_names: the names of :meth:`forward_app`'s outputs (and of a LiteRT graph's with the
            post-processing inside).
        class_layers: state-dict prefixes whose shapes follow ``num_classes`` (a new head re-initialises them).
        float_layers: submodules that INT8 exports keep in float where int8 kernels lose the ranking (LiteRT).

    Instances have ``backbone`` (a ``features_only`` module), ``normalize`` and ``num_classes``.
    """

    task: str
    result_type: type
    output_names: tuple[str, ...]
    final_output_names: tuple[str, ...]
    app_output_names: tuple[str, ...]
    class_layers: tuple[str, ...]
    float_layers: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> TaskModel:
        """``nn.Module.train``, except that BatchNorm layers whose weights are frozen (``requires_grad`` off, as
        ``trainable_backbone_layers`` leaves them) stay in eval mode, so their statistics stay those of the weights
        too (torchvision's detectors leave them in train mode)."""
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and is_frozen(module):
                    module.eval()
        return self

    def forward_batch(self, images: Tensor) -> tuple[Tensor, ...]:
        """The network on a batch [B, 3, H, W] (uint8, or float in [0, 1]) at its input size: plain tensors named
        :attr:`output_names`, ready for ``torch.export`` and ONNX."""
        raise NotImplementedError

    def forward_postprocessed(self, images: Tensor, nms_op: bool = True) -> tuple[Tensor, ...]:
        """The network and its post-processing on RGB uint8 images [B, H, W, 3] at the input size: plain tensors
        named :attr:`final_output_names`, the results at the input size, ready for export. ``nms_op``: the runtime
        has ONNX's ``NonMaxSuppression`` operator (else tensor operations do what it does)."""
        raise NotImplementedError

    def forward_app(self, images: Tensor, nms_op: bool = True) -> tuple[Tensor, ...]:
        """The network and the post-processing that app tasks read (MediaPipe's ``ObjectDetector`` and
        ``ImageSegmenter``) on RGB uint8 images [B, H, W, 3] at the input size: plain tensors named
        :attr:`app_output_names`, in those tasks' convention, ready for export (``nms_op``: as
        :meth:`forward_postprocessed`)."""
        raise NotImplementedError

    def app_metadata(self, meta: dict) -> AppMetadata:
        """The TFLite Model Metadata of :meth:`forward_app`'s graph for a file whose metadata is ``meta``."""
        raise NotImplementedError

    def settings(self) -> dict:
        """Post-processing settings, as ``meta["postprocess"]`` records them (none by default)."""
        return {}

    def metadata(self) -> dict:
        """What the model's metadata (``heads.registry.describe``) says of it: default class names, the input size
        (None: any) and its post-processing settings."""
        raise NotImplementedError

    def export_size(self, size: int | Sequence[int] | None = None) -> tuple[int, int]:
        """``size`` (S or (H, W)) as the (height, width) an export is traced at; None: the model's default."""
        raise NotImplementedError

    def dynamic_size(self) -> bool:
        """Whether an exported graph can take any height and width."""
        return False

    @staticmethod
    def input_size(meta: dict, height: int, width: int) -> tuple[int, int]:
        """The (height, width) a model with metadata ``meta`` takes an image of ``height`` x ``width`` at."""
        raise NotImplementedError

    @staticmethod
    def results(outputs: Sequence[Tensor], meta: dict, input_size: Sequence[int],
                original_size: Sequence[int]) -> dict:
        """One image's :attr:`result_type` fields from its outputs (the batch dimension removed), at
        ``original_size`` (H, W): :meth:`forward_batch`'s, or :meth:`forward_postprocessed`'s where
        ``meta["postprocessed"]`` says so (an exported file with its post-processing inside), or
        :meth:`forward_app`'s where ``meta["outputs"]`` names its outputs."""
        raise NotImplementedError

    @staticmethod
    def agreement(expected: Sequence[Tensor], got: Sequence[Tensor], meta: dict, int8: bool) -> list[Check]:
        """How a runtime's outputs ``got`` (of the kind ``meta`` says, see :meth:`results`) compare with PyTorch's
        :meth:`forward_batch` outputs ``expected`` (batches, at the input size)."""
        raise NotImplementedError


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` has weights and none of them trains."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    return bool(flags) and not any(flags)


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """S or (H, W) as (H, W), positive integers; else a one-line :class:`ArgumentError`."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ArgumentError(f"size {height}x{width} (HxW): both must be positive")
    return int(height), int(width)
