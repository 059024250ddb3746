"""One-call prediction: ``heads.Predictor(model)(source)`` gives one result per image, on PyTorch or on an exported
file's runtime, with the same pre- and post-processing either way.

The steps of one image: **pre-process** (the uint8 photo resized once to the size the model's class says for its
metadata, :meth:`~heads.task_model.TaskModel.input_size`), **model** (the fused network's ``forward_batch``, or the
runtime), **post-process** (the model class's :meth:`~heads.task_model.TaskModel.results`).
"""
from __future__ import annotations

import copy
import glob
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mbbackbones.choices import ArgumentError

from ..data import DataError, read_image
from ..files import atomic_write
from ..loading import load
from ..results import Result, Timings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
            low, high = (value.min().item(), value.max().item()) if value.numel() else (0.0, 0.0)
            if not (0 <= low and high <= 1):  # also NaN
                raise ArgumentError(f"float images are in [0, 1], this one spans {low:g}..{high:g}; pass uint8 for "
                                    "0..255")
            value = (value.detach() * 255).round()
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


class _Network:
    """What runs a batch: ``network(images)`` (uint8 N x 3 x H x W) -> ``forward_batch``'s outputs, on PyTorch (the
    fused model, optionally compiled) or on an exported file's runtime."""

    def __init__(self, loaded, fused: bool, compiled: bool):
        if loaded.runtime is not None:
            self.call, self.device = loaded.runtime, torch.device("cpu")
            return
        model = fuse(loaded.model) if fused else loaded.model
        self.device = next(model.parameters()).device
        self.call = torch.compile(model.forward_batch) if compiled else model.forward_batch

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            return tuple(self.call(images.to(self.device)))


def check_settings(given: dict, settings: dict, name: str, task: str) -> dict:
    """``given`` post-processing overrides, checked against the model's ``settings`` (its ``meta["postprocess"]``)."""
    unknown = [key for key in given if key not in settings]
    if unknown:
        raise ArgumentError(f"{', '.join(unknown)} are detection settings; {name} is a {task} model with "
                            f"{', '.join(settings) or 'no post-processing settings'}")
    for key in ("score_thresh", "nms_thresh"):
        if key in given and not (isinstance(given[key], (int, float)) and 0 <= given[key] <= 1):
            raise ArgumentError(f"{key}={given[key]} must be a number in [0, 1]")
    count = given.get("detections_per_img")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ArgumentError(f"max_det={count} must be an integer of at least 1")
    return given


# -- the predictor -------------------------------------------------------------------------------------------------

class Predictor:
    """Predict on images with a detector or segmenter, as its metadata says.

    Args:
        model: a registered name (its published weights: ``pretrained=True``), a model instance, a training run
            folder (its ``best.pt``, else ``last.pt``), a weights file (a run's checkpoint; a plain state dict
            with ``name``), or an exported file (``.onnx``, OpenVINO ``.xml``, ExecuTorch ``.pte``, ``.tflite``:
            the runtime follows the file); see :func:`heads.loading.load`.
        device: ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"``...; exported files run on the CPU.
        score_thresh, nms_thresh, max_det: detection: override the model's score threshold (in [0, 1]), NMS IoU
            (in [0, 1]) and detections per image (at least 1); ``None``: the model's.
        name: the registered model a plain state dict belongs to.
        batch_size: images per forward pass (images of one input size share a batch).
        fuse: fold BatchNorm and use channels-last (:func:`fuse`); ``compile``: ``torch.compile`` the network
            (slow first call, faster later ones).
        threads, runtime_options: the runtime's thread count and options, for exported files.

    ``predictor(source)`` takes an image path, a folder, a glob, a list of these, a PIL image, an RGB uint8 array
    or a 3 x H x W tensor (uint8, or float in [0, 1]), and returns one :class:`~heads.results.Result` per image
    (:class:`~heads.results.Detections` or :class:`~heads.results.Segmentation`).
    """

    def __init__(self, model, device: str | torch.device = "auto", score_thresh: float | None = None,
                 nms_thresh: float | None = None, max_det: int | None = None, *, name: str | None = None,
                 batch_size: int = 8, fuse: bool = True, compile: bool = False, threads: int | None = None,
                 **runtime_options):
        if batch_size < 1:
            raise ArgumentError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        loaded = load(model, name, device, threads=threads, runtime_options=runtime_options)
        self.network = _Network(loaded, fuse, compile)
        self.model_cls = loaded.model_cls
        self.meta = copy.deepcopy(loaded.meta)
        self.task = self.meta["task"]
        overrides = dict(score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=max_det)
        given = {key: value for key, value in overrides.items() if value is not None}
        if given:
            settings = self.meta.setdefault("postprocess", {})
            settings.update(check_settings(given, settings, self.meta["name"], self.task))
            settings["topk_candidates"] = max(settings["topk_candidates"], settings["detections_per_img"])
        if score_thresh is not None:
            self.meta["draw_score"] = score_thresh
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

        With ``out``: a picture ``<out>/<name>.png`` per image, and the result files of the model's results
        (detection: ``<out>/detections.json``, COCO results; segmentation: a label-id PNG
        ``<out>/<name>_labelIds.png`` per image). Inputs are never overwritten.
        """
        from tqdm import tqdm

        items, count = iter_sources(source)
        out = Path(out) if out is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        written, records, records_file = set(), [], None
        if not self.warm:
            self._warm_up()
        bar = tqdm(total=count, desc="predict", unit="image",
                   disable=not (count > 1 if progress is None else progress))
        for batch in _batches(items, self.batch_size, self._input_size):
            for result in self._predict(batch):
                if out is not None:
                    self._write(result, out, written)
                    records += result.records()
                    records_file = result.records_file
                bar.update()
                yield result
        bar.close()
        if out is not None and records_file is not None:
            with atomic_write(out / records_file, "w") as file:
                json.dump(records, file)

    def predictions(self, paths: list[Path]) -> Iterator:
        """Each image file's prediction as evaluation scores it (:meth:`~heads.results.Result.prediction`): the
        adapter through which evaluation scores an exported file."""
        return (result.prediction() for result in self.stream(paths))

    def _write(self, result: Result, out: Path, written: set) -> None:
        if result.name in written:
            raise DataError(f"two inputs are named {result.name}: their pictures would overwrite each other in "
                            f"{out}; predict them into separate folders")
        written.add(result.name)
        for path in result.files(out):
            if result.path is not None and path.exists() and path.samefile(result.path):
                raise DataError(f"{path} is an input: writing its picture would overwrite it; choose an output "
                                "folder that holds no inputs")
        result.write(out)

    def _input_size(self, image: np.ndarray) -> tuple[int, int]:
        return tuple(self.model_cls.input_size(self.meta, *image.shape[:2]))

    def _warm_up(self) -> None:
        """One prediction on a blank image, so that first-call costs (allocations, compilation) are not timed."""
        size = self.meta.get("input_size") or [256, 512]
        list(self._predict([Item(np.zeros((*size, 3), dtype=np.uint8), None)]))
        self.warm = True

    def _clock(self) -> float:
        if self.network.device.type == "cuda":
            torch.cuda.synchronize(self.network.device)
        return time.perf_counter()

    def _predict(self, items: list[Item]) -> Iterator[Result]:
        marks = [self._clock()]
        images = torch.cat([self._preprocess(item.image) for item in items])
        marks.append(self._clock())
        outputs = self.network(images)
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
        batch = torch.from_numpy(image).to(self.network.device).permute(2, 0, 1)[None]  # channels-last already
        size = self._input_size(image)
        if size != image.shape[:2]:
            batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        return batch

    def _postprocess(self, item: Item, outputs: list[Tensor], input_size) -> Result:
        fields = self.model_cls.results(outputs, self.meta, input_size, item.image.shape[:2])
        return self.model_cls.result_type(image=item.image, path=item.path, categories=self.categories, timings=None,
                                          dataset_ids=self.meta.get("dataset_ids"), **fields)


def _batches(items: Iterator[Item], size: int, input_size) -> Iterator[list[Item]]:
    """Consecutive items in groups of up to ``size`` that share one ``input_size(image)``."""
    batch: list[Item] = []
    for item in items:
        if batch and (len(batch) == size or input_size(item.image) != input_size(batch[0].image)):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch
