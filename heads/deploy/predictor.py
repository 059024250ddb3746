"""One-call prediction: ``heads.Predictor(model)(source)`` gives one result per image, on PyTorch or on an exported
file's runtime, with the same pre- and post-processing either way.

The steps of one image: **pre-process** (the uint8 photo resized once, as the model's metadata says: SSDLite to
its square input, LR-ASPP at its size or its published resize), **model** (the fused network, or the runtime),
**post-process** (SSDLite's :func:`~heads.detection.ssdlite.select_detections`, or the class of each pixel).
"""
from __future__ import annotations

import copy
import glob
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mbbackbones.choices import ArgumentError

from .. import registry
from ..data import DataError, read_image
from ..devices import resolve_device
from ..files import atomic_write

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
RUN_CHECKPOINTS = ("best.pt", "last.pt")  # a run folder's weights, in order of preference
DRAW_SCORE = 0.3  # detections drawn by Result.plot when the predictor keeps the model's low threshold
MAX_PIXELS = 2048 * 2048  # larger images are segmented at this size and the mask scaled back


# -- results -------------------------------------------------------------------------------------------------------

class Timings(NamedTuple):
    """Milliseconds per step of one image's prediction (a batch's time shared out over its images)."""

    preprocess_ms: float
    model_ms: float
    postprocess_ms: float

    @property
    def total_ms(self) -> float:
        return sum(self)

    def __str__(self) -> str:
        return (f"pre-process {self.preprocess_ms:.1f} ms, model {self.model_ms:.1f} ms, "
                f"post-process {self.postprocess_ms:.1f} ms, total {self.total_ms:.1f} ms")

    @classmethod
    def mean(cls, timings: Iterable[Timings]) -> Timings:
        return cls(*np.mean(list(timings), axis=0).tolist())


@dataclass
class Result:
    """One image's prediction: the image (RGB uint8), where it came from, and the model's class names."""

    image: np.ndarray
    path: Path | None
    categories: list[str]
    timings: Timings

    @property
    def name(self) -> str:
        return self.path.stem if self.path is not None else "image"

    def save(self, path: str | os.PathLike, **options) -> Path:
        """:meth:`plot` as a PNG file."""
        path = Path(path)
        with atomic_write(path) as file:
            Image.fromarray(self.plot(**options)).save(file, format="PNG")
        return path


@dataclass
class Detections(Result):
    """Detections in original pixels: ``boxes`` [N, 4] xyxy, ``scores`` [N], ``labels`` [N], best first."""

    boxes: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    scores: Tensor = field(default_factory=lambda: torch.zeros(0))
    labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    dataset_ids: list | None = None
    draw_score: float = DRAW_SCORE

    @property
    def names(self) -> list[str]:
        """The class name of each detection."""
        return [self.categories[label] for label in self.labels.tolist()]

    def plot(self, min_score: float | None = None) -> np.ndarray:
        """The image with the boxes scoring ``min_score`` or more drawn, captioned with class and score."""
        from ..visualize import draw_detections

        threshold = self.draw_score if min_score is None else min_score
        return np.asarray(draw_detections(self.image, self.boxes, self.labels, self.scores, self.categories,
                                          threshold))

    def to_json(self, image_id: int | str | None = None) -> list[dict]:
        """The detections in COCO's results format. ``image_id`` defaults to the file's name, as a number where it
        is one (COCO's ``000000039769.jpg`` is image 39769); categories are the dataset's ids of the labels."""
        from ..detection.evaluate import to_coco_results

        if image_id is None:
            image_id = int(self.name) if self.name.isdigit() else self.name
        ids = self.dataset_ids or list(range(len(self.categories)))
        label_to_category = {label: int(cat) for label, cat in enumerate(ids) if cat is not None and label > 0}
        detections = {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}
        return to_coco_results([detections], [image_id], label_to_category)


@dataclass
class Segmentation(Result):
    """A class index per pixel of the original image (``mask``, H x W uint8), and the palette to show it."""

    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    dataset_ids: list | None = None

    def plot(self, alpha: float = 0.5) -> np.ndarray:
        """The image with each class painted in its colour."""
        from ..visualize import overlay_mask

        return np.asarray(overlay_mask(self.image, self.mask, palette(self.categories), alpha=alpha))

    def label_ids(self) -> np.ndarray:
        """The mask in the dataset's label ids (Cityscapes' for a Cityscapes model), for result files."""
        if not self.dataset_ids:
            return self.mask
        table = np.zeros(256, dtype=np.uint8)
        table[:len(self.dataset_ids)] = self.dataset_ids
        return table[self.mask]


def palette(categories: list[str]) -> np.ndarray:
    """Cityscapes' colours for its 19 classes, else a distinct colour per class."""
    from ..visualize import class_colour

    colours = np.array([class_colour(label) for label in range(256)], dtype=np.uint8)
    if len(categories) == 19:
        from ..segmentation.cityscapes import CLASS_NAMES, PALETTE

        if tuple(categories) == CLASS_NAMES:
            return PALETTE
    return colours


# -- sources -------------------------------------------------------------------------------------------------------

class Item(NamedTuple):
    """One image to predict on: RGB uint8 H x W x 3, and its file when it has one."""

    image: np.ndarray
    path: Path | None


def list_images(source: str | os.PathLike) -> list[Path]:
    """The image files a path names: itself, the images in a folder (sorted), or a glob's matches."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
        return files
    if glob.has_magic(str(source)):
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True)
                       if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"no images match {source}")
        return files
    raise FileNotFoundError(f"input not found: {source}")


def _as_image(value) -> np.ndarray:
    """A PIL image, an H x W x 3 uint8 array or a 3 x H x W tensor (uint8, or float in [0, 1]) as RGB uint8."""
    if isinstance(value, Image.Image):
        return np.asarray(value.convert("RGB"))
    if isinstance(value, Tensor):
        if value.dim() != 3 or value.shape[0] != 3:
            raise ValueError(f"expected a 3 x H x W image tensor, got shape {tuple(value.shape)}")
        if value.is_floating_point():
            value = (value.detach().clamp(0, 1) * 255).round()
        return value.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy()
    image = np.asarray(value)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB array, got {image.dtype} {image.shape}")
    return image


def iter_sources(source) -> tuple[Iterator[Item], int]:
    """The images a source holds, read one at a time, and how many there are."""
    if isinstance(source, (str, os.PathLike)):
        paths = list_images(source)
        return (Item(read_image(path), path) for path in paths), len(paths)
    if isinstance(source, (list, tuple)):
        if all(isinstance(s, (str, os.PathLike)) for s in source):
            paths = [path for s in source for path in list_images(s)]
            return (Item(read_image(path), path) for path in paths), len(paths)
        return (Item(_as_image(s), None) for s in source), len(source)
    return iter([Item(_as_image(source), None)]), 1


# -- networks ------------------------------------------------------------------------------------------------------

def fuse(model: nn.Module) -> nn.Module:
    """An inference copy of a task model: BatchNorm folded into the convolutions, channels-last, eval mode.

    The model itself is left as it was (train it further, or fuse it again later).
    """
    from .export import fold_batchnorm

    fused = fold_batchnorm(model).to(memory_format=torch.channels_last)
    fused.meta = copy.deepcopy(getattr(model, "meta", {}))
    return fused


class _Torch:
    """The network on PyTorch: ``images`` (uint8, N x 3 x H x W) -> the exported outputs' tuple."""

    def __init__(self, model: nn.Module, device: torch.device, fused: bool, compiled: bool):
        model = model.to(device).eval()
        self.network = fuse(model) if fused else model
        self.device = device
        self.call = torch.compile(self._forward) if compiled else self._forward

    def _forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if self.network.task == "detection":
            return self.network.forward_batch(images)  # normalises inside
        return (self.network(self.network.normalize(images)),)

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            return self.call(images.to(self.device))


class _Exported:
    """An exported file on its runtime (``heads.deploy.runtimes``): same inputs and outputs as ``_Torch``."""

    def __init__(self, path: Path, threads: int | None, options: dict):
        from . import runtimes

        self.runtime = runtimes.load(path, threads=threads, **options)
        self.device = torch.device("cpu")

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.runtime(images.float().div_(255)))


# -- the predictor -------------------------------------------------------------------------------------------------

class Predictor:
    """Predict on images with a detector or segmenter, as its metadata says.

    Args:
        model: a registered name (its published weights: ``pretrained=True``), a model instance, a training run
            folder (its ``best.pt``, else ``last.pt``), a weights file (a run's checkpoint; a plain state dict
            with ``name``), or an exported file (``.onnx``, OpenVINO ``.xml``, ExecuTorch ``.pte``, ``.tflite``:
            the runtime follows the file).
        device: ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"``...; exported files run on the CPU.
        score_thresh, nms_thresh, max_det: detection: override the model's score threshold, NMS IoU and
            detections per image (``None``: the model's).
        name: the registered model a plain state dict belongs to.
        batch_size: images per forward pass (same-size images for segmentation).
        fuse: fold BatchNorm and use channels-last (:func:`fuse`); ``compile``: ``torch.compile`` the network
            (slow first call, faster later ones).
        threads, runtime_options: the runtime's thread count and options, for exported files.

    ``predictor(source)`` takes an image path, a folder, a glob, a list of these, a PIL image, an RGB uint8 array
    or a 3 x H x W tensor, and returns one :class:`Detections` or :class:`Segmentation` per image.
    """

    def __init__(self, model, device: str | torch.device = "auto", score_thresh: float | None = None,
                 nms_thresh: float | None = None, max_det: int | None = None, *, name: str | None = None,
                 batch_size: int = 8, fuse: bool = True, compile: bool = False, threads: int | None = None,
                 **runtime_options):
        if batch_size < 1:
            raise ArgumentError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        source = load_network(model, name, resolve_device(device))
        if isinstance(source, Path):
            self.backend = _Exported(source, threads, runtime_options)
            meta = self.backend.runtime.metadata
        else:
            if runtime_options or threads:
                raise ArgumentError(f"threads and runtime options ({', '.join(runtime_options)}) are for exported "
                                 "files; this is a PyTorch model")
            self.backend = _Torch(source, resolve_device(device), fuse, compile)
            meta = source.meta
        self.meta = copy.deepcopy(meta)
        self.task = self.meta["task"]
        overrides = dict(score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=max_det)
        given = {key: value for key, value in overrides.items() if value is not None}
        if self.task == "detection":
            self.meta["postprocess"].update(given)
            self.meta["postprocess"]["topk_candidates"] = max(self.meta["postprocess"]["topk_candidates"],
                                                              self.meta["postprocess"]["detections_per_img"])
        elif given:
            raise ArgumentError(f"{', '.join(given)} are detection settings; this is a segmentation model")
        self.draw_score = DRAW_SCORE if score_thresh is None else score_thresh
        self.warm = False

    @property
    def categories(self) -> list[str]:
        return self.meta["categories"]

    def __call__(self, source, out: str | os.PathLike | None = None, progress: bool | None = None) -> list[Result]:
        """One result per image of ``source``; with ``out``, also pictures and result files there (see
        :meth:`stream`)."""
        return list(self.stream(source, out, progress))

    def stream(self, source, out: str | os.PathLike | None = None,
               progress: bool | None = None) -> Iterator[Result]:
        """Results as they come, in batches, with a progress bar for more than one image (``progress``).

        With ``out``: a picture ``<out>/<name>.png`` per image, and ``<out>/detections.json`` (COCO results) or a
        label-id PNG ``<out>/<name>_labelIds.png`` per image (segmentation). Inputs are never overwritten.
        """
        from tqdm import tqdm

        items, count = iter_sources(source)
        out = Path(out) if out is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        written, detections = set(), []
        if not self.warm:
            self._warm_up()
        bar = tqdm(total=count, desc="predict", unit="image",
                   disable=not (count > 1 if progress is None else progress))
        for batch in _batches(items, self.batch_size, same_size=self.task == "segmentation"):
            for result in self._predict(batch):
                if out is not None:
                    self._write(result, out, written)
                    if isinstance(result, Detections):
                        detections += result.to_json()
                bar.update()
                yield result
        bar.close()
        if out is not None and self.task == "detection":
            with atomic_write(out / "detections.json", "w") as file:
                json.dump(detections, file)

    def _write(self, result: Result, out: Path, written: set) -> None:
        if result.name in written:
            raise DataError(f"two inputs are named {result.name}: their pictures would overwrite each other in "
                            f"{out}; predict them into separate folders")
        written.add(result.name)
        paths = [out / f"{result.name}.png"]
        if isinstance(result, Segmentation):
            paths.append(out / f"{result.name}_labelIds.png")
        for path in paths:
            if result.path is not None and path.exists() and path.samefile(result.path):
                raise DataError(f"{path} is an input: writing its picture would overwrite it; choose an output "
                                "folder that holds no inputs")
        result.save(paths[0])
        if isinstance(result, Segmentation):
            with atomic_write(paths[1]) as file:
                Image.fromarray(result.label_ids()).save(file, format="PNG")

    def _warm_up(self) -> None:
        """One prediction on a blank image, so that first-call costs (allocations, compilation) are not timed."""
        size = self.meta.get("input_size") or [256, 512]
        list(self._predict([Item(np.zeros((*size, 3), dtype=np.uint8), None)]))
        self.warm = True

    def _clock(self) -> float:
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)
        return time.perf_counter()

    def _predict(self, items: list[Item]) -> Iterator[Result]:
        marks = [self._clock()]
        images = torch.cat([self._preprocess(item.image) for item in items])
        marks.append(self._clock())
        outputs = self.backend(images)
        marks.append(self._clock())
        results = [self._postprocess(item, [output[i] for output in outputs], images.shape[-2:])
                   for i, item in enumerate(items)]
        marks.append(self._clock())
        timings = Timings(*(1000 * np.diff(marks) / len(items)).tolist())
        for result in results:
            result.timings = timings
            yield result

    def _preprocess(self, image: np.ndarray) -> Tensor:
        """An H x W x 3 uint8 image as a 1 x 3 x h x w uint8 batch at the model's input size, resized once."""
        image = np.require(image, requirements="W")  # torch wants writable memory (decoded PIL images are not)
        batch = torch.from_numpy(image).to(self.backend.device).permute(2, 0, 1)[None]  # channels-last already
        height, width = image.shape[:2]
        size = self.meta.get("input_size")
        if size is None and self.meta.get("resize"):  # the shorter side to the published size
            scale = self.meta["resize"] / min(height, width)
            size = [round(height * scale), round(width * scale)]
        elif size is None and height * width > MAX_PIXELS:
            scale = (MAX_PIXELS / (height * width)) ** 0.5
            size = [int(height * scale), int(width * scale)]
        if size is not None and list(size) != [height, width]:
            batch = F.interpolate(batch, size=tuple(size), mode="bilinear", align_corners=False)
        return batch

    def _postprocess(self, item: Item, outputs: list[Tensor], input_size) -> Result:
        common = dict(image=item.image, path=item.path, categories=self.categories, timings=None,
                      dataset_ids=self.meta.get("dataset_ids"))
        original = item.image.shape[:2]
        if self.task == "detection":
            from ..detection.ssdlite import select_detections

            boxes, scores = outputs
            found = select_detections(boxes, scores, original, int(input_size[0]), **self.meta["postprocess"])
            return Detections(**common, **{k: v.cpu() for k, v in found.items()}, draw_score=self.draw_score)
        mask = outputs[0].argmax(0).to(torch.uint8)
        if tuple(mask.shape) != original:
            mask = F.interpolate(mask[None, None], size=original, mode="nearest-exact")[0, 0]
        return Segmentation(**common, mask=mask.cpu().numpy())


def _batches(items: Iterator[Item], size: int, same_size: bool) -> Iterator[list[Item]]:
    """Consecutive items in groups of up to ``size`` (of one image size each, with ``same_size``)."""
    batch: list[Item] = []
    for item in items:
        if batch and (len(batch) == size or (same_size and item.image.shape != batch[0].image.shape)):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


# -- loading -------------------------------------------------------------------------------------------------------

def exported_suffixes() -> tuple[str, ...]:
    from .export import FORMATS

    return tuple(FORMATS.values())


def load_network(model, name: str | None, device: torch.device) -> nn.Module | Path:
    """A task model in eval mode on ``device``, or the path of an exported file (see :class:`Predictor`)."""
    if isinstance(model, nn.Module):
        if not hasattr(model, "meta"):
            raise ArgumentError(f"{type(model).__name__} carries no metadata: build it with heads.create_model")
        return model.eval().to(device)
    if isinstance(model, str) and model in registry.ENTRIES and not Path(model).exists():
        return registry.create_model(model, pretrained=True).eval().to(device)
    path = Path(model)
    if path.is_dir():
        path = next((path / file for file in RUN_CHECKPOINTS if (path / file).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no {' or '.join(RUN_CHECKPOINTS)} in the run folder {model}")
    if path.suffix in exported_suffixes():
        if not path.is_file():
            raise FileNotFoundError(f"exported model not found: {path}")
        return path
    return registry.load_checkpoint(path, name)[0].eval().to(device)


@dataclass
class LoadedModel:
    """A model in eval mode with its registry name, class names and, for a training run, the run's config."""

    model: nn.Module
    name: str
    class_names: list[str]
    config: object | None = None  # a TrainConfig

    @property
    def task(self) -> str:
        return self.model.task


def load_model(weights: str | os.PathLike, model: str | None = None, num_classes: int | None = None,
               device: str | torch.device = "cpu", **kwargs) -> LoadedModel:
    """A run folder (its ``best.pt``, else ``last.pt``) or a weights file as a model in eval mode on ``device``;
    ``model`` names the architecture of a plain state dict, ``kwargs`` replace constructor arguments."""
    from ..training.config import make_config

    path = Path(weights)
    if path.is_dir():
        path = next((path / file for file in RUN_CHECKPOINTS if (path / file).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no {' or '.join(RUN_CHECKPOINTS)} in the run folder {weights}")
    network, checkpoint = registry.load_checkpoint(path, model, num_classes=num_classes, **kwargs)
    network = network.eval().to(resolve_device(device))
    config = make_config(checkpoint["config"], str(path)) if isinstance(checkpoint.get("config"), dict) else None
    return LoadedModel(network, network.meta["name"], network.meta["categories"], config)
