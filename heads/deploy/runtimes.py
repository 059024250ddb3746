"""Exported models behind one interface: ``export(model, path)`` writes one, ``load(path)`` runs it.

The runtime follows from the file's suffix (:data:`FORMATS`): ONNX Runtime (.onnx), OpenVINO (.xml), ExecuTorch with
the XNNPACK delegate (.pte) and LiteRT (.tflite). Each :class:`Runtime` maps images [B, 3, H, W] (uint8, or float32
in [0, 1] for a raw graph) to the outputs of the PyTorch model (see :mod:`heads.deploy.export`): a task model's
``forward_postprocessed`` (the post-processing inside, the default) or ``forward_batch``.

Each file carries the model's metadata (``model.meta``, plus the format, precision, input size and layout, and
whether the post-processing is inside), written by :func:`write_metadata` and read by :func:`read_metadata`. A LiteRT
file with its post-processing inside also carries TFLite Model Metadata and its label file, so that MediaPipe's tasks
load it with no more than its path (:mod:`heads.deploy.tflite_metadata`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mbbackbones.checkpoint import CheckpointError
from mbbackbones.choices import ArgumentError, check_choice

from ..task_model import Check, TaskModel
from . import tflite_metadata
from .export import (
    APP,
    EXTRAS,
    FORMATS,
    METADATA_METHOD,
    WRITERS,
    DeployGraph,
    dynamic_size,
    export_size,
    model_kind,
    network,
    normalizer,
    output_names,
    postprocessed,
    require,
)

__all__ = ["EXTRAS", "FORMATS", "Check", "Runtime", "check", "export", "exported_files", "load", "read_metadata",
           "write_metadata"]

METADATA_KEY = "mbbackbones"
STATIC = ("executorch", "tflite")  # graphs of one image at the export size; a batch runs image by image


def format_of(path: str | Path) -> str:
    """The format that a file's suffix names."""
    suffix = Path(path).suffix.lower()
    for format, known in FORMATS.items():
        if suffix == known:
            return format
    raise ArgumentError(f"cannot tell the format of {path}: its suffix is none of {', '.join(FORMATS.values())}")


def exported_files(path: Path) -> list[Path]:
    """The files an export writes: ``path`` and what goes with it (OpenVINO's weights)."""
    format = format_of(path)
    if format == "openvino":
        return [path, path.with_suffix(".bin")]
    return [path]


def _sidecar(path: Path) -> Path:
    """The metadata file beside a LiteRT or ExecuTorch file of the earlier exporters."""
    return path.with_name(path.name + ".json")


def describe_export(model: nn.Module, format: str, int8: bool, size: tuple[int, int],
                    postprocess: bool = False) -> dict:
    """The metadata of an export: the model's ``meta`` (a task model's, see ``heads.registry.describe``; a
    backbone's name, kind and normalisation) with the format, precision, input size (None: any), the input's
    layout and type, the output names and whether the post-processing is inside (``postprocessed``)."""
    meta = getattr(model, "meta", None)
    if meta is None:
        if isinstance(model, TaskModel):
            from ..registry import describe

            meta = describe(type(model).__name__, model)
        else:
            normalize = normalizer(model)
            meta = dict(name=model.pretrained_cfg.get("architecture"), task=model_kind(model),
                        mean=normalize.mean.flatten().tolist(), std=normalize.std.flatten().tolist())
    fixed = format in STATIC or not dynamic_size(model)
    postprocess = postprocessed(model, postprocess)
    return {**meta, "format": format, "precision": "int8" if int8 else "fp32", "input_size": list(size) if fixed
            else None, "outputs": output_names(model, postprocess, format in APP), "postprocessed": postprocess,
            "input_layout": "NHWC" if postprocess else "NCHW", "input_dtype": "uint8" if postprocess else "float32"}


def export(model: nn.Module, path: str | Path, format: str | None = None, *, int8: bool = False,
           calibration: Iterable[np.ndarray] | None = None, size: int | Sequence[int] | None = None,
           postprocess: bool = True, **options) -> Path:
    """Export a detector, segmenter, classifier or backbone (or a ``LoadedModel``) and its metadata; returns
    ``path``.

    Args:
        path: the file to write (OpenVINO also writes the .bin beside it); it is replaced only once the export is
            complete.
        format: a :data:`FORMATS` name; None: from the suffix of ``path``.
        int8: post-training static INT8 quantization, calibrated on ``calibration``: float32 [1, 3, H, W]
            batches in [0, 1] at the export size (``export.model_input``), from the task's own validation images.
        size: export size, S or (H, W) (default: SSDLite its own, segmentation 512x1024, backbones 224).
        postprocess: a task model's post-processing inside the graph (RGB uint8 [B, H, W, 3] in, final detections
            or the class mask out; the default); False: the raw graph (images in [0, 1] in, ``forward_batch``'s
            outputs out). Classifiers and backbones are always raw.
        options: for the format's writer (ONNX: ``opset``).
    """
    path = Path(path)
    if format is None:
        format = format_of(path)
    check_choice("format", format, FORMATS)
    if path.suffix.lower() != FORMATS[format]:
        raise ArgumentError(f"{path}: {format} files end in {FORMATS[format]}")
    if int8 and calibration is None:
        raise ArgumentError("int8 export needs calibration images (the task's own validation images)")
    model = network(model)
    size = export_size(model, size)
    calibration = list(calibration) if int8 else None
    if calibration is not None and not calibration:
        raise ArgumentError("int8 export needs at least one calibration image")
    if path.is_dir():
        raise ArgumentError(f"cannot export to {path}: it is a folder; name the {FORMATS[format]} file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        metadata = describe_export(model, format, int8, size, postprocess)
        if format == "executorch":  # held in the program itself
            options["metadata"] = json.dumps(metadata)
        WRITERS[format](model, staged, size, calibration, postprocess, **options)
        if format != "executorch":
            app = format in APP and metadata["postprocessed"]
            write_metadata(staged, metadata, model.app_metadata(metadata) if app else None)
        for file in exported_files(staged):
            os.replace(file, path.parent / file.name)
    return path


# -- metadata -------------------------------------------------------------------------------------------------------

def write_metadata(path: str | Path, metadata: dict, app: tflite_metadata.AppMetadata | None = None) -> None:
    """Store ``metadata`` (JSON) with an exported file: ONNX ``metadata_props``, OpenVINO ``rt_info``, LiteRT's
    metadata list (with ``app``, TFLite Model Metadata and the label file too, :mod:`tflite_metadata`). (An
    ExecuTorch program holds it from its export, :data:`METADATA_METHOD`.)"""
    path, text = Path(path), json.dumps(metadata)
    format = format_of(path)
    if format == "executorch":
        raise ArgumentError(f"{path}: an ExecuTorch program's metadata is written when it is exported; export it "
                            "again")
    if format == "onnx":
        onnx = require("onnx", format)
        graph = onnx.load(str(path))
        for entry in [e for e in graph.metadata_props if e.key == METADATA_KEY]:
            graph.metadata_props.remove(entry)
        graph.metadata_props.add(key=METADATA_KEY, value=text)
        onnx.save(graph, str(path))
    elif format == "openvino":
        ov = require("openvino", format)
        ir = ov.Core().read_model(str(path))
        ir.set_rt_info(text, [METADATA_KEY])
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # the weights are read from the file in place
            ov.save_model(ir, str(Path(tmp) / path.name), compress_to_fp16=False)
            del ir
            for file in exported_files(Path(tmp) / path.name):
                shutil.move(file, path.parent / file.name)
    else:
        tflite_metadata.embed(path, text, app)


def read_metadata(path: str | Path) -> dict:
    """The metadata :func:`write_metadata` stored with an exported file; a file without it, or unreadable, is a
    one-line ValueError naming it."""
    path = Path(path)
    format = format_of(path)
    if not path.is_file():
        raise FileNotFoundError(f"{format} model not found: {path}")
    text = None
    if format == "onnx":
        onnx = require("onnx", format)
        from google.protobuf.message import DecodeError

        try:
            graph = onnx.load(str(path), load_external_data=False)
        except DecodeError:
            raise CheckpointError(f"{path} is not a valid ONNX file (InvalidProtobuf): export it again") from None
        text = next((e.value for e in graph.metadata_props if e.key == METADATA_KEY), None)
    elif format == "openvino":
        ov = require("openvino", format)
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise CheckpointError(f"{path}: its weights {weights.name} are missing; copy the .xml and the .bin "
                                  "together (or export it again)")
        try:
            ir = ov.Core().read_model(str(path))
        except RuntimeError as error:
            raise CheckpointError(f"{path} is not a readable OpenVINO model ({_reason(error)}): export it "
                                  "again") from None
        text = ir.get_rt_info([METADATA_KEY]).astype(str) if ir.has_rt_info([METADATA_KEY]) else None
    elif format == "tflite":
        try:
            text = tflite_metadata.read_entry(path)
        except ValueError as error:
            raise CheckpointError(f"{path} is not a readable LiteRT model ({error}): export it again") from None
        text = None if text is None else text.decode(errors="replace")
    elif format == "executorch":
        text = _program_metadata(path)
    where = ""
    if text is None and format in STATIC:  # a file of the earlier exporters: its sidecar
        where = f" ({_sidecar(path).name} beside it)"
        text = _sidecar(path).read_text() if _sidecar(path).is_file() else None
    if text is None:
        raise CheckpointError(f"{path} has no mbbackbones metadata{where}: it comes from another exporter or an older "
                              "version; export it again with tools/export.py")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its metadata{where} is not valid JSON ({error.msg}, character "
                              f"{error.pos}): export it again") from None
    if not isinstance(metadata, dict) or "task" not in metadata:
        raise CheckpointError(f"{path}: its metadata{where} is not an mbbackbones record (a JSON object with 'task'):"
                              " export it again")
    return metadata


def _program_metadata(path: Path) -> str | None:
    """The metadata an ExecuTorch program returns from its constant method :data:`METADATA_METHOD` (None: it has
    none); an unreadable program is a one-line error."""
    runtime = require("executorch.runtime", "executorch")
    try:
        program = runtime.Runtime.get().load_program(path)
    except RuntimeError as error:
        raise CheckpointError(f"{path} is not a loadable ExecuTorch program ({error}): export it again") from None
    if METADATA_METHOD not in program.method_names:
        return None
    return program.load_method(METADATA_METHOD).execute([])[0]


def _reason(error: Exception) -> str:
    """A runtime's own reason in one line: its last line that says something (OpenVINO puts the source location
    first and the reason last)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# -- runtimes -------------------------------------------------------------------------------------------------------

class Runtime:
    """An exported model in its runtime: ``runtime(images)`` -> the outputs as torch tensors.

    ``images``: [B, 3, H, W], uint8 or (a raw graph) float32 in [0, 1], at ``metadata["input_size"]`` when it is not
    None; :meth:`graph_input` turns them into what the file takes.
    """

    format: str

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        if self.metadata.get("format") != self.format:
            raise CheckpointError(f"{self.path} holds a {self.metadata.get('format')} export, not {self.format}")
        self.threads = threads

    @property
    def task(self) -> str:
        return self.metadata["task"]

    def graph_input(self, images: Tensor) -> np.ndarray:
        """``images`` [B, 3, H, W] as the file's input: RGB uint8 [B, H, W, 3] where the post-processing is inside
        (``metadata["input_layout"]``, ``["input_dtype"]``), float32 [B, 3, H, W] in [0, 1] for a raw graph (files
        without these keys are raw); a wrong shape, size or type is a one-line ValueError."""
        size = self.metadata["input_size"]
        uint8 = self.metadata.get("input_dtype") == "uint8"
        if images.dtype == torch.uint8 and not uint8:
            images = images.float().div_(255)
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != (torch.uint8 if uint8 else torch.float32):
            kind = "uint8 [B, 3, H, W] images" if uint8 else "float32 [B, 3, H, W] images in [0, 1]"
            raise ValueError(f"{self.path.name} takes {kind}, got {images.dtype} {list(images.shape)}")
        if size is not None and list(images.shape[-2:]) != size:
            raise ValueError(f"{self.path.name} takes {size[0]}x{size[1]} (HxW) images, got "
                             f"{images.shape[-2]}x{images.shape[-1]}")
        if self.metadata.get("input_layout") == "NHWC":
            images = images.permute(0, 2, 3, 1)
        return np.ascontiguousarray(images.detach().cpu().numpy())

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for an array as :meth:`graph_input` makes it (B = 1 for single-image formats)."""
        raise NotImplementedError

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        array = self.graph_input(images)
        if self.format in STATIC:
            outputs = [np.concatenate(parts) for parts in zip(*(self.run(array[i:i + 1]) for i in range(len(array))))]
        else:
            outputs = self.run(array)
        return tuple(torch.from_numpy(np.asarray(out)).to(images.device) for out in outputs)


class OnnxRuntime(Runtime):
    """ONNX Runtime. ``providers``: execution providers in order of preference (default: TensorRT and CUDA where
    installed, then the CPU); ``optimization``: graph optimisation level ('disable', 'basic', 'extended', 'all');
    ``spinning``: idle intra-op threads spin (lower latency, but a busy CPU for others); ``profile``: record each
    node's time (``session.end_profiling()`` writes the trace in the temporary folder and returns its path)."""

    format = "onnx"
    LEVELS = ("disable", "basic", "extended", "all")

    def __init__(self, path, threads=None, providers: Sequence[str] | None = None, optimization: str = "all",
                 spinning: bool = False, profile: bool = False):
        super().__init__(path, threads)
        ort = require("onnxruntime", self.format)
        check_choice("optimization", optimization, self.LEVELS)
        options = ort.SessionOptions()
        levels = ort.GraphOptimizationLevel
        options.graph_optimization_level = dict(zip(self.LEVELS, (levels.ORT_DISABLE_ALL, levels.ORT_ENABLE_BASIC,
                                                                  levels.ORT_ENABLE_EXTENDED, levels.ORT_ENABLE_ALL))
                                                )[optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
        if threads:
            options.intra_op_num_threads = threads
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"ort-profile-{self.path.stem}")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
            providers.append("CPUExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: images})


class OpenVinoRuntime(Runtime):
    """OpenVINO. ``device``: 'CPU' (default), 'GPU', ...; ``precision``: the inference precision of float layers
    ('f32' by default, which keeps fp32 results; 'bf16' on CPUs that have it); ``config``: more properties."""

    format = "openvino"

    def __init__(self, path, threads=None, device: str = "CPU", precision: str = "f32", config: dict | None = None):
        super().__init__(path, threads)
        ov = require("openvino", self.format)
        properties = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", **(config or {})}
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(self.path), device, properties)
        self.request = self.compiled.create_infer_request()

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        results = self.request.infer(images)
        return [results[output] for output in self.compiled.outputs]


class ExecuTorchRuntime(Runtime):
    """ExecuTorch with the XNNPACK delegate. ``threads`` resizes ExecuTorch's process-wide thread pool."""

    format = "executorch"

    def __init__(self, path, threads=None):
        super().__init__(path, threads)
        runtime = require("executorch.runtime", self.format)
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        try:
            self.method = runtime.Runtime.get().load_program(self.path).load_method("forward")
        except RuntimeError as error:
            raise CheckpointError(f"{self.path} is not a loadable ExecuTorch program ({error}): export it "
                                  "again") from None

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        return [out.numpy() for out in self.method.execute([torch.from_numpy(images)])]


class LiteRtRuntime(Runtime):
    """LiteRT (TFLite) interpreter with its XNNPACK delegate."""

    format = "tflite"

    def __init__(self, path, threads=None):
        super().__init__(path, threads)
        interpreter = require("ai_edge_litert.interpreter", self.format)
        try:
            self.interpreter = interpreter.Interpreter(str(self.path), num_threads=threads)
        except ValueError as error:
            raise CheckpointError(f"{self.path} is not a readable LiteRT model ({error}): export it again") from None
        self.runner = self.interpreter.get_signature_runner()
        signature = next(iter(self.interpreter.get_signature_list().values()))
        self.input_name, self.output_names = signature["inputs"][0], signature["outputs"]

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        outputs = self.runner(**{self.input_name: images})
        return [outputs[name] for name in self.output_names]


RUNTIMES = {runtime.format: runtime for runtime in (OnnxRuntime, OpenVinoRuntime, ExecuTorchRuntime, LiteRtRuntime)}


def load(path: str | Path, threads: int | None = None, task: str | None = None, **options) -> Runtime:
    """The runtime for an exported file, chosen by its suffix; ``options`` go to its class (see each).

    ``task``: what the caller expects ('detection', 'segmentation', ...); a file of another is a ValueError.
    """
    format = format_of(path)
    runtime = RUNTIMES[format](path, threads, **options)
    if task is not None and runtime.task != task:
        raise ArgumentError(f"{path} is a {runtime.task} model ({runtime.metadata.get('name')}), not a {task} one")
    return runtime


# -- checks against PyTorch -----------------------------------------------------------------------------------------

FP32_TOLERANCE = 1e-4  # classifiers and backbones: largest |difference| of an output
INT8_COSINE = 0.95  # their INT8 files: cosine similarity of each output


@torch.no_grad()
def check(model: nn.Module, runtime: Runtime, images: Tensor) -> list[Check]:
    """``runtime`` against the PyTorch ``model`` it was exported from, on ``images`` ([B, 3, H, W] in [0, 1]; rounded
    to uint8 for a file that takes uint8), both running the graph the file holds: a task model's own
    :meth:`~heads.task_model.TaskModel.agreement`; for classifiers and backbones, the largest difference of each
    output (fp32) or its cosine similarity (INT8)."""
    model = network(model)
    if runtime.metadata.get("input_dtype") == "uint8":
        images = images.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    postprocess = runtime.metadata.get("postprocessed", False)
    graph = DeployGraph(model, postprocess, app=postprocess and runtime.format in APP)
    expected = graph(torch.from_numpy(runtime.graph_input(images)).to(next(model.parameters()).device))
    expected = [e.cpu() for e in ([expected] if isinstance(expected, Tensor) else expected)]
    got = list(runtime(images.cpu()))
    int8 = runtime.metadata["precision"] == "int8"
    if isinstance(model, TaskModel):
        return model.agreement(expected, got, runtime.metadata, int8)
    names = runtime.metadata["outputs"]
    if not int8:
        return [Check(f"max |{name} difference|", (ours - theirs).abs().max().item(), FP32_TOLERANCE, True)
                for name, ours, theirs in zip(names, got, expected)]
    return [Check(f"{name} cosine similarity", torch.cosine_similarity(ours.flatten(), theirs.flatten(), 0).item(),
                  INT8_COSINE, False) for name, ours, theirs in zip(names, got, expected)]
