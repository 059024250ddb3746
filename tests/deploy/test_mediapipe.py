"""LiteRT files that MediaPipe's tasks load by path alone (their TFLite Model Metadata and label file inside), run by
MediaPipe itself in its own venv, against ``heads.Predictor`` on PyTorch; our metadata inside every .tflite file.

MediaPipe pulls opencv-contrib-python, which clashes with the opencv-python-headless of albumentations: it runs in a
separate venv whose python ``MBB_MEDIAPIPE_PYTHON`` names (.ci/run makes one with mediapipe==1.2.2, numpy and Pillow),
through ``mediapipe_run.py``, which imports neither torch nor our packages.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL
from PIL import Image
from test_postprocessed import trained_like  # noqa: F401  (a fixture)
from test_runtimes import DETECTOR, SEGMENTER, SIZES, calibration, models  # noqa: F401  (a fixture)
from torchvision.ops import box_iou

from heads.assets import SAMPLE_IMAGES
from heads.deploy import runtimes, tflite_metadata
from heads.deploy.predictor import Predictor

pytest.importorskip("litert_torch")
pytestmark = pytest.mark.usefixtures("one_thread")
RUNNER = Path(__file__).with_name("mediapipe_run.py")
PHOTOS = [*SAMPLE_IMAGES.values(), REAL / "gray.jpg", *sorted((REAL / "cityscapes_sample" / "leftImg8bit").glob("*"))]
IOU, SCORE, PIXELS = 0.95, 0.02, 2  # MediaPipe's boxes are whole pixels, origin and size each rounded down


@pytest.fixture(scope="module")
def mediapipe_python() -> str:
    """The python of a venv with mediapipe; absent, a skip (a failure in CI, which makes it)."""
    python = os.environ.get("MBB_MEDIAPIPE_PYTHON")
    if python and Path(python).is_file():
        return python
    reason = ("MediaPipe's checks need MBB_MEDIAPIPE_PYTHON, the python of a venv with mediapipe==1.2.2 and Pillow "
              f"(python3 -m venv VENV && VENV/bin/pip install mediapipe==1.2.2 Pillow); it is {python!r}")
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def mediapipe(python: str, task: str, model: Path, photos: list) -> list:
    """What MediaPipe's task finds in ``photos``, loading ``model`` by its path alone (``mediapipe_run.py``)."""
    done = subprocess.run([python, str(RUNNER), task, str(model), *map(str, photos)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GLOG_minloglevel": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def segmenter_file(models, tmp_path_factory) -> Path:  # noqa: F811
    """The spread LR-ASPP of test_runtimes as tools/export.py writes a .tflite by default (64 x 128)."""
    return runtimes.export(models[SEGMENTER], tmp_path_factory.mktemp("segmenter") / "lraspp.tflite",
                           size=SIZES[SEGMENTER])


def resized(folder: Path, height: int, width: int) -> list[Path]:
    """The real photos resized (bilinear) to a file's input size, as PNG files in ``folder``. MediaPipe resizes a photo
    its own way (not the Predictor's): at the input size both run the file on the same pixels."""
    for path in PHOTOS:
        with Image.open(path) as image:
            image.convert("RGB").resize((width, height), Image.BILINEAR).save(folder / f"{path.stem}.png")
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def at_segmenter_size(tmp_path_factory) -> list[Path]:
    """The real photos at the segmenter file's input size (PyTorch segments a photo at its own size)."""
    return resized(tmp_path_factory.mktemp("photos"), *SIZES[SEGMENTER])


def test_mediapipes_image_segmenter_finds_the_predictors_masks(mediapipe_python, segmenter_file, models,  # noqa: F811
                                                                at_segmenter_size):
    """``ImageSegmenter`` with the file's path alone: its category mask equals the PyTorch Predictor's on >= 99% of
    the pixels of each real photo, and its labels are the model's categories (the label file inside)."""
    found = mediapipe(mediapipe_python, "segmenter", segmenter_file, at_segmenter_size)
    expected = Predictor(models[SEGMENTER], device="cpu")(at_segmenter_size)
    for ours, theirs in zip(expected, found):
        mask = np.load(theirs["mask"])
        assert mask.shape == ours.mask.shape and (mask == ours.mask).mean() >= 0.99
        assert theirs["labels"] == ours.categories
        assert len(np.unique(ours.mask)) > 1  # a test that can fail: the spread model's masks vary


def test_a_litert_segmenter_reads_its_app_outputs(segmenter_file, models, at_segmenter_size):  # noqa: F811
    """Our own runtime reads the file that MediaPipe reads (channels-last logits): the export check passes and the
    Predictor on the file finds PyTorch's masks."""
    metadata = runtimes.read_metadata(segmenter_file)
    assert metadata["outputs"] == ["class_logits"] and metadata["postprocessed"]
    runtime = runtimes.load(segmenter_file)
    images = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in at_segmenter_size])).permute(0, 3, 1, 2)
    checks = runtimes.check(models[SEGMENTER], runtime, images.float() / 255)
    assert checks and all(check.passed for check in checks), "; ".join(map(str, checks))
    expected = Predictor(models[SEGMENTER], device="cpu")(at_segmenter_size)
    for ours, theirs in zip(expected, Predictor(segmenter_file)(at_segmenter_size)):
        assert (ours.mask == theirs.mask).mean() >= 0.999


def test_litert_files_hold_their_metadata_and_old_sidecars_still_load(segmenter_file, tmp_path):
    """No sidecar: the record is inside the file. A file of before (its record in ``<file>.json``) still loads; a
    file with neither, a broken sidecar or a file that is no flatbuffer are one-line errors."""
    assert not Path(f"{segmenter_file}.json").exists()
    record = runtimes.read_metadata(segmenter_file)
    old = tmp_path / "old.tflite"
    data = segmenter_file.read_bytes()
    old.write_bytes(data.replace(b"mbbackbones", b"mbbackbonez"))  # the entry renamed: as if written without it
    with pytest.raises(ValueError, match=r"old.tflite has no mbbackbones metadata \(old.tflite.json beside it\): .* "
                                         r"export it again"):
        runtimes.read_metadata(old)
    Path(f"{old}.json").write_text(json.dumps(record))
    assert runtimes.read_metadata(old) == record
    Path(f"{old}.json").write_text('{"task": "segm')
    with pytest.raises(ValueError, match=r"old.tflite: its metadata \(old.tflite.json beside it\) is not valid JSON"):
        runtimes.read_metadata(old)
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"\x1c\x00\x00\x00not a model at all")
    with pytest.raises(ValueError, match=r"broken.tflite is not a readable LiteRT model \(not a TFLite flatbuffer"):
        runtimes.read_metadata(broken)
    assert tflite_metadata.read_entry(segmenter_file, tflite_metadata.TFLITE_METADATA)[4:8] == b"M001"


# -- detection ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detectors(trained_like, models, tmp_path_factory) -> dict[str, tuple]:  # noqa: F811
    """(model, .tflite file as tools/export.py writes it by default): fp32, the trained-like SSDLite of
    test_postprocessed (few candidates: no near-ties that NMS may order either way); INT8, the small spread one of
    test_runtimes (converts faster)."""
    folder = tmp_path_factory.mktemp("detector")
    small = models[DETECTOR]
    return {"fp32": (trained_like[0], runtimes.export(trained_like[0], folder / "ssdlite.tflite")),
            "int8": (small, runtimes.export(small, folder / "ssdlite.int8.tflite", int8=True,
                                            calibration=calibration(DETECTOR, small)))}


def matched(expected: dict, got: dict, floor: float) -> bool:
    """Every detection of either side scoring over ``floor`` has one in the other with the same label, a score within
    :data:`SCORE` and a box of IoU >= :data:`IOU` or with each coordinate within :data:`PIXELS` (small boxes)."""
    boxes = ((box_iou(expected["boxes"], got["boxes"]) >= IOU) |
             ((expected["boxes"][:, None] - got["boxes"][None]).abs().amax(-1) <= PIXELS))
    same = ((expected["labels"][:, None] == got["labels"][None]) & boxes &
            ((expected["scores"][:, None] - got["scores"][None]).abs() <= SCORE))
    return bool(same.any(1)[expected["scores"] > floor].all() and same.any(0)[got["scores"] > floor].all())


def as_detections(found: dict, categories: list) -> dict:
    """MediaPipe's detections of one photo as tensors; labels from the category names (the label file's lines)."""
    labels = [categories.index(name) for name in found["names"]]
    return {"boxes": torch.tensor(found["boxes"], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(found["scores"]), "labels": torch.tensor(labels, dtype=torch.long)}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_mediapipes_object_detector_finds_the_predictors_detections(precision, mediapipe_python, detectors,
                                                                    tmp_path):
    """``ObjectDetector`` with the file's path alone, on the real photos (at the input size): the same detections
    (label, box IoU >= 0.95, score within 0.02), all of them, as the PyTorch Predictor for fp32, as our own LiteRT
    run of the same file for INT8."""
    model, path = detectors[precision]
    photos = resized(tmp_path, model.size, model.size)
    reference = Predictor(model, device="cpu") if precision == "fp32" else Predictor(path)
    expected = reference(photos)
    found = mediapipe(mediapipe_python, "detector", path, photos)
    assert sum(len(ours.labels) for ours in expected) > 100
    for ours, theirs in zip(expected, found):
        # near the threshold or the detection cap, float noise may keep a detection that the other drops
        cut = ours.scores[-1] if len(ours.scores) == model.detections_per_img else model.score_thresh
        assert matched(ours.__dict__, as_detections(theirs, ours.categories), cut + 1e-4)


def test_the_output_contract_of_the_litert_files(detectors, segmenter_file, trained_like):  # noqa: F811
    """The tensors the README documents, as LiteRT's interpreter reports them, in MediaPipe's order: the detector's
    locations (ratios, best first), categories (label - 1), scores and number of detections, zeros past it; the
    segmenter's channels-last logits."""
    from ai_edge_litert.interpreter import Interpreter

    model, path = detectors["fp32"]
    interpreter = Interpreter(str(path))
    interpreter.allocate_tensors()
    described = lambda details: [(d["dtype"].__name__, d["shape"].tolist()) for d in details]  # noqa: E731
    assert described(interpreter.get_input_details()) == [("uint8", [1, 320, 320, 3])]
    assert described(interpreter.get_output_details()) == [("float32", [1, 300, 4]), ("float32", [1, 300]),
                                                           ("float32", [1, 300]), ("float32", [1])]
    assert runtimes.read_metadata(path)["outputs"] == ["locations", "categories", "scores", "num_detections"]
    image = trained_like[1][1]  # the kitten photo, [1, 3, 320, 320] in [0, 1]: fewer detections than the cap
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                           np.ascontiguousarray((image * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)))
    interpreter.invoke()
    locations, categories, scores, count = (interpreter.get_tensor(d["index"])[0]
                                            for d in interpreter.get_output_details())
    found = int(count)
    assert 0 < found < 300 and float(count) == found
    assert (locations[:found] >= 0).all() and (locations[:found] <= 1).all()
    assert (locations[:found, 2:] >= locations[:found, :2]).all()  # ymax >= ymin, xmax >= xmin
    assert (categories[:found] == np.round(categories[:found])).all()
    assert (categories[:found] >= 0).all() and (categories[:found] <= model.num_classes - 2).all()
    assert (np.diff(scores[:found]) <= 0).all() and (scores[:found] > model.score_thresh).all()
    assert not locations[found:].any() and not categories[found:].any() and not scores[found:].any()
    interpreter = Interpreter(str(segmenter_file))
    assert described(interpreter.get_input_details()) == [("uint8", [1, *SIZES[SEGMENTER], 3])]
    assert described(interpreter.get_output_details()) == [("float32", [1, *SIZES[SEGMENTER], 19])]
