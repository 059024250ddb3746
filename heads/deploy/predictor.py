"""One-call prediction: ``heads.Predictor(model)(source)`` gives one result per image (or video frame), on PyTorch
or on an exported file's runtime, with the same pre- and post-processing either way.

The steps of one image: **pre-process** (the uint8 photo resized once to the size the model's class says for its
metadata, :meth:`~heads.task_model.TaskModel.input_size`), **model** (the fused network's ``forward_batch``, or the
runtime), **post-process** (the model class's :meth:`~heads.task_model.TaskModel.results`).
"""
from __future__ import annotations

import copy
import glob
import itertools
import json
import operator
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mbbackbones.choices import ArgumentError

from ..data import IMAGE_SUFFIXES, DataError, read_image
from ..files import atomic_write
from ..loading import load
from ..results import Result, Timings
from .runtimes import Runtime
from .video import STOPPED, VIDEO_SUFFIXES, Video, VideoOutput, frame_stream, open_camera, open_video

# -- sources -------------------------------------------------------------------------------------------------------

class Item(NamedTuple):
    """One image to predict on: RGB uint8 H x W x 3, its file when it has one, and for a video's frame its index and
    time (seconds since the first frame; None where the frames have no clock)."""

    image: np.ndarray
    path: Path | None
    frame: int | None = None
    timestamp: float | None = None


class Source(NamedTuple):
    """Images read one at a time and how many there are (None: not known ahead); for a video's frames, the video."""

    items: Iterator[Item]
    count: int | None
    video: Video | None = None


def list_images(source: str | os.PathLike, videos: bool = False) -> list[Path]:
    """The image files (and with ``videos``, video files) a path names: itself, those in a folder (sorted), or a
    glob's matches."""
    suffixes = IMAGE_SUFFIXES + (VIDEO_SUFFIXES if videos else ())
    kind = "images or videos" if videos else "images"
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"no {kind} ({', '.join(suffixes)}) in {path}")
        return files
    if glob.has_magic(str(source)):
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).suffix.lower() in suffixes)
        if not files:
            raise DataError(f"no {kind} match {source}")
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


def _is_camera(source) -> bool:
    return isinstance(source, int) and not isinstance(source, bool)


def _is_video(entry: Path | int) -> bool:
    return _is_camera(entry) or entry.suffix.lower() in VIDEO_SUFFIXES


def _frames(video: Video) -> Source:
    return Source((Item(frame.image, video.path, frame.index, frame.time) for frame in video), video.count, video)


def open_sources(source, fps: float | None = None) -> list[Source]:
    """What ``source`` holds, opened: a run of still images (files, folders, globs: one source, batched together; a
    list or tuple of images), and each video file, camera index or other iterable of frames as a source of its own.
    ``fps``: the frame rate of an iterable of frames (its time stamps)."""
    if _is_camera(source) or isinstance(source, (str, os.PathLike)):
        source = [source]
    if isinstance(source, (list, tuple)) and all(_is_camera(s) or isinstance(s, (str, os.PathLike)) for s in source):
        entries = [entry for name in source
                   for entry in ([name] if _is_camera(name) else list_images(name, videos=True))]
        sources = []
        for is_video, group in itertools.groupby(entries, key=_is_video):
            if is_video:
                sources += [_frames(open_camera(e) if _is_camera(e) else open_video(e)) for e in group]
            else:
                paths = list(group)
                sources.append(Source((Item(read_image(path), path) for path in paths), len(paths)))
        return sources
    if isinstance(source, (list, tuple)):
        return [Source((Item(_as_image(s), None) for s in source), len(source))]
    if isinstance(source, Iterable) and not isinstance(source, (np.ndarray, Tensor, bytes, dict)):
        return [_frames(frame_stream(source, fps, _as_image))]
    return [Source(iter([Item(_as_image(source), None)]), 1)]


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

    @contextmanager
    def torch_threads(self) -> Iterator[None]:
        """Around an exported file's runtime, torch's own work (resizing, mapping results back) on one thread: the
        runtime's threads have the cores, and torch's OpenMP workers spinning beside them made a 2-thread OpenVINO
        INT8 SSDLite prediction 9.3 ms instead of 7.2."""
        if not isinstance(self.call, Runtime) or torch.get_num_threads() == 1:
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def check_settings(given: dict, settings: dict, name: str, task: str, inside: bool = False) -> dict:
    """``given`` post-processing overrides, checked against the model's ``settings`` (its ``meta["postprocess"]``);
    ``inside``: an exported file that applies them itself, whose detections a higher score threshold or a lower
    cap can only thin out."""
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
    narrower = {"score_thresh": operator.ge, "detections_per_img": operator.le}  # (given, the file's): allowed
    for key, value in given.items():
        if inside and value != settings[key] and not (key in narrower and narrower[key](value, settings[key])):
            option = "max_det" if key == "detections_per_img" else key
            raise ArgumentError(f"{option}={value}: {name} applies its own post-processing ({option}="
                                f"{settings[key]}), which only a higher score_thresh or a lower max_det can narrow; "
                                "export it with --raw to choose the others when predicting")
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
    or a 3 x H x W tensor (uint8, or float in [0, 1]), a list or tuple of those images, a video file (``.mp4``,
    ``.avi``, ``.mov``, ``.mkv``...: what OpenCV reads), a camera index (``0``: the first), or any other iterable of
    images (a generator: a stream of frames), and returns one :class:`~heads.results.Result` per image or frame
    (:class:`~heads.results.Detections` or :class:`~heads.results.Segmentation`; a frame's has its ``frame`` index
    and ``timestamp``). :meth:`stream` yields them one at a time instead: use it for long videos and cameras.
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
            settings.update(check_settings(given, settings, self.meta["name"], self.task,
                                           self.meta.get("postprocessed", False)))
            settings["topk_candidates"] = max(settings["topk_candidates"], settings["detections_per_img"])
        if score_thresh is not None:
            self.meta["draw_score"] = score_thresh
        self.warm = False

    @property
    def categories(self) -> list[str]:
        return self.meta["categories"]

    def __call__(self, source, out: str | os.PathLike | None = None, progress: bool | None = None,
                 fps: float | None = None) -> list[Result]:
        """One result per image or frame of ``source``, all kept in a list (each holds its image): for long videos and
        cameras iterate :meth:`stream`, which keeps one batch. With ``out``, also the files :meth:`stream` writes."""
        opened = self._open(source, out, fps)
        if any(source.count is None for source in opened[0]):
            warnings.warn("the result of every frame is kept until the stream ends; for a camera or generator, "
                          "iterate predictor.stream(...) instead", stacklevel=2)
        return list(self._run(*opened, progress))

    def stream(self, source, out: str | os.PathLike | None = None, progress: bool | None = None,
               fps: float | None = None) -> Iterator[Result]:
        """Results as they come, one at a time (in batches of still images or of a video's frames; a camera's frame by
        frame), with a progress bar in images or frames per second for more than one image (``progress``). Sources
        are opened (and a damaged video refused) by this call, before any prediction.

        With ``out``: for still images, a picture ``<out>/<name>.png`` each and the result files of the model's
        results (detection: ``<out>/detections.json``, COCO results; segmentation: a label-id PNG
        ``<out>/<name>_labelIds.png`` per image); for each video, camera or frame iterable, the annotated video and
        the records of each frame (:class:`~heads.deploy.video.VideoOutput`: ``<out>/<name>.mp4`` and, detection,
        ``<out>/<name>_detections.json``; a segmenter's masks are the results' ``mask``, not written). Inputs are
        never overwritten. Stopping the stream (``break``, Ctrl-C) keeps what was written, complete.

        ``fps``: the frame rate of an iterable of frames (its time stamps and its video's rate, which it needs), or
        the annotated video's in place of the one a file or camera reports.
        """
        return self._run(*self._open(source, out, fps), progress)

    def predictions(self, paths: list[Path]) -> Iterator:
        """Each image file's prediction as evaluation scores it (:meth:`~heads.results.Result.prediction`): the
        adapter through which evaluation scores an exported file."""
        return (result.prediction() for result in self.stream(paths))

    def _open(self, source, out, fps) -> tuple[list[Source], _ImageOutput | None, list[VideoOutput | None]]:
        """The sources, and with ``out``, what it writes for the still images and for each video: checked (a frame
        rate to write at, no input overwritten, no file written twice) before any work."""
        if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
            raise ArgumentError(f"fps={fps} must be a positive number")
        sources = open_sources(source, fps)
        if out is None:
            return sources, None, [None] * len(sources)
        out, records_file, written = Path(out), self.model_cls.result_type.records_file, set()
        videos = [VideoOutput(out, s.video, records_file, fps) if s.video else None for s in sources]
        for video in filter(None, videos):
            _claim(video.files, video.video.path, written)
        return sources, _ImageOutput(out, written), videos

    def _run(self, sources: list[Source], images: _ImageOutput | None, videos: list[VideoOutput | None],
             progress: bool | None) -> Iterator[Result]:
        from tqdm import tqdm

        counts = [source.count for source in sources]
        total = None if None in counts else sum(counts)
        unit = "frame" if any(source.video for source in sources) else "image"
        if images is not None:
            images.out.mkdir(parents=True, exist_ok=True)
        if not self.warm:
            self._warm_up()
        with tqdm(total=total, desc="predict", unit=unit,
                  disable=not (total is None or total > 1 if progress is None else progress)) as bar, \
                images or nullcontext():
            for source, output in zip(sources, videos):
                live = source.video is not None and source.video.live
                with output or nullcontext(images) as writer:
                    for batch in _batches(source.items, 1 if live else self.batch_size, self._input_size):
                        for result in self._predict(batch):
                            if writer is not None:
                                writer.add(result)
                            bar.update()
                            yield result

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
        with self.network.torch_threads():
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
                                          dataset_ids=self.meta.get("dataset_ids"), frame=item.frame,
                                          timestamp=item.timestamp, **fields)


def _claim(files: list[Path], source: Path | None, written: set[Path]) -> None:
    """Reserve the output ``files`` of the input ``source``: refused where one is ``source`` itself, or where another
    input's output already took it."""
    for path in files:
        if path in written:
            raise DataError(f"two inputs would both write {path}: predict them into separate folders")
        if source is not None and path.exists() and path.samefile(source):
            raise DataError(f"{path} is an input: writing there would overwrite it; choose an output folder that "
                            "holds no inputs")
    written.update(files)


class _ImageOutput:
    """What a run writes into ``out`` for its still images: each result's picture and files
    (:meth:`~heads.results.Result.write`), and, when the run ends or is stopped, the records file of them all."""

    def __init__(self, out: Path, written: set[Path]):
        self.out, self.written, self.records, self.records_file = out, written, [], None

    def __enter__(self) -> _ImageOutput:
        return self

    def add(self, result: Result) -> None:
        _claim(result.files(self.out), result.path, self.written)
        result.write(self.out)
        self.records += result.records()
        self.records_file = result.records_file

    def __exit__(self, kind, error, trace) -> None:
        if self.records_file is not None and (kind is None or issubclass(kind, STOPPED)):
            with atomic_write(self.out / self.records_file, "w") as file:
                json.dump(self.records, file)


def _batches(items: Iterator[Item], size: int, input_size) -> Iterator[list[Item]]:
    """Consecutive items in groups of up to ``size`` that share one ``input_size(image)``; a full group goes as soon
    as it is full (a camera's frame is not held back until the next one arrives)."""
    batch: list[Item] = []
    for item in items:
        if batch and input_size(item.image) != input_size(batch[0].image):
            yield batch
            batch = []
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
