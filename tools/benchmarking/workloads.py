"""Task rows of the benchmark: SSDLite end to end, LR-ASPP, training steps and deployment runtimes, against
torchvision.

Our detector and segmenter are loaded from the reference's own state dict, so each row compares the same
computation with the same result (tests check it). Timing and tables: :mod:`mbbackbones.benchmark`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

import mbbackbones
from heads.deploy.export import normalizer
from heads.registry import ENTRIES, create_model
from heads.training.engine import recalibrate_bn
from heads.training.tasks import DetectionTask, SegmentationTask
from mbbackbones.profile import count_madds, count_params

from .harness import (
    EAGER_TARGET,
    Contender,
    Workload,
    backbone_workloads,
    contenders,
    model_variants,
    published,
)

if TYPE_CHECKING:
    from heads.deploy.runtimes import Runtime

TASKS = ("classify", "features", "detect", "segment", "train", "deploy")
DETECTOR, SEGMENTER = "ssdlite320_mbv3_large_reduced", "lraspp_mbv3_large"
TORCHVISION_DETECTOR = "torchvision ssdlite320_mobilenet_v3_large"
TORCHVISION_SEGMENTER = "torchvision lraspp_mobilenet_v3_large ['out']"
DETECT_TARGET = 0.6  # SSDLite end to end, eager, against torchvision's
# deployment runtimes against torchvision eager: the best of each precision should meet these (issue 13)
DEPLOY_TARGETS = {"detect": {"fp32": 0.25, "int8": 0.20}, "segment": {"fp32": 0.30, "int8": 0.25}}
FORMATS_TIMED = ("onnx", "openvino", "executorch", "tflite")
RUNTIME_PACKAGES = {"onnx": ("onnx", "onnxruntime"), "openvino": ("openvino", "nncf"), "executorch": ("executorch",),
                    "tflite": ("litert_torch", "ai_edge_litert")}


class Settings(NamedTuple):
    """Sizes, batches and repeats of one benchmark run."""

    classify_models: tuple[str, ...] | None  # None: all with a counterpart
    classify_size: int
    batches: tuple[int, ...]  # classify, features and detect
    detect_size: tuple[int, int]  # original image (height, width), resized to 320 by the models
    background_logits: tuple[float, ...]  # SSDLite score regimes, see calibrated_torchvision_detector
    segment_shapes: tuple[tuple[tuple[int, int], tuple[int, ...]], ...]  # ((height, width), batches)
    train_detect_batch: int  # at 320x320
    train_segment: tuple[tuple[int, int], int]  # (height, width), batch
    deploy_segment: tuple[tuple[int, int], ...]  # (height, width) of each LR-ASPP row
    deploy_formats: tuple[str, ...]  # runtimes timed (those installed)
    repeats: int
    warmup: int
    budget_s: float  # timed seconds per workload, once three rounds are done


FULL = Settings(None, 224, (1, 8), (480, 640), (0.0, 9.0), (((512, 1024), (1, 4)), ((1024, 2048), (1,))), 8,
                ((512, 1024), 2), ((1024, 2048), (512, 1024)), FORMATS_TIMED, 20, 5, 30.0)
QUICK = Settings(("mbv3_large_reduced", "mbv3_small"), 96, (1,), (240, 320), (0.0,), (((128, 256), (1,)),), 2,
                 ((128, 256), 1), ((128, 256),), ("onnx", "openvino"), 3, 1, 1.0)


class Logits(nn.Module):
    """torchvision's segmentation output ``{"out": logits}`` as plain logits, and its normalisation, like our
    segmenters."""

    def __init__(self, model: nn.Module, normalize: nn.Module):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


class _TorchvisionDetection:
    """What :func:`heads.engine.recalibrate_bn` calls: torchvision SSDLite's transform and network."""

    @staticmethod
    def forward_images(model: nn.Module, images: list[Tensor], device) -> None:
        batch = model.transform(images)[0].tensors
        model.head(list(model.backbone(batch).values()))


def calibrated_torchvision_detector(images: list[Tensor], background_logit: float = 0.0) -> nn.Module:
    """torchvision's SSDLite with random weights, BatchNorm statistics from ``images`` and ``background_logit``
    added to each anchor's background logit.

    With unit statistics a random network gives near-constant scores: candidates tie, and NMS does its
    worst-case work. Calibrated, scores spread, but a random head still gives each class about 1/91:
    nearly all 3234 x 90 anchor-class pairs pass the 0.001 score threshold. A trained detector is
    confident about background and passes far fewer; ``background_logit`` (e.g. 9) emulates that.
    """
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    recalibrate_bn(model, [images], _TorchvisionDetection, "cpu", batches=1)
    scores = model.head.classification_head
    with torch.no_grad():
        for block in scores.module_list:
            block[-1].bias[0::scores.num_columns] += background_logit  # channels are anchor-major
    return model


def from_torchvision(name: str, reference: nn.Module, **kwargs) -> nn.Module:
    """Our ``name`` loaded from ``reference``'s state dict, through a file as a user would."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "torchvision.pth")
        torch.save(reference.state_dict(), path)
        return create_model(name, pretrained=path, **kwargs).eval()


def as_inputs(images: Sequence[np.ndarray], size: tuple[int, int]) -> list[Tensor]:
    """RGB uint8 H x W x 3 photos as detector inputs: 3 x ``size`` floats in [0, 1]."""
    return [F.interpolate(torch.tensor(image).permute(2, 0, 1)[None].float() / 255, size=size, mode="bilinear",
                          align_corners=False)[0] for image in images]


def calibrated_pair(images: Sequence[np.ndarray], size=(480, 640),
                    background_logit: float = 0.0) -> tuple[nn.Module, nn.Module, list[Tensor], str]:
    """torchvision's SSDLite calibrated on ``images`` (RGB uint8 photos), ours with its weights, the inputs,
    and their label for the table: sizes and the post-processing load."""
    inputs = as_inputs(images, size)
    reference = calibrated_torchvision_detector(inputs, background_logit).eval()
    ours = from_torchvision(DETECTOR, reference)
    with torch.inference_mode():
        scores = ours.forward_batch(ours.resize(inputs[0])[None])[1][0, :, 1:]
    label = f"{size[1]}x{size[0]} -> 320, {int((scores > ours.score_thresh).sum()):,} candidates"
    return reference, ours, inputs, label


def detection_workloads(images: Sequence[np.ndarray], batches=(1, 8), size=(480, 640), background_logits=(0.0,),
                        extra: Sequence[str] = (), warmup: int = 5) -> Iterator[Workload]:
    """``model(images)`` end to end (resize, normalise, network, decode, NMS) for ``images`` (RGB uint8
    photos) resized to the original ``size``, which the models then resize to 320x320; one set of rows per
    score regime (see :func:`calibrated_torchvision_detector`)."""
    for background_logit in background_logits:
        reference, ours, images_at_size, label = calibrated_pair(images, size, background_logit)
        for batch in batches:
            inputs = [images_at_size[i % len(images_at_size)] for i in range(batch)]
            yield Workload("detect", label, batch, TORCHVISION_DETECTOR, partial(reference, inputs),
                           contenders(DETECTOR, ours, inputs, extra, DETECT_TARGET), published(ENTRIES, DETECTOR),
                           warmup=warmup)


def segmentation_workloads(shapes=(((512, 1024), (1,)),), extra: Sequence[str] = (),
                           warmup: int = 5) -> Iterator[Workload]:
    """LR-ASPP logits at full resolution, 19 classes (Cityscapes)."""
    torchvision = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19)
    ours = from_torchvision(SEGMENTER, torchvision, num_classes=19)
    reference = Logits(torchvision, ours.normalize).eval()
    for (height, width), batches in shapes:
        for batch in batches:
            image = torch.randn(batch, 3, height, width)
            yield Workload("segment", f"{width}x{height}", batch, TORCHVISION_SEGMENTER, partial(reference, image),
                           contenders(SEGMENTER, ours, image, extra, EAGER_TARGET), published(ENTRIES, SEGMENTER),
                           warmup=warmup)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, losses: Callable, batch) -> None:
    """Forward, backward and optimizer step, with the training engine's task losses."""
    loss = sum(losses(model, batch, "cpu").values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _trainer(model: nn.Module, losses: Callable, batch) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.train().parameters(), lr=1e-3, momentum=0.9)
    return partial(train_step, model, optimizer, losses, batch)


def _training(name: str, ours: nn.Module, reference_name: str, reference: nn.Module, losses: Callable, batch,
              size: str, extra: Sequence[str], warmup: int) -> Workload:
    steps = tuple(Contender(name, _trainer(model, losses, batch), count_params(model), None, label)
                  for label, model in model_variants(ours, extra).items())
    return Workload("train", size, len(batch[0]), reference_name, _trainer(reference, losses, batch), steps,
                    training=True, warmup=warmup)


def random_targets(count: int, size: int, classes: int = 91, seed: int = 0) -> list[dict[str, Tensor]]:
    """One to five random boxes (xyxy inside ``size`` x ``size``) with random foreground labels per image."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(count):
        boxes = int(torch.randint(1, 6, (1,), generator=generator))
        corner = torch.rand(boxes, 2, generator=generator) * 0.7 * size
        extent = (0.1 + 0.2 * torch.rand(boxes, 2, generator=generator)) * size
        targets.append({"boxes": torch.cat([corner, corner + extent], 1),
                        "labels": torch.randint(1, classes, (boxes,), generator=generator)})
    return targets


def training_workloads(detect_batch: int = 8, segment=((512, 1024), 2), extra: Sequence[str] = (),
                       warmup: int = 2) -> Iterator[Workload]:
    """One SGD step of SSDLite at 320 (random boxes) and of LR-ASPP (random masks), ours and torchvision's."""
    torchvision = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    batch = ([torch.rand(3, 320, 320) for _ in range(detect_batch)], random_targets(detect_batch, 320))
    yield _training(DETECTOR, from_torchvision(DETECTOR, torchvision), TORCHVISION_DETECTOR, torchvision,
                    DetectionTask.losses, batch, "320x320", extra, warmup)
    (height, width), count = segment
    torchvision = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19)
    batch = (torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8),
             torch.randint(0, 19, (count, height, width)))
    ours = from_torchvision(SEGMENTER, torchvision, num_classes=19)
    yield _training(SEGMENTER, ours, TORCHVISION_SEGMENTER, Logits(torchvision, ours.normalize),
                    SegmentationTask.losses, batch, f"{width}x{height}", extra, warmup)


def runtime_detections(model: nn.Module, runtime: Runtime, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """SSDLite end to end in a deployment runtime: our resize, the exported graph, our ``select``."""
    boxes, scores = runtime(torch.stack([model.resize(image) for image in images]))
    return [model.select(b, s, tuple(image.shape[-2:])) for b, s, image in zip(boxes, scores, images)]


def first_output(runtime: Runtime, images: Tensor) -> Tensor:
    return runtime(images)[0]


def runtime_contenders(name: str, model: nn.Module, folder: Path, size, calibration: list[np.ndarray],
                       run: Callable[[Runtime, object], object], inputs, formats: Sequence[str],
                       targets: dict[str, float] | None = None) -> Iterator[Contender]:
    """``run(runtime, inputs)`` for ``model`` exported to each of ``formats`` (those installed), fp32 and INT8
    (calibrated on ``calibration``), in runtimes with torch's thread count; ``targets``: per precision."""
    from heads.deploy import runtimes

    sizes = dict(params=count_params(model), madds_m=round(count_madds(model, inputs[:1]) / 1e6, 1))
    for format in formats:
        for precision in ("fp32", "int8"):
            path = runtimes.export(model, folder / f"{name}-{precision}{runtimes.FORMATS[format]}", size=size,
                                   int8=precision == "int8", calibration=calibration)
            runtime = runtimes.load(path, threads=torch.get_num_threads())
            yield Contender(name, partial(run, runtime, inputs), variant=f"{format} {precision}",
                            target=(targets or {}).get(precision), **sizes)


def installed_formats(formats: Sequence[str]) -> list[str]:
    """The ``formats`` whose runtime packages are installed."""
    return [f for f in formats if all(importlib.util.find_spec(module) for module in RUNTIME_PACKAGES[f])]


def deployment_workloads(images: Sequence[np.ndarray], classify_size: int = 224, detect_size=(480, 640),
                         background_logits=(0.0,), segment_sizes=((512, 1024),), formats=FORMATS_TIMED,
                         warmup: int = 5) -> Iterator[Workload]:
    """Ours in each deployment runtime (fp32, INT8 calibrated on ``images``) against torchvision eager, batch 1:
    classification, SSDLite end to end (runtime network, our ``select``) per score regime, LR-ASPP logits."""
    from heads.deploy.export import model_input

    formats = installed_formats(formats)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        name, ours, image = "mbv3_large", timm.create_model("mbv3_large").eval(), torch.rand(1, 3, *[classify_size] * 2)
        calibration = [model_input(ours, photo, classify_size) for photo in images]
        contenders = tuple(runtime_contenders(name, ours, folder, classify_size, calibration, first_output, image,
                                              formats))
        reference = mobilenet_v3_large().eval()
        yield Workload("deploy", f"{classify_size}x{classify_size}", 1, "torchvision mobilenet_v3_large",
                       partial(reference, normalizer(ours)(image)), contenders,
                       published(mbbackbones.ENTRIES, name), warmup=warmup)

        for background_logit in background_logits:
            reference, ours, inputs, label = calibrated_pair(images, detect_size, background_logit)
            calibration = [ours.resize(i)[None].numpy() for i in inputs]
            contenders = tuple(runtime_contenders(DETECTOR, ours, folder, None, calibration,
                                                  partial(runtime_detections, ours), inputs[:1], formats,
                                                  DEPLOY_TARGETS["detect"]))
            yield Workload("deploy", label, 1, TORCHVISION_DETECTOR, partial(reference, inputs[:1]), contenders,
                           published(ENTRIES, DETECTOR), warmup=warmup)

        torchvision = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19)
        ours = from_torchvision(SEGMENTER, torchvision, num_classes=19)
        reference = Logits(torchvision, ours.normalize).eval()
        for size in segment_sizes:
            image = torch.rand(1, 3, *size)
            calibration = [model_input(ours, photo, size) for photo in images]
            targets = DEPLOY_TARGETS["segment"] if tuple(size) == (1024, 2048) else None
            contenders = tuple(runtime_contenders(SEGMENTER, ours, folder, size, calibration, first_output, image,
                                                  formats, targets))
            yield Workload("deploy", f"{size[1]}x{size[0]}", 1, TORCHVISION_SEGMENTER,
                           partial(reference, ours.normalize(image)), contenders, published(ENTRIES, SEGMENTER),
                           warmup=warmup)


def op_breakdown(runtime: Runtime, images: Tensor, repeats: int = 10) -> list[tuple[str, float]]:
    """Where a runtime's time goes: (operator, ms per call) summed by operator type, slowest first.

    OpenVINO: its performance counters, the type with the kernel that ran it (``Convolution jit_avx512_I8``
    says an integer kernel; ``... FP32`` a float one); ONNX Runtime: its profiler's node events by operator type.
    """
    from heads.deploy import runtimes

    times: dict[str, float] = {}
    if isinstance(runtime, runtimes.OpenVinoRuntime):
        request = runtimes.OpenVinoRuntime(runtime.path, runtime.threads, config={"PERF_COUNT": True}).request
        for _ in range(repeats):
            request.infer(images.numpy())
            for info in request.profiling_info:
                key = f"{info.node_type} {info.exec_type}"
                times[key] = times.get(key, 0.0) + info.real_time.total_seconds() * 1e3 / repeats
    elif isinstance(runtime, runtimes.OnnxRuntime):
        profiled = runtimes.OnnxRuntime(runtime.path, runtime.threads, profile=True)
        for _ in range(repeats):
            profiled(images)
        trace = Path(profiled.session.end_profiling())
        for event in json.loads(trace.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                key = event["args"]["op_name"]
                times[key] = times.get(key, 0.0) + event["dur"] / 1e3 / repeats
        trace.unlink()
    else:
        raise ValueError(f"no per-operator profile for {runtime.format}; use an ONNX or OpenVINO file")
    return sorted(times.items(), key=lambda item: -item[1])


def workloads(tasks: Sequence[str], settings: Settings, images: Sequence[np.ndarray],
              extra: Sequence[str] = ()) -> Iterator[Workload]:
    """The workloads of ``tasks`` (a subset of :data:`TASKS`), built one at a time; ``images`` (RGB uint8 photos)
    feed SSDLite and calibrate INT8; ``extra`` variants of ours (:data:`VARIANTS`) are timed beside eager ones."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown benchmark task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if "deploy" in tasks and not installed_formats(settings.deploy_formats):  # fail before the other rows run
        raise ImportError("the deploy rows need a deployment runtime: pip install 'mbbackbones[deploy]', or leave "
                          "deploy out of the tasks")
    common = dict(extra=extra, warmup=settings.warmup)
    yield from backbone_workloads(settings.classify_models, settings.batches, settings.classify_size, tasks=tasks,
                                  **common)
    if "detect" in tasks:
        yield from detection_workloads(images, settings.batches, settings.detect_size, settings.background_logits,
                                       **common)
    if "segment" in tasks:
        yield from segmentation_workloads(settings.segment_shapes, **common)
    if "train" in tasks:
        yield from training_workloads(settings.train_detect_batch, settings.train_segment, extra,
                                      min(settings.warmup, 2))
    if "deploy" in tasks:
        yield from deployment_workloads(images, settings.classify_size, settings.detect_size,
                                        settings.background_logits, settings.deploy_segment, settings.deploy_formats,
                                        settings.warmup)
