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
from PIL import Image
from torch import Tensor, nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

import mbbackbones
from heads.deploy.export import normalizer
from heads.registry import ENTRIES, create_model
from heads.training.engine import recalibrate_bn
from heads.training.tasks import DetectionTask, SegmentationTask
from mbbackbones.checkpoint import convert
from mbbackbones.profile import count_madds, count_params

from .harness import (
    COUNTERPARTS,
    Contender,
    Workload,
    backbone_workloads,
    published,
)

if TYPE_CHECKING:
    from heads.deploy.runtimes import Runtime

TASKS = ("classify", "features", "detect", "segment", "train", "deploy")
DETECTOR, SEGMENTER = "ssdlite320_mbv3_large_reduced", "lraspp_mbv3_large"
# MobileNetV4 rows beside them: random weights calibrated like the V3 ones (no torchvision counterpart to load)
V4_DETECTOR, V4_SEGMENTER = "ssdlite320_mbv4_conv_small", "lraspp_mbv4_conv_small"
TORCHVISION_DETECTOR = "torchvision ssdlite320_mobilenet_v3_large"
TORCHVISION_SEGMENTER = "torchvision lraspp_mobilenet_v3_large ['out']"
# heads.Predictor on PyTorch, photo in, result out, against torchvision eager (issue 13)
PREDICT_TARGETS = {"detect": 0.50, "segment": 0.50}
TRAIN_TARGETS = {"detect": 1.6, "segment": 1.4}  # training images per second, ours over torchvision's
SEGMENT_MADDS_SIZE = (256, 512)  # LR-ASPP MAdds are counted here and scaled by pixels (its cost is linear in them)
# deployment runtimes against torchvision eager, photo in, result out: the best of each precision should meet these
# (issue 19)
DEPLOY_TARGETS = {"detect": {"fp32": 0.20, "int8": 0.10}, "segment": {"fp32": 0.25, "int8": 0.15}}
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
    deploy_classifiers: tuple[str, ...]  # exported and timed against their COUNTERPARTS reference
    deploy_segment: tuple[tuple[int, int], ...]  # (height, width) of each LR-ASPP row
    deploy_formats: tuple[str, ...]  # runtimes timed (those installed)
    repeats: int
    warmup: int
    budget_s: float  # timed seconds per workload, once three rounds are done


FULL = Settings(None, 224, (1, 8), (480, 640), (9.0, 0.0), (((1024, 2048), (1,)), ((512, 1024), (1, 4))), 32,
                ((256, 512), 32), ("mbv3_large", "mbv4_conv_small", "mbv4_conv_medium"), ((1024, 2048), (512, 1024)),
                FORMATS_TIMED, 20, 5, 30.0)
QUICK = Settings(("mbv3_large_reduced", "mbv3_small"), 96, (1,), (240, 320), (9.0,), (((128, 256), (1,)),), 2,
                 ((128, 256), 1), ("mbv3_large", "mbv4_conv_small"), ((128, 256),), ("onnx", "openvino"), 3, 1, 1.0)


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
    with torch.random.fork_rng():  # the same network in every workload, so their rows share one label
        torch.manual_seed(0)
        model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    recalibrate_bn(model, [images], _TorchvisionDetection, "cpu", batches=1)
    return _confident(model, background_logit)


def seeded_model(name: str, **kwargs) -> nn.Module:
    """Our registered task model ``name`` with the random weights of seed 0 (the same in every workload)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return create_model(name, **kwargs).eval()


def calibrated_detector(name: str, images: list[Tensor], background_logit: float = 0.0) -> nn.Module:
    """Our registered detector ``name`` calibrated as :func:`calibrated_torchvision_detector` does it."""
    model = seeded_model(name)
    recalibrate_bn(model, [(images, None)], DetectionTask, "cpu", batches=1)
    return _confident(model, background_logit).eval()


def _confident(model: nn.Module, background_logit: float) -> nn.Module:
    """``model`` (an SSDLite, ours or torchvision's) with ``background_logit`` added to each anchor's background."""
    scores = model.head.classification_head
    with torch.no_grad():
        for block in scores.module_list:
            block[-1].bias[0::scores.num_columns] += background_logit  # channels are anchor-major
    return model


def candidates(model: nn.Module, image: Tensor) -> int:
    """How many (anchor, class) pairs of our detector pass its score threshold on ``image`` ([0, 1], any size)."""
    with torch.inference_mode():
        scores = model.forward_batch(model.resize(image)[None])[1][0, :, 1:]
    return int((scores > model.score_thresh).sum())


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


def photo_at(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 photo resized to ``size`` (height, width): what a camera or a file decoder hands over."""
    return np.array(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))


def to_tensor(photo: np.ndarray) -> Tensor:
    """A uint8 H x W x 3 photo as torchvision's models take it: a 3 x H x W float tensor in [0, 1]."""
    return torch.from_numpy(photo).permute(2, 0, 1).float().div(255)


def calibrated_pair(images: Sequence[np.ndarray], size=(480, 640),
                    background_logit: float = 0.0) -> tuple[nn.Module, nn.Module, str]:
    """torchvision's SSDLite calibrated on ``images`` (RGB uint8 photos), ours with its weights, and their label
    for the table: sizes and the post-processing load."""
    inputs = as_inputs(images, size)
    reference = calibrated_torchvision_detector(inputs, background_logit).eval()
    ours = from_torchvision(DETECTOR, reference)
    return reference, ours, f"{size[1]}x{size[0]} photo -> 320, {candidates(ours, inputs[0]):,} candidates"


def _detect(reference: nn.Module, photos: Sequence[np.ndarray]):
    """torchvision's way from photos to detections: tensors in [0, 1], then the model (resize, normalise, NMS)."""
    return reference([to_tensor(photo) for photo in photos])


def _segment(reference: nn.Module, normalize: nn.Module, photos: Sequence[np.ndarray]) -> Tensor:
    """torchvision's way from photos to class masks: normalised tensors, the model, the argmax of its logits."""
    return reference(normalize(torch.stack([to_tensor(photo) for photo in photos]))).argmax(1)


def predictor_contenders(name: str, model: nn.Module, photos: Sequence[np.ndarray], madds_m: float,
                         extra: Sequence[str] = (), target: float | None = None) -> tuple[Contender, ...]:
    """``heads.Predictor(model)(photos)`` as a user calls it (fused network, uint8 resize, post-processing), and
    with ``torch.compile`` when ``extra`` asks for it (its first calls compile, in the warm-up); ``madds_m``: the
    network's millions of multiply-adds per image at the size it runs."""
    from heads.deploy.predictor import Predictor

    size = dict(params=count_params(model), madds_m=madds_m)
    variants = {"Predictor": {}, **({"Predictor compiled": {"compile": True}} if "compiled" in extra else {})}
    return tuple(Contender(name, partial(Predictor(model, batch_size=len(photos), **options), photos, progress=False),
                           variant=label, target=target if not options else None, **size)
                 for label, options in variants.items())


def _madds_m(model: nn.Module) -> float:
    """Millions of multiply-adds of the network for one image at the size it is timed at (detection: its own)."""
    x = torch.rand(1, 3, *model.export_size(SEGMENT_MADDS_SIZE if model.dynamic_size() else None))
    return round(count_madds(_Call(model.forward_batch), x) / 1e6, 1)


class _Call(nn.Module):
    """A callable as a module, for the flop counter."""

    def __init__(self, call: Callable):
        super().__init__()
        self.call = call

    def forward(self, x: Tensor):
        return self.call(x)


def detection_workloads(images: Sequence[np.ndarray], batches=(1, 8), size=(480, 640), background_logits=(0.0,),
                        extra: Sequence[str] = (), warmup: int = 5) -> Iterator[Workload]:
    """Photos in, detections out: ``images`` (RGB uint8) at the original ``size``; torchvision converts them to
    tensors and runs its model, ours are the model's API on the same tensors and ``heads.Predictor`` on the photos;
    one set of rows per score regime (see :func:`calibrated_torchvision_detector`)."""
    for background_logit in background_logits:
        reference, ours, label = calibrated_pair(images, size, background_logit)
        v4 = calibrated_detector(V4_DETECTOR, as_inputs(images, size), background_logit)
        photos = [photo_at(image, size) for image in images]
        for batch in batches:
            chosen = [photos[i % len(photos)] for i in range(batch)]
            rows = []
            for name, model, target in ((DETECTOR, ours, PREDICT_TARGETS["detect"]), (V4_DETECTOR, v4, None)):
                madds_m = _madds_m(model)
                rows += [Contender(name, partial(_detect, model, chosen), count_params(model), madds_m, "model"),
                         *predictor_contenders(name, model, chosen, madds_m, extra, target)]
            yield Workload("detect", label, batch, TORCHVISION_DETECTOR, partial(_detect, reference, chosen),
                           tuple(rows), published(ENTRIES, DETECTOR), warmup=warmup)


def segmentation_workloads(images: Sequence[np.ndarray], shapes=(((512, 1024), (1,)),), extra: Sequence[str] = (),
                           warmup: int = 5) -> Iterator[Workload]:
    """Photos in, class masks out, LR-ASPP with 19 classes (Cityscapes); ``images`` (RGB uint8) resized to each
    shape. Ours: the model's API on the same tensors as torchvision's, and ``heads.Predictor`` on the photos."""
    torchvision = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19)
    ours = from_torchvision(SEGMENTER, torchvision, num_classes=19)
    v4 = seeded_model(V4_SEGMENTER, num_classes=19)
    reference = Logits(torchvision, ours.normalize).eval()
    for (height, width), batches in shapes:
        for batch in batches:
            photos = [photo_at(images[i % len(images)], (height, width)) for i in range(batch)]
            rows = []
            for name, model, target in ((SEGMENTER, ours, PREDICT_TARGETS["segment"]), (V4_SEGMENTER, v4, None)):
                target = target if (height, width) == (1024, 2048) else None
                madds_m = _madds_m(model) * height * width / np.prod(SEGMENT_MADDS_SIZE)
                rows += [Contender(name, partial(_segment, model, model.normalize, photos), count_params(model),
                                   madds_m, "model"),
                         *predictor_contenders(name, model, photos, madds_m, extra, target)]
            yield Workload("segment", f"{width}x{height} photo", batch, TORCHVISION_SEGMENTER,
                           partial(_segment, reference, ours.normalize, photos), tuple(rows),
                           published(ENTRIES, SEGMENTER), warmup=warmup)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, losses: Callable, batch) -> None:
    """Forward, backward and optimizer step, with the training engine's task losses."""
    loss = sum(losses(model, batch, "cpu").values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _trainer(model: nn.Module, losses: Callable, batch, engine: bool) -> Callable[[], None]:
    """A training step as torchvision's references take it (``engine=False``), or as our engine does: the model in
    channels-last and a fused optimizer step (``heads.training.engine``)."""
    if engine:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.train().parameters(), lr=1e-3, momentum=0.9, weight_decay=4e-5,
                                fused=True if engine else None)
    return partial(train_step, model, optimizer, losses, batch)


def _training(name: str, ours: nn.Module, reference_name: str, reference: nn.Module, losses: Callable, batch,
              size: str, warmup: int, target: float) -> Workload:
    step = Contender(name, _trainer(ours, losses, batch, engine=True), count_params(ours), None, "engine",
                     target=target)
    return Workload("train", size, len(batch[0]), reference_name, _trainer(reference, losses, batch, engine=False),
                    (step,), training=True, warmup=warmup)


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


def training_workloads(detect_batch: int = 32, segment=((256, 512), 32), warmup: int = 2) -> Iterator[Workload]:
    """One SGD step of SSDLite at 320 (random boxes) and of LR-ASPP (random masks): ours as the training engine
    runs it, torchvision's as its references do. The targets are on images per second (the inverse ratio)."""
    torchvision = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    batch = ([torch.rand(3, 320, 320) for _ in range(detect_batch)], random_targets(detect_batch, 320))
    yield _training(DETECTOR, from_torchvision(DETECTOR, torchvision), TORCHVISION_DETECTOR, torchvision,
                    DetectionTask.losses, batch, "320x320", warmup, 1 / TRAIN_TARGETS["detect"])
    (height, width), count = segment
    torchvision = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19)
    batch = (torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8),
             torch.randint(0, 19, (count, height, width)))
    ours = from_torchvision(SEGMENTER, torchvision, num_classes=19)
    yield _training(SEGMENTER, ours, TORCHVISION_SEGMENTER, Logits(torchvision, ours.normalize),
                    SegmentationTask.losses, batch, f"{width}x{height}", warmup, 1 / TRAIN_TARGETS["segment"])


def first_output(runtime: Runtime, images: Tensor) -> Tensor:
    return runtime(images)[0]


def runtime_contenders(name: str, model: nn.Module, folder: Path, size, calibration: list[np.ndarray],
                       call: Callable[[Path], Callable[[], object]], madds_m: float | None, formats: Sequence[str],
                       targets: dict[str, float] | None = None) -> Iterator[Contender]:
    """``call(exported file)`` (the work to time) for ``model`` exported to each of ``formats`` (those installed),
    fp32 and INT8 (calibrated on ``calibration``); ``targets``: per precision."""
    from heads.deploy import runtimes

    for format in formats:
        for precision in ("fp32", "int8"):
            path = runtimes.export(model, folder / f"{name}-{precision}{runtimes.FORMATS[format]}", size=size,
                                   int8=precision == "int8", calibration=calibration)
            yield Contender(name, call(path), count_params(model), madds_m, f"{format} {precision}",
                            (targets or {}).get(precision))


def installed_formats(formats: Sequence[str]) -> list[str]:
    """The ``formats`` whose runtime packages are installed."""
    return [f for f in formats if all(importlib.util.find_spec(module) for module in RUNTIME_PACKAGES[f])]


def deployment_workloads(images: Sequence[np.ndarray], classify_size: int = 224, detect_size=(480, 640),
                         background_logits=(0.0,), segment_sizes=((512, 1024),), formats=FORMATS_TIMED,
                         classifiers=("mbv3_large",), warmup: int = 5) -> Iterator[Workload]:
    """Ours exported to each deployment runtime (fp32, and INT8 calibrated on ``images``) against torchvision eager,
    batch 1: classification (the runtime alone), and photos in, results out through ``heads.Predictor`` on the
    exported file for SSDLite (per score regime) and LR-ASPP, as in :func:`detection_workloads`."""
    from heads.deploy import runtimes
    from heads.deploy.export import model_input
    from heads.deploy.predictor import Predictor

    formats = installed_formats(formats)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image = torch.rand(1, 3, classify_size, classify_size)
        for name in classifiers:  # ours with the reference's weights
            reference_name, build = COUNTERPARTS[name]
            reference, ours = build().eval(), timm.create_model(name).eval()
            ours.load_state_dict(convert(reference.state_dict(), ours))
            calibration = [model_input(ours, photo, classify_size) for photo in images]
            madds_m = round(count_madds(ours, image) / 1e6, 1)
            contenders = tuple(runtime_contenders(
                name, ours, folder, classify_size, calibration,
                lambda path: partial(first_output, runtimes.load(path, threads=threads), image), madds_m, formats))
            yield Workload("deploy", f"{classify_size}x{classify_size}", 1, reference_name,
                           partial(reference, normalizer(ours)(image)), contenders,
                           published(mbbackbones.ENTRIES, name), warmup=warmup)

        def predicting(photos):
            return lambda path: partial(Predictor(path, threads=threads), photos, progress=False)

        for background_logit in background_logits:
            reference, ours, label = calibrated_pair(images, detect_size, background_logit)
            v4 = calibrated_detector(V4_DETECTOR, as_inputs(images, detect_size), background_logit)
            photos = [photo_at(images[0], detect_size)]
            contenders = tuple(contender for name, model, targets in (
                (DETECTOR, ours, DEPLOY_TARGETS["detect"]), (V4_DETECTOR, v4, None))
                for contender in runtime_contenders(name, model, folder, None,
                                                    [model_input(model, photo) for photo in images],
                                                    predicting(photos), _madds_m(model), formats, targets))
            yield Workload("deploy", label, 1, TORCHVISION_DETECTOR, partial(_detect, reference, photos), contenders,
                           published(ENTRIES, DETECTOR), warmup=warmup)

        torchvision = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19)
        ours = from_torchvision(SEGMENTER, torchvision, num_classes=19)
        v4 = seeded_model(V4_SEGMENTER, num_classes=19)
        reference = Logits(torchvision, ours.normalize).eval()
        for size in segment_sizes:
            photos = [photo_at(images[0], size)]
            targets = DEPLOY_TARGETS["segment"] if tuple(size) == (1024, 2048) else None
            scale = size[0] * size[1] / np.prod(SEGMENT_MADDS_SIZE)
            contenders = tuple(contender for name, model, goals in ((SEGMENTER, ours, targets),
                                                                    (V4_SEGMENTER, v4, None))
                               for contender in runtime_contenders(
                                   name, model, folder, size, [model_input(model, photo, size) for photo in images],
                                   predicting(photos), _madds_m(model) * scale, formats, goals))
            yield Workload("deploy", f"{size[1]}x{size[0]} photo", 1, TORCHVISION_SEGMENTER,
                           partial(_segment, reference, ours.normalize, photos), contenders,
                           published(ENTRIES, SEGMENTER), warmup=warmup)


def op_breakdown(runtime: Runtime, images: Tensor, repeats: int = 10) -> list[tuple[str, float]]:
    """Where a runtime's time goes: (operator, ms per call) summed by operator type, slowest first.

    OpenVINO: its performance counters, the type with the kernel that ran it (``Convolution jit_avx512_I8``
    says an integer kernel; ``... FP32`` a float one); ONNX Runtime: its profiler's node events by operator type.
    """
    from heads.deploy import runtimes

    times: dict[str, float] = {}
    if isinstance(runtime, runtimes.OpenVinoRuntime):
        request = runtimes.OpenVinoRuntime(runtime.path, runtime.threads, config={"PERF_COUNT": True}).request
        array = runtime.graph_input(images)
        for _ in range(repeats):
            request.infer(array)
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
        yield from segmentation_workloads(images, settings.segment_shapes, **common)
    if "train" in tasks:
        yield from training_workloads(settings.train_detect_batch, settings.train_segment, min(settings.warmup, 2))
    if "deploy" in tasks:
        yield from deployment_workloads(images, settings.classify_size, settings.detect_size,
                                        settings.background_logits, settings.deploy_segment, settings.deploy_formats,
                                        settings.deploy_classifiers, settings.warmup)


def targets_table(result: dict) -> str:
    """The headline: each speed target of the project (PyTorch predictor, best deployed runtime per precision,
    training throughput) with the measured ratio to torchvision in the same run; '—' where the run lacks the row."""
    rows = result["rows"]
    detect = [r for r in rows if r["task"] == "detect" and r["batch"] == 1 and r["variant"] == "Predictor"]
    confident = min((r["input"] for r in detect), default=None,
                    key=lambda label: int(label.split(", ")[-1].split()[0].replace(",", "")))
    columns = {"detect": (confident, DETECTOR), "segment": ("2048x1024 photo", SEGMENTER)}

    def cell(candidates: list[dict], target: float, better: str = "lower") -> str:
        if not candidates:
            return "—"
        if better == "lower":
            best = min(candidates, key=lambda r: r["ratio"])
            verdict = "meets" if best["ratio"] <= target else "misses"
            return f"{best['ratio']}x ({best['ms_median']} ms, {best['variant']}; {verdict} ≤ {target}x)"
        best = max(candidates, key=lambda r: r["images_per_s"] / r["reference_images_per_s"])
        gain = round(best["images_per_s"] / best["reference_images_per_s"], 2)
        verdict = "meets" if gain >= target else "misses"
        return f"{gain}x ({best['images_per_s']} vs {best['reference_images_per_s']} img/s; {verdict} ≥ {target}x)"

    def matching(task: str, key: str, variant=lambda v: True) -> list[dict]:
        label, model = columns[key]
        return [r for r in rows if r["task"] == task and r["input"] == label and r["batch"] == 1
                and variant(r["variant"]) and r["model"] == model]

    lines = [f"| path | SSDLite 320, {confident or '640x480 photo'} | LR-ASPP 19 classes, 2048x1024 photo |",
             "|---|---|---|",
             "| `heads.Predictor` on PyTorch | " + " | ".join(
                 cell(matching(key, key, lambda v: v == "Predictor"), PREDICT_TARGETS[key]) for key in columns) + " |"]
    for precision in ("fp32", "int8"):
        cells = [cell(matching("deploy", key, lambda v, p=precision: v.endswith(p)), DEPLOY_TARGETS[key][precision])
                 for key in columns]
        lines.append(f"| best deployed runtime, {precision} | " + " | ".join(cells) + " |")
    train = {key: [r for r in rows if r["task"] == "train" and r["model"] == columns[key][1]] for key in columns}
    batch = next((r["batch"] for r in rows if r["task"] == "train"), "")
    lines.append(f"| training step, batch {batch} (img/s) | " + " | ".join(
        cell(train[key], TRAIN_TARGETS[key], "higher") for key in columns) + " |")
    return "\n".join(lines)
