"""Deployment graphs and the files they become: ONNX, OpenVINO IR, ExecuTorch (XNNPACK) and LiteRT, fp32 or INT8.

Every exported graph is :class:`DeployGraph`. A task model's, by default, holds its post-processing too: RGB uint8
images [B, H, W, 3] at the input size (the normalisation inside) -> its ``forward_postprocessed`` outputs, named by
its ``final_output_names`` (SSDLite: the final ``boxes``, ``scores``, ``labels`` and ``count`` after threshold,
per-class top-k, NMS and the detection cap: ONNX's NMS operator in ONNX and OpenVINO files, tensor operations in
ExecuTorch and LiteRT ones; LR-ASPP: the class ``mask``). Raw graphs (``postprocess=False``, and
always for classifiers and backbones) take images float32 [B, 3, H, W] in [0, 1] ->

- a task model: its ``forward_batch`` outputs, named by its ``output_names`` (SSDLite: decoded ``boxes`` and class
  ``scores`` per default box; LR-ASPP: ``logits`` at the input size); its ``results`` post-process them;
- classifier (a registered backbone with its head): ``logits`` [B, classes];
- backbone (a ``features_only`` network): ``features0``, ``features1``, ...

BatchNorm is folded into the convs first. ONNX and OpenVINO keep the batch dynamic (and H, W where
:func:`dynamic_size` allows); ExecuTorch and LiteRT graphs take one image of the export size. LiteRT graphs are
rewritten for its GPU delegate first (:func:`for_gpu_delegate`): every operator of a raw graph is one it runs.

INT8 (post-training, static, calibrated on images as the graph takes them) quantizes every layer up to the last
convolutions; what follows them (box decoding, softmax, the final resize and sum) stays in float, which keeps
boxes and logits at full precision for little time. Each runtime gets the scheme its CPU kernels run in integer:
ONNX Runtime QDQ (per-channel int8 weights, uint8 activations), OpenVINO NNCF (its CPU plugin fuses
hard-swish and SE into the int8 convolutions), the XNNPACK quantizer for ExecuTorch and LiteRT's PT2E quantizer
(which leaves SSDLite's classification convolutions float: int8 there costs LiteRT 1.1 AP50).

The Python packages of a runtime are an optional extra, imported only when that runtime is used (:func:`require`).
"""
from __future__ import annotations

import copy
import importlib
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers.attention2d import MultiQueryAttention2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSDScoringHead

from mbbackbones.choices import ArgumentError

from ..backbone import Normalize
from ..task_model import TaskModel, as_size

OPSET = 17
METADATA_METHOD = "mbbackbones_metadata"  # the ExecuTorch constant method that returns the metadata (JSON)
NETWORK_SIZE = (224, 224)  # export size of classifiers and backbones
FORMATS = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte", "tflite": ".tflite"}  # name -> file suffix
APP = ("tflite",)  # formats whose post-processed graphs follow the app tasks' convention (``forward_app``)
EXTRAS = {"onnx": "onnx", "openvino": "openvino", "executorch": "executorch", "tflite": "litert"}  # pip extras


class MissingExtra(ImportError):
    """A runtime whose package is not installed; the message names the extra that installs it."""


def require(module: str, format: str) -> ModuleType:
    """Import ``module``, a package of the ``format`` runtime; missing, a one-line :class:`MissingExtra`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0].replace("_", "-")
        raise MissingExtra(f"the {format} runtime needs the package {package!r}: "
                           f"pip install 'mbbackbones[{EXTRAS[format]}]'") from None


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode where each Conv2d -> BatchNorm2d pair is one conv with a bias.

    Pairs are consecutive children of a Sequential (our ``ConvNormAct``, torchvision's ``Conv2dNormActivation``);
    the BatchNorm becomes an ``nn.Identity``. Any other BatchNorm (a timm backbone's ``BatchNormAct2d``, a norm no
    conv precedes) stays, in eval mode: the same numbers, one more operator (runtimes fuse it themselves).
    """
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d:  # not subclasses that do more
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, nn.Identity())
    return model


def network(model) -> nn.Module:
    """The network in eval mode, of a module or of a :class:`~heads.loading.Loaded` (``.model``)."""
    return (model if isinstance(model, nn.Module) else model.model).eval()


def model_kind(model: nn.Module) -> str:
    """A task model's ``task``, 'classifier' (a registered backbone with its head) or 'backbone' (a
    ``features_only`` network)."""
    if isinstance(model, TaskModel):
        return model.task
    return "classifier" if hasattr(model, "forward_head") else "backbone"


def normalizer(model: nn.Module) -> Normalize:
    """The input normalisation of a model: a task model's own, else its backbone weights' (timm pretrained cfg)."""
    if hasattr(model, "normalize"):
        return model.normalize
    return Normalize(model.pretrained_cfg["mean"], model.pretrained_cfg["std"])


def dynamic_size(model: nn.Module) -> bool:
    """Whether the exported graph accepts any H x W (a task model says; classifiers and backbones do)."""
    return model.dynamic_size() if isinstance(model, TaskModel) else True


def export_size(model: nn.Module, size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """``size`` as (height, width); by default the model's (classifiers and backbones: 224)."""
    if isinstance(model, TaskModel):
        return model.export_size(size)
    return as_size(NETWORK_SIZE if size is None else size)


def postprocessed(model: nn.Module, postprocess: bool) -> bool:
    """Whether the graph of ``model`` holds its post-processing: asked (``postprocess``) and a task model."""
    return postprocess and isinstance(model, TaskModel)


def output_names(model: nn.Module, postprocess: bool = False, app: bool = False) -> list[str]:
    if isinstance(model, TaskModel):
        if postprocess:
            return list(model.app_output_names if app else model.final_output_names)
        return list(model.output_names)
    if model_kind(model) == "classifier":
        return ["logits"]
    return [f"features{i}" for i in range(len(model.feature_info.channels()))]


class DeployGraph(nn.Module):
    """What is exported: RGB uint8 images [B, H, W, 3] -> a task model's ``forward_postprocessed`` (``postprocess``;
    ``nms_op``: the runtime has ONNX's NMS operator), or its ``forward_app`` (``app``: the outputs MediaPipe's tasks
    read); else images in [0, 1] [B, 3, H, W] -> a task model's ``forward_batch`` (which normalises), or the network
    on its normalised input (:func:`normalizer`)."""

    def __init__(self, model: nn.Module, postprocess: bool = False, nms_op: bool = True, app: bool = False):
        super().__init__()
        self.model = model
        self.postprocess = postprocessed(model, postprocess)
        self.nms_op, self.app = nms_op, app
        self.normalize = None if isinstance(model, TaskModel) else normalizer(model)
        self.eval()  # as the model it wraps (converters ask the top module)

    def forward(self, images: Tensor):
        if self.postprocess:
            if self.app:
                return self.model.forward_app(images, self.nms_op)
            return self.model.forward_postprocessed(images, self.nms_op)
        if self.normalize is None:
            return self.model.forward_batch(images)
        return self.model(self.normalize(images))


def _example(model: nn.Module, size: tuple[int, int], postprocess: bool = False) -> Tensor:
    """One image as the graph takes it (:class:`DeployGraph`)."""
    device = next(model.parameters()).device
    if postprocessed(model, postprocess):
        return torch.randint(0, 256, (1, *size, 3), dtype=torch.uint8, device=device)
    return torch.rand(1, 3, *size, device=device)


def graph_input(batch: np.ndarray, postprocess: bool) -> np.ndarray:
    """A float32 [B, 3, H, W] batch in [0, 1] (:func:`model_input`) as a graph with its post-processing takes it:
    RGB uint8 [B, H, W, 3] (rounded to the nearest level); ``batch`` itself for a raw graph."""
    if not postprocess:
        return batch
    return np.ascontiguousarray((batch * 255).round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


def _graph_inputs(calibration: Iterable[np.ndarray], postprocess: bool) -> list[np.ndarray]:
    """Calibration batches (float32 [B, 3, H, W] in [0, 1]) as a graph takes them (:func:`graph_input`)."""
    return [graph_input(batch, postprocess) for batch in calibration]


# -- LiteRT's GPU delegate ---------------------------------------------------------------------------------------

class _ScoringHead(nn.Module):
    """torchvision's SSD scoring head whose [B, A * K, H, W] -> [B, H * W * A, K] goes through channels last, 4-D,
    instead of a 5-D view (which the GPU delegate rejects): the same numbers in the same order."""

    def __init__(self, head: SSDScoringHead):
        super().__init__()
        self.module_list, self.num_columns = head.module_list, head.num_columns

    def forward(self, x: list[Tensor]) -> Tensor:
        return torch.cat([module(features).permute(0, 2, 3, 1).reshape(features.shape[0], -1, self.num_columns)
                          for module, features in zip(self.module_list, x)], dim=1)


class _BoxCoder(BoxCoder):
    """torchvision's box decoding on [1, N, 2, 2] views ((x, y) pairs of centre and size): 4-D slices, where
    torchvision's slice [N, 4] (2-D slices, which the GPU delegate rejects); the same arithmetic."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        corners = boxes.to(rel_codes.dtype).reshape(1, -1, 2, 2)  # (x1, y1), (x2, y2)
        sizes = corners[:, :, 1:] - corners[:, :, :1]
        centres = corners[:, :, :1] + 0.5 * sizes
        deltas = rel_codes.reshape(1, -1, 2, 2)  # (dx, dy), (dw, dh)
        weights = deltas.new_tensor(self.weights).reshape(2, 2)
        centre_deltas = deltas[:, :, :1] / weights[:1]
        size_deltas = torch.clamp(deltas[:, :, 1:] / weights[1:], max=self.bbox_xform_clip)
        centres = centre_deltas * sizes + centres
        half = 0.5 * (torch.exp(size_deltas) * sizes)
        return torch.cat([centres - half, centres + half], dim=2).reshape(-1, 4)


class _SharedKeyAttention(nn.Module):
    """timm's multi-query attention (MobileNetV4 hybrids) with the heads folded into the query positions, so that
    queries meet the one key and value in 3-D matrix products, where timm's broadcast them over the heads
    (BROADCAST_TO, which the GPU delegate rejects); the same arithmetic, rounded as the runtime's kernels round."""

    def __init__(self, attention: MultiQueryAttention2d):
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:
        attention, batch = self.attention, x.shape[0]
        height, width = x.shape[2] // attention.query_strides[0], x.shape[3] // attention.query_strides[1]
        queries = attention.query(x).reshape(batch, attention.num_heads, attention.key_dim, -1).transpose(2, 3)
        keys = attention.key(x).flatten(2)  # [B, key_dim, key positions]
        values = attention.value(x).flatten(2).transpose(1, 2)  # [B, key positions, value_dim]
        weights = (queries.reshape(batch, -1, attention.key_dim) * attention.scale @ keys).softmax(-1)
        out = (weights @ values).reshape(batch, attention.num_heads, height * width, -1).transpose(1, 2)
        return attention.output(out.reshape(batch, height, width, -1).permute(0, 3, 1, 2))


class _Constant(nn.Module):
    """What a module returned for the export size (SSDLite's default boxes), held as constants; called for another
    size, an error."""

    def __init__(self, inputs: Sequence[Tensor], outputs: Sequence[Tensor]):
        super().__init__()
        self.shapes = [tensor.shape for tensor in inputs]
        for i, output in enumerate(outputs):
            self.register_buffer(f"output{i}", output, persistent=False)
        self.count = len(outputs)

    def forward(self, *inputs) -> list[Tensor]:
        shapes = [tensor.shape for tensor in _tensors(inputs)]
        if shapes != self.shapes:
            raise RuntimeError(f"constant for inputs of shapes {self.shapes}, called with {shapes}")
        return [getattr(self, f"output{i}") for i in range(self.count)]


def _tensors(value) -> list[Tensor]:
    """The tensors in ``value``, nested in sequences or in an ``ImageList``, in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return _tensors(value.tensors) if hasattr(value, "tensors") else []


def for_gpu_delegate(model: nn.Module, size: tuple[int, int]) -> nn.Module:
    """``model`` (a copy, as :func:`fold_batchnorm` makes; changed in place) rewritten for LiteRT's GPU delegate,
    for graphs of one image of ``size``, with the same numbers: torchvision's SSD scoring heads and box coder work
    in 4-D (no 5-D tensors, no 2-D slices), default box generators become their boxes at ``size``, constants (no
    BROADCAST_TO or slices computing them), and timm's multi-query attention multiplies without broadcasting. A
    model without these parts is returned as it is."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SSDScoringHead):
                setattr(parent, name, _ScoringHead(child).train(child.training))
            elif type(child) is MultiQueryAttention2d:
                setattr(parent, name, _SharedKeyAttention(child).train(child.training))
        for name, value in list(vars(parent).items()):
            if type(value) is BoxCoder:  # not subclasses that do more
                setattr(parent, name, _BoxCoder(value.weights, value.bbox_xform_clip))
    generators = {name: module for name, module in model.named_modules() if isinstance(module, DefaultBoxGenerator)}
    if generators:
        calls = {}

        def record(name: str):
            def hook(module, inputs, outputs) -> None:
                calls[name] = _tensors(inputs), outputs
            return hook

        hooks = [module.register_forward_hook(record(name)) for name, module in generators.items()]
        try:
            with torch.no_grad():
                DeployGraph(model)(_example(model, size))
        finally:
            for hook in hooks:
                hook.remove()
        for name, (inputs, outputs) in calls.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _Constant(inputs, outputs).train(generators[name].training))
    return model


def export_onnx(model: nn.Module, path: str | Path, size: int | Sequence[int] | None = None,
                opset: int = OPSET, postprocess: bool = False) -> Path:
    """Export the :class:`DeployGraph` of a detector, segmenter, classifier or backbone (or a ``LoadedModel``) to
    ONNX, BatchNorm folded, traced on one image of ``size`` (:func:`export_size`) with the batch dynamic, and H, W
    too where :func:`dynamic_size` allows; with ``postprocess``, a task model's post-processing inside (ONNX's
    ``NonMaxSuppression`` for detection); returns ``path``."""
    model = network(model)
    if opset < OPSET:
        raise ArgumentError(f"opset {opset} is too old: export needs {OPSET} or newer")
    require("onnx", "onnx")  # torch.onnx.export needs it
    size = export_size(model, size)
    postprocess = postprocessed(model, postprocess)
    names = output_names(model, postprocess)
    spatial = (1, 2) if postprocess else (2, 3)  # H, W of [B, H, W, 3] or [B, 3, H, W]
    dynamic_axes = {"images": {0: "batch", **({spatial[0]: "height", spatial[1]: "width"}
                                              if dynamic_size(model) else {})}}
    for name in names:  # outputs at the input size (logits, mask) have its H and W; detections the batch alone
        dynamic_axes[name] = {0: "batch"}
        if dynamic_size(model):
            dynamic_axes[name].update({1: "height", 2: "width"} if postprocess else
                                      {2: f"{name}_height", 3: f"{name}_width"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph, example = DeployGraph(fold_batchnorm(model), postprocess), _example(model, size, postprocess)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic that is constant by construction
        outputs = graph(example)
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    if postprocess:  # the exporter leaves the detection cap of [B, D, ...] unnamed: the dims not dynamic are fixed
        _fix_output_dims(path, [output.shape for output in outputs], dynamic_axes)
    return path


def _fix_output_dims(path: Path, shapes: Sequence[Sequence[int]], dynamic_axes: dict) -> None:
    """Write the ONNX file's output dimensions that are not ``dynamic_axes`` as the numbers in ``shapes``."""
    onnx = require("onnx", "onnx")
    graph_model = onnx.load(str(path))
    for output, shape in zip(graph_model.graph.output, shapes):
        for axis, (dim, size) in enumerate(zip(output.type.tensor_type.shape.dim, shape)):
            if axis not in dynamic_axes[output.name]:
                dim.dim_value = size
    onnx.save(graph_model, str(path))


# -- INT8 -------------------------------------------------------------------------------------------------------

def after_last_convolutions(nodes: Mapping[str, tuple[bool, Sequence[str]]]) -> list[str]:
    """Names of the nodes with no path to a convolution: ``nodes`` maps each node's name to (is a convolution,
    the names of the nodes its inputs come from). These are the float tail of an INT8 graph."""
    feeding, stack = set(), [name for name, (convolution, _) in nodes.items() if convolution]
    while stack:
        name = stack.pop()
        if name not in feeding:
            feeding.add(name)
            stack += [source for source in nodes[name][1] if source in nodes]
    return [name for name in nodes if name not in feeding]


def _onnx_nodes(graph_model) -> dict[str, tuple[bool, list[str]]]:
    producers = {output: node.name for node in graph_model.graph.node for output in node.output}
    return {node.name: (node.op_type == "Conv", [producers[i] for i in node.input if i in producers])
            for node in graph_model.graph.node}


class _CalibrationReader:
    """Feeds input batches to ONNX Runtime's calibrator, one ``{input_name: batch}`` per call."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name = input_name
        self.batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, calibration: Iterable[np.ndarray]) -> Path:
    """Static INT8 quantization of an exported ONNX model with ONNX Runtime; returns ``int8_path``.

    QDQ format, which ONNX Runtime's CPU provider fuses into QLinearConv / QLinearAdd / QLinearMul kernels; int8
    weights per output channel, uint8 activations with MinMax ranges observed on the ``calibration`` batches.
    """
    onnx = require("onnx", "onnx")
    quantization = require("onnxruntime.quantization", "onnx")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"  # shapes inferred and graph optimised, as ONNX Runtime advises
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph_model = onnx.load(str(prepared))
        reader = _CalibrationReader(graph_model.graph.input[0].name, calibration)
        quantization.quantize_static(
            graph_model, str(int8_path), reader, quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            nodes_to_exclude=after_last_convolutions(_onnx_nodes(graph_model)))
    return Path(int8_path)


def _pt2e_quantized(graph: DeployGraph, example: Tensor, quantizer, calibration: Iterable[np.ndarray],
                    fold_quantize: bool = True, float_layers: Sequence[str] = ()) -> nn.Module:
    """``graph`` exported, annotated by ``quantizer`` (a global config) on the model's own layers only (less
    ``float_layers``), observed on the ``calibration`` batches and converted to quantize/dequantize pairs (int8
    weights, per channel; with ``fold_quantize=False`` the float weights and their quantize step, which
    litert-torch's converter folds)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(torch.export.export(graph, (example,)).module(),
                            _Within(quantizer, _quantized_layers(graph), float_layers))
    with torch.no_grad():
        for batch in calibration:
            for image in torch.from_numpy(batch).split(1):
                prepared(image)
    return convert_pt2e(prepared, fold_quantize=fold_quantize)


def _quantized_layers(graph: DeployGraph) -> list[str]:
    """The graph's submodules that INT8 quantizes: the model's children with weights (not the input normalisation,
    not SSDLite's anchor generator)."""
    return [f"model.{name}" for name, child in graph.model.named_children()
            if next(child.parameters(), None) is not None]


def _within(node, modules: Sequence[str]) -> bool:
    """Whether an exported graph's ``node`` comes from one of ``modules`` (qualified names)."""
    return any(path == module or path.startswith(module + ".")
               for path, _ in node.meta.get("nn_module_stack", {}).values() for module in modules)


class _Within:
    """A PT2E quantizer's annotations kept on the nodes of ``modules`` but not of ``float_modules``; what follows
    them (box decoding, softmax, the final resize) stays float. Neither the XNNPACK quantizer's nor litert-torch's
    ``set_module_name`` matches torch.export's module paths, so their convolutions stayed float that way."""

    def __init__(self, quantizer, modules: Sequence[str], float_modules: Sequence[str] = ()):
        self.quantizer, self.modules, self.float_modules = quantizer, modules, float_modules

    def transform_for_annotation(self, model):
        return self.quantizer.transform_for_annotation(model)

    def annotate(self, model):
        model = self.quantizer.annotate(model)
        for node in model.graph.nodes:
            if not _within(node, self.modules) or _within(node, self.float_modules):
                node.meta.pop("quantization_annotation", None)
        return model

    def validate(self, model) -> None:
        self.quantizer.validate(model)

    def prepare_obs_or_fq_callback(self, model, edge_or_node_to_obs_or_fq) -> None:
        self.quantizer.prepare_obs_or_fq_callback(model, edge_or_node_to_obs_or_fq)


class TfliteOperator(NamedTuple):
    """One operator of a LiteRT flatbuffer: its builtin name, the shapes of its input and output tensors (inputs
    absent in the file left out) and the name of its first output, which names the PyTorch module it comes from."""

    name: str
    inputs: list[tuple[int, ...]]
    outputs: list[tuple[int, ...]]
    tensor: str


def tflite_operators(path: str | Path) -> list[TfliteOperator]:
    """The operators of a ``.tflite`` file's main graph, in order (``print(*tflite_operators(path), sep="\\n")``)."""
    schema = require("ai_edge_litert.schema_py_generated", "tflite")
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    # codes below 127 may sit in the deprecated byte only; the larger of the two is the operator
    codes = [names[max(code.builtinCode, code.deprecatedBuiltinCode)] for code in model.operatorCodes]
    graph = model.subgraphs[0]

    def shapes(indices) -> list[tuple[int, ...]]:
        return [tuple(int(d) for d in graph.tensors[i].shape) for i in indices if i >= 0]

    return [TfliteOperator(codes[op.opcodeIndex], shapes(op.inputs), shapes(op.outputs),
                           graph.tensors[op.outputs[0]].name.decode()) for op in graph.operators]


# -- the formats --------------------------------------------------------------------------------------------------

def write_onnx(model: nn.Module, path: Path, size: tuple[int, int], calibration=None, postprocess: bool = False,
               opset: int = OPSET) -> None:
    if calibration is None:
        export_onnx(model, path, size, opset, postprocess)
        return
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", size, opset, postprocess)
        quantize_onnx(fp32, path, _graph_inputs(calibration, postprocessed(model, postprocess)))


def write_openvino(model: nn.Module, path: Path, size: tuple[int, int], calibration=None,
                   postprocess: bool = False) -> None:
    """OpenVINO IR (``path`` .xml and its .bin) converted from the ONNX export (its ``NonMaxSuppression`` becomes
    OpenVINO's); INT8 through NNCF."""
    ov = require("openvino", "openvino")
    with tempfile.TemporaryDirectory() as tmp:
        ir = ov.convert_model(str(export_onnx(model, Path(tmp) / "model.onnx", size, postprocess=postprocess)))
    if calibration is not None:
        nncf = require("nncf", "openvino")
        from nncf.common.logging.logger import nncf_logger

        nodes = {op.get_friendly_name(): (op.get_type_name() in ("Convolution", "GroupConvolution"),
                                          [value.get_node().get_friendly_name() for value in op.input_values()])
                 for op in ir.get_ordered_ops()}
        level = nncf_logger.level
        nncf.set_log_level(logging.WARNING)  # not a line per operator
        batches = _graph_inputs(calibration, postprocessed(model, postprocess))
        try:
            ir = nncf.quantize(ir, nncf.Dataset(batches), subset_size=len(batches),
                               ignored_scope=nncf.IgnoredScope(names=after_last_convolutions(nodes), validate=False))
        finally:
            nncf.set_log_level(level)
    ov.save_model(ir, str(path), compress_to_fp16=False)


def write_executorch(model: nn.Module, path: Path, size: tuple[int, int], calibration=None,
                     postprocess: bool = False, metadata: str = "") -> None:
    """An ExecuTorch program lowered to the XNNPACK delegate (what it does not take, the post-processing's topk
    and gathers among them, runs in ExecuTorch's portable kernels), ``metadata`` in its constant method
    :data:`METADATA_METHOD`; INT8 through PT2E with the XNNPACK quantizer."""
    require("executorch", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    graph = DeployGraph(fold_batchnorm(model), postprocess, nms_op=False).cpu()
    example = _example(model, size, postprocess).cpu()
    if calibration is not None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        graph = _pt2e_quantized(graph, example, quantizer, _graph_inputs(calibration, graph.postprocess))
    with torch.no_grad():
        program = torch.export.export(graph, (example,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                          constant_methods={METADATA_METHOD: metadata})
    path.write_bytes(lowered.to_executorch().buffer)


def write_tflite(model: nn.Module, path: Path, size: tuple[int, int], calibration=None,
                 postprocess: bool = False) -> None:
    """A LiteRT (TFLite) flatbuffer converted by litert-torch, rewritten for its GPU delegate
    (:func:`for_gpu_delegate`); INT8 through PT2E with its quantizer. With ``postprocess``, a task model's
    ``forward_app`` (what MediaPipe's tasks read)."""
    litert_torch = require("litert_torch", "tflite")
    model = fold_batchnorm(model).cpu()
    graph = DeployGraph(for_gpu_delegate(model, size), postprocess, nms_op=False, app=True).eval()
    example = _example(model, size, postprocess)
    options = {}
    if calibration is not None:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig

        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        float_layers = [f"model.{name}" for name in getattr(model, "float_layers", ())]  # the model says
        graph = _pt2e_quantized(graph, example, quantizer, _graph_inputs(calibration, graph.postprocess),
                                fold_quantize=False, float_layers=float_layers)
        options["quant_config"] = QuantConfig(pt2e_quantizer=quantizer)
    litert_torch.convert(graph, (example,), **options).export(str(path))


WRITERS = {"onnx": write_onnx, "openvino": write_openvino, "executorch": write_executorch, "tflite": write_tflite}


# -- inputs -------------------------------------------------------------------------------------------------------

def model_input(model: nn.Module, image: np.ndarray, size: int | Sequence[int] | None = None) -> np.ndarray:
    """One RGB uint8 H x W x 3 image as the exported graph takes it: [1, 3, H, W] float32 in [0, 1] at the export
    size (bilinear, as SSDLite's own resize)."""
    height, width = export_size(model, size)
    x = torch.tensor(image).permute(2, 0, 1)[None].float().div(255)
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False).numpy()
