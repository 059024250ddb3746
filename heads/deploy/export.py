"""Deployment: BatchNorm folding, ONNX export, ONNX Runtime sessions and static INT8 quantization.

What each kind of model becomes (input ``images`` [B, 3, H, W], the batch always dynamic):

- detection (SSDLite): images in [0, 1] at ``size`` x ``size`` -> ``boxes`` [B, A, 4] (decoded, xyxy input pixels)
  and ``scores`` [B, A, C] (class probabilities), as ``SSDLite.forward_batch``. Per-class top-k and NMS are the
  post-step ``SSDLite.select(boxes[i], scores[i], original_size)`` on the ONNX Runtime outputs.
- segmentation (LR-ASPP): normalised images -> ``logits`` [B, C, H, W]; H and W are dynamic with global
  pooling and fixed at the export size with ``pooling="large_kernel"`` (its kernel depends on the size).
- backbone (a ``features_only`` model): normalised images -> ``features0``, ``features1``, ...; H, W dynamic.
- classifier (a registered backbone with its head): normalised images -> ``logits`` [B, classes].

"Normalised" means with the statistics the model carries (:func:`normalizer`).
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from mbbackbones import MobileNet

from ..backbone import Normalize
from ..segmentation.lraspp import LargeKernelAvgPool

OPSET = 17
DEFAULT_SIZES = {"detection": None, "segmentation": (512, 1024), "backbone": (224, 224), "classifier": (224, 224)}


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode where each Conv2d -> BatchNorm2d pair is one conv with a bias.

    Pairs are consecutive children of a Sequential (our ``ConvNormAct``, torchvision's ``Conv2dNormActivation``);
    the BatchNorm becomes an ``nn.Identity``. A BatchNorm that no conv precedes is an error.
    """
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, nn.Identity())
    left = [name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(f"cannot fold BatchNorm {left[0]!r}: it does not directly follow a Conv2d in a Sequential")
    return model


def _network(model) -> nn.Module:
    """The network in eval mode, of a module or of a ``heads.predictors.LoadedModel``."""
    return (model if isinstance(model, nn.Module) else model.model).eval()


def model_kind(model: nn.Module) -> str:
    """'detection', 'segmentation' (the model's ``task``), 'classifier' (a registered backbone with its head) or
    'backbone' (a ``features_only`` network)."""
    if hasattr(model, "task"):
        return model.task
    return "classifier" if isinstance(model, MobileNet) else "backbone"


def normalizer(model: nn.Module) -> Normalize:
    """The input normalisation of a model: a task model's own, else its backbone weights' (timm pretrained cfg)."""
    if hasattr(model, "normalize"):
        return model.normalize
    return Normalize(model.pretrained_cfg["mean"], model.pretrained_cfg["std"])


def dynamic_size(model: nn.Module) -> bool:
    """Whether the exported graph accepts any H x W: not for SSDLite (anchors) nor large-kernel pooling."""
    return model_kind(model) != "detection" and not any(isinstance(m, LargeKernelAvgPool) for m in model.modules())


def export_size(model: nn.Module, size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """``size`` as (height, width); by default the kind's (SSDLite: its ``size`` square)."""
    if size is None:
        size = DEFAULT_SIZES[model_kind(model)] or model.size
    height, width = (size, size) if isinstance(size, int) else size
    if model_kind(model) == "detection" and (height, width) != (model.size, model.size):
        raise ValueError(f"SSDLite exports at its own size {model.size}x{model.size}, not {height}x{width}")
    return int(height), int(width)


class _ExportGraph(nn.Module):
    """The tensor path that is exported: ``forward_batch`` for SSDLite, ``forward`` otherwise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor):
        if model_kind(self.model) == "detection":
            return self.model.forward_batch(images)
        return self.model(images)


def output_names(model: nn.Module) -> list[str]:
    kind = model_kind(model)
    if kind == "detection":
        return ["boxes", "scores"]
    if kind in ("segmentation", "classifier"):
        return ["logits"]
    return [f"features{i}" for i in range(len(model.feature_info.channels()))]


def export_onnx(model: nn.Module, path: str | Path, size: int | Sequence[int] | None = None,
                opset: int = OPSET) -> Path:
    """Export a detector, segmenter or ``features_only`` backbone (or a ``LoadedModel``) to ONNX; returns ``path``.

    BatchNorm is folded into the convs, then the model is traced on one image of ``size`` (see :func:`export_size`)
    with the batch dynamic, and H, W too where :func:`dynamic_size` allows.
    """
    model = _network(model)
    if opset < OPSET:
        raise ValueError(f"opset {opset} is too old: export needs {OPSET} or newer")
    height, width = export_size(model, size)
    graph = _ExportGraph(fold_batchnorm(model))
    names = output_names(model)
    spatial = dynamic_size(model)
    dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}}
    for name in names:
        dynamic_axes[name] = {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} if spatial else {0: "batch"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, height, width, device=next(model.parameters()).device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic that is constant by construction
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    return path


class OnnxModel:
    """An ONNX Runtime CPU session; ``onnx_model(batch)`` maps a torch batch to torch outputs like the exported model.

    Args:
        path: the .onnx file.
        threads: intra-op threads (default: ONNX Runtime's choice, one per core); inter-op is sequential.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads yield the CPU
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = self.session.get_inputs()[0].shape  # ints where fixed, names where dynamic
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for a float32 [B, 3, H, W] array."""
        fixed = [(axis, want) for axis, want in enumerate(self.input_shape) if isinstance(want, int)]
        if batch.ndim != 4 or any(batch.shape[axis] != want for axis, want in fixed):
            expected = "x".join(str(want) if isinstance(want, int) else want for want in self.input_shape)
            raise ValueError(f"{self.path.name} takes {expected} images, got {'x'.join(map(str, batch.shape))}")
        return self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, np.float32)})

    def __call__(self, batch: Tensor) -> Tensor | tuple[Tensor, ...]:
        outputs = tuple(torch.from_numpy(out).to(batch.device) for out in self.run(batch.detach().cpu().numpy()))
        return outputs[0] if len(outputs) == 1 else outputs


def model_input(model: nn.Module, image: np.ndarray, size: int | Sequence[int] | None = None) -> np.ndarray:
    """One RGB uint8 H x W x 3 image as the exported graph takes it: [1, 3, H, W] float32 at the export size,
    in [0, 1] for detection, normalised (:func:`normalizer`) otherwise."""
    height, width = export_size(model, size)
    x = torch.tensor(image).permute(2, 0, 1)[None].float().div(255)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    if model_kind(model) != "detection":
        normalize = normalizer(model)
        x = normalize(x.to(normalize.mean.device)).cpu()
    return x.numpy()


def builtin_images(kind: str) -> list[Path]:
    """Training images of the built-in dataset of a kind: street scenes for segmentation, shapes otherwise."""
    if kind == "segmentation":
        from ..segmentation.builtin import builtin_cityscapes
        from ..segmentation.cityscapes import Cityscapes

        return [image for image, _ in Cityscapes(builtin_cityscapes(), "train").files]
    from ..detection.builtin import builtin_coco
    from ..detection.coco import CocoDetection

    return sorted(CocoDetection(builtin_coco(), "train2017").image_dir.iterdir())


class CalibrationReader(CalibrationDataReader):
    """Feeds input batches to ONNX Runtime's calibrator, one ``{input_name: batch}`` per call."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name = input_name
        self.batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration: Iterable[np.ndarray],
                  per_channel: bool = True) -> Path:
    """Post-training static INT8 quantization of an exported model with ONNX Runtime; returns ``int8_path``.

    QDQ format, int8 weights (per output channel by default), uint8 activations with MinMax ranges observed on
    the ``calibration`` batches (float32 arrays as the graph takes them, e.g. from :func:`model_input`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"  # shapes inferred and graph optimised, as ONNX Runtime advises
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph_model = onnx.load(str(prepared))
        quantize_static(graph_model, str(int8_path), CalibrationReader(graph_model.graph.input[0].name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=float_tail(graph_model))
    return Path(int8_path)


def float_tail(graph_model: onnx.ModelProto) -> list[str]:
    """Names of the nodes after the last convolutions (box decoding, softmax, the final resize and sum).

    They are cheap, and keeping them in float keeps boxes and logits at full precision.
    """
    producers = {output: node for node in graph_model.graph.node for output in node.output}
    feeding = set()  # nodes with a path to a Conv
    stack = [node for node in graph_model.graph.node if node.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name not in feeding:
            feeding.add(node.name)
            stack += [producers[name] for name in node.input if name in producers]
    return [node.name for node in graph_model.graph.node if node.name not in feeding]


def compare_outputs(model: nn.Module, onnx_model: OnnxModel, batch: Tensor) -> dict[str, float]:
    """Largest absolute difference per output between ONNX Runtime and the PyTorch model on ``batch``."""
    network = _network(model)
    with torch.no_grad():
        expected = _ExportGraph(network)(batch.to(next(network.parameters()).device))
    expected = [expected] if isinstance(expected, Tensor) else list(expected)
    got = onnx_model.run(batch.cpu().numpy())
    return {name: float(np.abs(ours - theirs.cpu().numpy()).max())
            for name, ours, theirs in zip(onnx_model.output_names, got, expected)}
