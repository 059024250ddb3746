"""heads.Predictor on videos, cameras and iterables of frames: the results of the frames as OpenCV decodes them, the
annotated video and per-frame detections it writes, one-line errors, and memory that does not grow with the video."""
import json
import tracemalloc

import cv2
import numpy as np
import pytest
import torch
from conftest import randomize_batchnorm

import heads
from heads.cli import infer_main
from heads.data import DataError, read_image
from heads.deploy.predictor import Predictor

DETECTOR, SEGMENTER = "ssdlite320_mbv3_small_reduced", "lraspp_mbv3_small_reduced"
FPS, HEIGHT, WIDTH, SIZE = 10.0, 96, 128, 160
CODECS = {".avi": "MJPG", ".mp4": "mp4v"}
pytestmark = pytest.mark.usefixtures("one_thread")
VideoCapture = cv2.VideoCapture  # the tests' reader, while a camera's stand-in replaces it for the predictor


def untrained_detector():
    """Untrained but deterministic, at 160 pixels, with BatchNorm statistics that spread its scores."""
    torch.manual_seed(0)
    return randomize_batchnorm(heads.create_model(DETECTOR, size=SIZE))


@pytest.fixture(scope="module")
def detector():
    """It keeps (and draws) its top 10 boxes scoring 0.015 or more."""
    return Predictor(untrained_detector(), score_thresh=0.015, max_det=10)


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return Predictor(heads.create_model(SEGMENTER).eval())


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """12 RGB frames: the two sample photos, small, each panned over 6 frames."""
    photos = [cv2.resize(read_image(path), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
              for path in heads.SAMPLE_IMAGES.values()]
    return [np.roll(photo, 6 * step, axis=1) for photo in photos for step in range(6)]


def write_video(path, frames, fps=FPS):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*CODECS[path.suffix]), fps, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV writes BGR
    writer.release()
    return path


def decode(path) -> list[np.ndarray]:
    """Every frame of a video as OpenCV decodes it, turned from BGR to RGB here: the reference for a lossy codec."""
    capture, frames = VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(np.ascontiguousarray(frame[..., ::-1]))
    capture.release()
    return frames


def properties(path) -> tuple[float, int, int, int]:
    """A written video's frame rate, width, height and frame count (as its container says)."""
    capture = VideoCapture(str(path))
    values = (capture.get(cv2.CAP_PROP_FPS), *(int(capture.get(p)) for p in (
        cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT, cv2.CAP_PROP_FRAME_COUNT)))
    capture.release()
    return values


def same_results(actual, expected) -> None:
    assert len(actual) == len(expected)
    for ours, theirs in zip(actual, expected):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(getattr(ours, key), getattr(theirs, key)), key


def closer_to_the_drawing(written: np.ndarray, result) -> bool:
    """Where the drawing changed the frame, the written frame is nearer the drawing than the frame (a lossy codec)."""
    drawn, plain = result.plot().astype(float), result.image.astype(float)
    changed = (drawn != plain).any(axis=2)
    return changed.sum() > 0 and np.abs(written[changed] - drawn[changed]).mean() < \
        np.abs(written[changed] - plain[changed]).mean() / 3


@pytest.mark.parametrize("suffix", CODECS)
def test_a_video_gives_its_frames_results_an_annotated_video_and_their_detections(detector, frames, suffix, tmp_path):
    video = write_video(tmp_path / f"clip{suffix}", frames)
    expected = detector(decode(video))
    results = list(detector.stream(video, out=tmp_path / "out"))
    same_results(results, expected)  # the same batches of the same pixels: equal to the bit
    assert [r.frame for r in results] == list(range(len(frames))) and all(r.path == video for r in results)
    assert [r.timestamp for r in results] == pytest.approx([i / FPS for i in range(len(frames))], abs=1e-6)
    assert sum(len(r.scores) for r in results) > 0
    # frames come as RGB: near the frames written (lossy codec), far from their channels swapped
    error = np.mean([np.abs(r.image.astype(int) - f).mean() for r, f in zip(results, frames)])
    swapped = np.mean([np.abs(r.image[..., ::-1].astype(int) - f).mean() for r, f in zip(results, frames)])
    assert error < 4 < 5 * error < swapped
    written = tmp_path / "out" / f"clip{suffix}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([written.name, "clip_detections.json"])
    assert properties(written) == (FPS, WIDTH, HEIGHT, len(frames))
    pictures = decode(written)
    assert len(pictures) == len(frames)
    assert all(closer_to_the_drawing(picture, result) for picture, result in zip(pictures, expected))
    records = json.loads((tmp_path / "out" / "clip_detections.json").read_text())
    assert records["source"] == str(video) and records["fps"] == FPS
    assert [entry["frame"] for entry in records["frames"]] == list(range(len(frames)))
    assert [entry["time"] for entry in records["frames"]] == pytest.approx([i / FPS for i in range(len(frames))])
    for frame, (entry, result) in enumerate(zip(records["frames"], expected)):  # COCO results, image_id: the frame
        assert entry["detections"] == json.loads(json.dumps(result.to_json(image_id=frame)))


def test_a_segmenters_video_is_the_mask_overlay(segmenter, frames, tmp_path):
    video = write_video(tmp_path / "street.mp4", frames)
    results, expected = list(segmenter.stream(video, out=tmp_path / "out")), segmenter(decode(video))
    assert len(results) == len(expected) == len(frames)
    assert all(np.array_equal(r.mask, e.mask) for r, e in zip(results, expected))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["street.mp4"]  # masks: the results', not written
    pictures = decode(tmp_path / "out" / "street.mp4")
    assert len(pictures) == len(frames)
    assert all(closer_to_the_drawing(picture, result) for picture, result in zip(pictures, results))


def test_an_iterable_of_frames_is_a_stream(detector, frames, tmp_path):
    expected = detector(frames)
    results = list(detector.stream(iter(frames)))
    same_results(results, expected)
    assert [r.frame for r in results] == list(range(len(frames))) and results[0].timestamp is None
    with pytest.warns(UserWarning, match=r"iterate predictor.stream\(...\) instead"):
        same_results(detector(frame for frame in frames), expected)
    with pytest.raises(ValueError, match="^the frame iterable: no frame rate to write the annotated video at; pass"):
        detector.stream(iter(frames), out=tmp_path / "out")
    results = list(detector.stream((frame for frame in frames), out=tmp_path / "out", fps=25))
    assert [r.timestamp for r in results] == pytest.approx([i / 25 for i in range(len(frames))])
    assert properties(tmp_path / "out" / "frames.mp4") == (25, WIDTH, HEIGHT, len(frames))
    entries = json.loads((tmp_path / "out" / "frames_detections.json").read_text())["frames"]
    assert len(entries) == len(frames)
    with pytest.raises(DataError, match=f"the frame iterable: frame 1 is 64x48, the first was {WIDTH}x{HEIGHT}"):
        list(detector.stream(iter([frames[0], frames[1][:48, :64]]), out=tmp_path / "sizes", fps=25))
    assert not (tmp_path / "sizes" / "frames.mp4").exists()  # an error leaves no half-written video
    with pytest.warns(UserWarning, match="is 127x95: OpenCV writes even sizes, so .*frames.mp4 is 126x94"):
        list(detector.stream(iter([frames[0][:95, :127]] * 2), out=tmp_path / "odd", fps=25))
    assert properties(tmp_path / "odd" / "frames.mp4") == (25, 126, 94, 2)


def fake_capture(frames_bgr, opened=True, stop=None):
    """A stand-in for ``cv2.VideoCapture`` on a camera: ``frames_bgr`` one per ``read()``, time-stamped by a driver's
    clock (milliseconds since boot, 40 apart), then ``read()`` fails, or raises ``stop`` (a user's Ctrl-C)."""

    class Capture:
        def __init__(self, target, *args):
            self.left, self.clock, self.released = iter(frames_bgr), 5_000_000.0 - 40, False

        def isOpened(self):  # noqa: N802 (OpenCV's name)
            return opened

        def read(self):
            frame = next(self.left, None)
            if frame is None and stop is not None:
                raise stop
            self.clock += 40
            return (False, None) if frame is None else (True, frame.copy())

        def get(self, prop):
            return {cv2.CAP_PROP_FPS: 30.0, cv2.CAP_PROP_FRAME_COUNT: -1.0, cv2.CAP_PROP_POS_MSEC: self.clock}[prop]

        def release(self):
            self.released = True

    return Capture


def test_a_camera_streams_its_frames_as_they_come(detector, frames, monkeypatch, tmp_path):
    monkeypatch.setattr(cv2, "VideoCapture", fake_capture([np.ascontiguousarray(f[..., ::-1]) for f in frames[:5]]))
    results = list(detector.stream(0, out=tmp_path / "out"))
    assert all(np.array_equal(r.image, f) for r, f in zip(results, frames))  # BGR turned to RGB
    same_results(results, [detector(frame)[0] for frame in frames[:5]])  # one at a time, as they come
    assert [r.timestamp for r in results] == pytest.approx([0, 0.04, 0.08, 0.12, 0.16])
    assert properties(tmp_path / "out" / "camera0.mp4") == (30, WIDTH, HEIGHT, 5)
    monkeypatch.setattr(cv2, "VideoCapture", fake_capture([], opened=False))
    with pytest.raises(DataError, match="^camera 3 cannot be opened"):
        detector.stream(3)
    monkeypatch.setattr(cv2, "VideoCapture", fake_capture([]))
    with pytest.raises(DataError, match="^camera 0: no frame could be read"):
        list(detector.stream(0))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "detector.pth"
    torch.save(untrained_detector().state_dict(), path)
    return ["--weights", str(path), "--model", DETECTOR, "--score-thresh", "0.015", "--max-det", "10"]


def test_infer_writes_a_videos_outputs(weights, frames, tmp_path, capsys):
    video = write_video(tmp_path / "clip.avi", frames)
    assert infer_main([*weights, str(video), str(heads.SAMPLE_IMAGES["kitten"]), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert f"mean over 1 images and {len(frames)} frames" in out and "wrote annotated videos" in out
    assert properties(tmp_path / "out" / "clip.avi") == (FPS, WIDTH, HEIGHT, len(frames))
    assert len(json.loads((tmp_path / "out" / "clip_detections.json").read_text())["frames"]) == len(frames)
    assert (tmp_path / "out" / "kitten.png").is_file() and (tmp_path / "out" / "detections.json").is_file()


def test_infer_on_a_camera_keeps_what_it_wrote_when_stopped(weights, frames, monkeypatch, tmp_path, capsys):
    bgr = [np.ascontiguousarray(f[..., ::-1]) for f in frames[:4]]
    monkeypatch.setattr(cv2, "VideoCapture", fake_capture(bgr, stop=KeyboardInterrupt()))
    assert infer_main([*weights, "0", "--out", str(tmp_path)]) == []
    assert "stopped after 4 frames" in capsys.readouterr().out
    assert properties(tmp_path / "camera0.mp4") == (30, WIDTH, HEIGHT, 4)
    assert len(json.loads((tmp_path / "camera0_detections.json").read_text())["frames"]) == 4
    assert not list(tmp_path.glob(".*"))  # no temporary files left


@pytest.mark.parametrize("name, content, message", [
    ("damaged.mp4", np.random.default_rng(0).bytes(4096), "damaged.mp4: OpenCV cannot read it as a video"),
    ("missing.mp4", None, "input not found: {tmp}/missing.mp4"),
    ("2", None, "camera 2 cannot be opened"),  # digits naming no file: a camera (none here)
])
def test_unreadable_videos_are_one_line(weights, name, content, message, tmp_path, capfd):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        infer_main([*weights, name if name.isdigit() else str(tmp_path / name), "--out", str(tmp_path / "out")])
    error = capfd.readouterr().err  # OpenCV's and FFmpeg's own messages included: silenced
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message.format(tmp=tmp_path) in error


def test_an_input_video_is_never_overwritten(detector, frames, tmp_path):
    video = write_video(tmp_path / "clip.mp4", frames[:2])
    before = video.read_bytes()
    with pytest.raises(DataError, match="clip.mp4 is an input"):
        detector.stream(video, out=tmp_path)
    assert video.read_bytes() == before


def test_frames_are_not_held_in_memory(tmp_path):
    """A video of 300 frames of 480 x 640 (276 MB decoded) through stream() with out=: Python's peak allocation
    (NumPy's arrays included: every frame, decoded or drawn, is one) stays far below that (16 MB measured; keeping
    every result instead: 279 MB)."""
    photo = cv2.resize(read_image(heads.SAMPLE_IMAGES["3dogs"]), (640, 480), interpolation=cv2.INTER_AREA)
    count, limit = 300, 60e6
    writer = cv2.VideoWriter(str(tmp_path / "long.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    for step in range(count):
        writer.write(np.roll(photo, step, axis=1))
    writer.release()
    predictor = Predictor(untrained_detector(), max_det=10)  # drawing nothing (the model's 0.3 to draw)
    tracemalloc.start()
    try:
        frames = sum(1 for _ in predictor.stream(tmp_path / "long.avi", out=tmp_path / "out"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frames == count and properties(tmp_path / "out" / "long.avi") == (30, 640, 480, count)
    assert photo.nbytes < peak < limit < count * photo.nbytes  # a frame is seen; a few batches are held at most
