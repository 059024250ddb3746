"""Videos for the predictor: video files, cameras and iterables of frames, read one frame at a time, and the annotated
video and per-frame records a run writes for each (OpenCV's reader and writer, imported on first use).

OpenCV decodes to BGR; frames leave here as RGB uint8 H x W x 3, like every other image of the package. The pip
builds of OpenCV encode MPEG-4 Part 2 (``mp4v``) and Motion JPEG, not H.264: an annotated video is ``mp4v`` in
``.mp4``, or ``MJPG`` in ``.avi`` for an ``.avi`` source. A video that cannot be read is one line naming it, so
FFmpeg's own messages (``moov atom not found``...) are silenced, unless ``OPENCV_FFMPEG_LOGLEVEL`` says otherwise
(OpenCV reads it once, when it first uses FFmpeg).
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mbbackbones.choices import ArgumentError

from ..data import DataError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}  # the written container (by the source's suffix) and its codec
STOPPED = (GeneratorExit, KeyboardInterrupt)  # a stream ended by its reader (break, Ctrl-C): its outputs are kept
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


class Frame(NamedTuple):
    """One frame: its index, its time in seconds since the first frame (None: no clock), RGB uint8 H x W x 3."""

    index: int
    time: float | None
    image: np.ndarray


@dataclass
class Video:
    """A stream of frames, read one at a time by iterating it (once).

    ``name``: what its outputs are named after; ``label``: what messages call it; ``path``: its file, if any;
    ``fps``: its frame rate (None: unknown); ``count``: its number of frames (None: not known ahead); ``live``: a
    camera, whose frames are predicted as they arrive rather than batched.
    """

    frames: Iterator[Frame]
    name: str
    label: str
    path: Path | None = None
    fps: float | None = None
    count: int | None = None
    live: bool = False

    def __iter__(self) -> Iterator[Frame]:
        return self.frames


def _capture(target: str | int):
    """An opened ``cv2.VideoCapture`` of a file or camera index, or None (OpenCV's own warnings silenced: the caller
    says what failed, in one line)."""
    import cv2

    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        capture = cv2.VideoCapture(target)
    finally:
        cv2.utils.logging.setLogLevel(level)
    return capture if capture.isOpened() else None


def _read(capture, label: str, count: int | None) -> Iterator[Frame]:
    """The frames of an opened capture, RGB, timed by its clock (the container's time stamps, a camera driver's)."""
    import cv2

    index, start = 0, None
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            clock = capture.get(cv2.CAP_PROP_POS_MSEC)
            start = clock if start is None else start
            yield Frame(index, (clock - start) / 1000, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise DataError(f"{label}: no frame could be read (an empty or damaged video, or a camera that sends nothing)")
    if count is not None and index < count:
        warnings.warn(f"{label}: read {index} of the {count} frames its container reports (truncated or damaged?)",
                      stacklevel=2)


def _opened(capture, label: str, name: str, path: Path | None = None, live: bool = False) -> Video:
    import cv2

    fps = capture.get(cv2.CAP_PROP_FPS)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    count = count if count > 0 and not live else None
    return Video(_read(capture, label, count), name, label, path, fps if np.isfinite(fps) and fps > 0 else None,
                 count, live)


def open_video(path: str | os.PathLike) -> Video:
    """The frames of a video file (any container and codec OpenCV's FFmpeg reads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    capture = _capture(str(path))
    if capture is None:
        raise DataError(f"{path}: OpenCV cannot read it as a video (damaged, not a video, or a codec its FFmpeg "
                        "lacks)")
    return _opened(capture, str(path), path.stem, path)


def open_camera(index: int) -> Video:
    """The frames of camera ``index`` (0: the first), until it stops sending."""
    capture = _capture(index)
    if capture is None:
        raise DataError(f"camera {index} cannot be opened (no such camera, or it is in use); cameras are numbered "
                        "from 0")
    return _opened(capture, f"camera {index}", f"camera{index}", live=True)


def frame_stream(frames: Iterable, fps: float | None, as_image: Callable[[object], np.ndarray]) -> Video:
    """An iterable of images (``as_image`` makes each RGB uint8) as frames, timed by ``fps`` when given."""
    timed = ((index, None if fps is None else index / fps, frame) for index, frame in enumerate(frames))
    return Video((Frame(index, time, as_image(frame)) for index, time, frame in timed), "frames", "the frame iterable",
                 fps=fps)


class VideoOutput:
    """What a run writes into ``out`` for one video: the annotated video ``<name>.mp4`` (``.avi`` for an ``.avi``
    source) at the source's frame rate and frame size (an odd width or height loses its last column or row: OpenCV
    writes even sizes), and, when the results have a records file (detection:
    ``detections.json``), ``<name>_<records file>``: ``{"source", "fps", "frames": [{"frame", "time", <records>},
    ...]}``, written frame by frame. Both are written under temporary names and appear, complete, when the stream
    ends or its reader stops it (``break``, Ctrl-C); after an error, neither does.

    ``fps`` replaces the source's frame rate (required where it has none: an iterable of frames).
    """

    def __init__(self, out: Path, video: Video, records_file: str | None, fps: float | None = None):
        self.fps = fps or video.fps
        if self.fps is None:
            raise ArgumentError(f"{video.label}: no frame rate to write the annotated video at; pass fps= "
                                "(tools/infer.py: --fps)")
        self.video = video
        suffix = ".avi" if video.path is not None and video.path.suffix.lower() == ".avi" else ".mp4"
        self.path = out / f"{video.name}{suffix}"
        self.records_path = out / f"{video.name}_{records_file}" if records_file else None
        self.key = Path(records_file).stem if records_file else None
        self.files = [self.path, *([self.records_path] if records_file else [])]
        token = uuid.uuid4().hex[:8]  # the temporary names keep the suffix: OpenCV picks the container by it
        self.partial = {path: path.with_name(f".{token}.{path.name}") for path in self.files}
        self.writer = self.size = self.records = None
        self.frames = 0

    def __enter__(self) -> VideoOutput:
        if self.records_path is not None:
            self.records = open(self.partial[self.records_path], "w")
            source = str(self.video.path) if self.video.path is not None else self.video.label
            self.records.write(json.dumps({"source": source, "fps": self.fps})[:-1] + ', "frames": [')
        return self

    def add(self, result) -> None:
        """One frame's result: its picture (``result.plot()``) into the video, its records into the records file."""
        import cv2

        picture = result.plot()
        size = picture.shape[1], picture.shape[0]
        if self.writer is None:
            fourcc = FOURCC[self.path.suffix]
            self.size = size
            self.writer = cv2.VideoWriter(str(self.partial[self.path]), cv2.VideoWriter_fourcc(*fourcc), self.fps,
                                          size)
            if not self.writer.isOpened():
                raise DataError(f"OpenCV cannot write {self.path} ({fourcc}, {size[0]}x{size[1]} at {self.fps:g} "
                                "fps)")
            if size[0] % 2 or size[1] % 2:
                warnings.warn(f"{self.video.label} is {size[0]}x{size[1]}: OpenCV writes even sizes, so {self.path} "
                              f"is {size[0] // 2 * 2}x{size[1] // 2 * 2} (its last column or row cut)", stacklevel=2)
        elif size != self.size:
            raise DataError(f"{self.video.label}: frame {result.frame} is {size[0]}x{size[1]}, the first was "
                            f"{self.size[0]}x{self.size[1]}; a video has one frame size")
        self.writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        if self.records is not None:
            entry = {"frame": result.frame, "time": result.timestamp, self.key: result.records()}
            self.records.write(("\n" if self.frames == 0 else ",\n") + json.dumps(entry))
        self.frames += 1

    def __exit__(self, kind, error, trace) -> None:
        keep = self.frames > 0 and (kind is None or issubclass(kind, STOPPED))
        if self.writer is not None:
            self.writer.release()
        if self.records is not None:
            if keep:
                self.records.write("\n]}\n")
            self.records.close()
        for path, partial in self.partial.items():
            if keep:
                os.replace(partial, path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)
