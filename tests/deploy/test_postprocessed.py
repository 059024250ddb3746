"""Exported files with the post-processing inside (the default of every format): RGB uint8 images in, the final
detections or class mask out, equal to ``heads.Predictor`` on PyTorch; batches; the output contract; the Predictor's
overrides; the app example that runs an .onnx file with onnxruntime, numpy and Pillow alone."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from benchmarking.workloads import calibrated_torchvision_detector
from conftest import REAL, RUNTIME_PACKAGES, same_detections
from PIL import Image
from test_runtimes import DETECTOR, FORMATS, SEGMENTER, SIZES, SLOW_INT8, calibration, models  # noqa: F401  (a fixture)

from heads.assets import SAMPLE_IMAGES
from heads.data import read_image
from heads.deploy import export, runtimes
from heads.deploy.predictor import Predictor
from heads.detection import ssdlite
from heads.detection.builtin import builtin_coco
from heads.registry import create_model
from heads.segmentation.lraspp import class_map
from mbbackbones.choices import ArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")
NMS_OP = ["onnx", "openvino"]  # the formats whose files hold the post-processing with an NMS operator
TOP, TOLERANCE, BOX_TOLERANCE = 100, 1e-4, 1e-2  # the top 100 either way; scores, and boxes in input pixels


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """torchvision's ssdlite320_mobilenet_v3_large as a trained detector looks: BatchNorm statistics of real photos
    and a confident background (few candidates), loaded into ours; and its check images."""
    photos = [torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float() / 255
              for path in SAMPLE_IMAGES.values()]
    path = tmp_path_factory.mktemp("trained_like") / "ssdlite320_tv.pth"
    torch.save(calibrated_torchvision_detector(photos, background_logit=9.0).state_dict(), path)
    model = create_model("ssdlite320_mbv3_large_reduced", pretrained=str(path)).eval()
    images = [export.model_input(model, read_image(p)) for p in [*SAMPLE_IMAGES.values(), REAL / "gray.jpg"]]
    return model, images


@pytest.fixture(scope="module")
def trained_like_file(trained_like, tmp_path_factory):
    """``trained_like_file(format)``: the trained-like detector exported as ``runtimes.export`` does by default."""
    folder, files = tmp_path_factory.mktemp("trained_like_files"), {}

    def get(format: str):
        pytest.importorskip(RUNTIME_PACKAGES[format])
        if format not in files:
            files[format] = runtimes.export(trained_like[0], folder / f"detector{runtimes.FORMATS[format]}")
        return files[format]

    return get


@pytest.fixture(scope="module")
def final(models, tmp_path_factory):  # noqa: F811
    """``final(format, name, int8)``: the random test models of test_runtimes with their post-processing inside."""
    folder, files = tmp_path_factory.mktemp("final"), {}

    def get(format: str, name: str, int8: bool = False):
        pytest.importorskip(RUNTIME_PACKAGES[format])
        if (format, name, int8) not in files:
            model, path = models[name], folder / f"{name}{'.int8' if int8 else ''}{runtimes.FORMATS[format]}"
            files[format, name, int8] = runtimes.export(model, path, int8=int8, size=SIZES[name], postprocess=True,
                                                        calibration=calibration(name, model) if int8 else None)
        return files[format, name, int8]

    return get


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    """Real photos: the package's samples, the grayscale photo and 12 images of the built-in validation set."""
    coco = builtin_coco(tmp_path_factory.mktemp("coco") / "builtin", num_train=1, num_val=12)
    return [*SAMPLE_IMAGES.values(), REAL / "gray.jpg", *sorted((coco / "val2017").glob("*.jpg"))]


def resized(photo: np.ndarray, size) -> torch.Tensor:
    """An RGB uint8 photo as the Predictor resizes it: [1, 3, H, W] uint8, torch's bilinear."""
    return F.interpolate(torch.from_numpy(photo.copy()).permute(2, 0, 1)[None], size=size, mode="bilinear",
                         align_corners=False)


def at_input(result, size: int = 320) -> dict:
    """The first :data:`TOP` detections of a Predictor's result, boxes in the model's input pixels."""
    return in_input_pixels(result.__dict__, result.image.shape[:2], size)


def in_input_pixels(found: dict, photo_size, size: int = 320) -> dict:
    """The first :data:`TOP` ``boxes``, ``scores`` and ``labels`` (tensors), boxes from photo to input pixels."""
    height, width = photo_size
    scale = torch.tensor([size / width, size / height] * 2)
    return {"boxes": found["boxes"][:TOP] * scale, "scores": found["scores"][:TOP], "labels": found["labels"][:TOP]}


# -- detection ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nms_op", [True, False], ids=["nms_op", "tensor_nms"])
@pytest.mark.parametrize("which", ["trained_like", "spread"])
def test_final_detections_in_pytorch_are_select_detections(which, nms_op, trained_like, models):  # noqa: F811
    """``forward_postprocessed`` (the exported graph, here in PyTorch: torchvision's NMS in the place of ONNX's, or
    the tensor-op NMS of ExecuTorch and LiteRT files) finds the top 100 of ``select_detections`` per image of a batch.
    Over its 1000 candidates: all 300 on the trained-like detector; the spread one's (~289k pairs over the threshold)
    hold 271 survivors of greedy NMS, found by the tensor-op NMS after 9 rounds (the trained-like one's after 4)."""
    model = trained_like[0] if which == "trained_like" else models[DETECTOR]
    images = [read_image(p) for p in SAMPLE_IMAGES.values()]
    batch = torch.from_numpy(np.concatenate([export.graph_input(export.model_input(model, i), True) for i in images]))
    meta = {**model.meta, "postprocessed": True}
    with torch.no_grad():
        final = model.forward_postprocessed(batch, nms_op)
        raw = model.forward_batch(batch.permute(0, 3, 1, 2))
    top = lambda found: {key: found[key][:TOP] for key in ("boxes", "scores", "labels")}  # noqa: E731
    for index in range(len(images)):
        ours = model.results([output[index] for output in final], meta, (320, 320), (320, 320))
        theirs = model.select(raw[0][index], raw[1][index], (320, 320))
        assert len(theirs["scores"]) > 0
        assert same_detections(top(theirs), top(ours), 1e-6, limit=min(TOP, len(theirs["scores"])))
        if which == "trained_like":
            assert same_detections(theirs, ours, 1e-6, limit=model.detections_per_img)


@pytest.mark.parametrize("nms_op", [True, False], ids=["nms_op", "tensor_nms"])
def test_final_detections_on_hand_made_boxes(nms_op):
    """A chain where each box overlaps the next (IoU 0.6 > 0.55): greedy NMS keeps every other one (the tensor-op NMS
    needs as many rounds as the chain is long); another class's box in the same place is kept; the best first;
    scores at or under the threshold, the per-class top-k and the detection cap apply; padding is zeros."""
    chain = torch.tensor([[10.0 * i, 0, 10.0 * i + 40, 40] for i in range(6)])  # neighbours: IoU 30/50 = 0.6
    boxes = torch.cat([chain, chain[:1]])[None]  # [1, 7, 4]
    scores = torch.zeros(1, 7, 3)
    scores[0, :6, 1] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    scores[0, 6, 2] = 0.85  # class 2, on the first box of the chain
    scores[0, 5, 2] = 0.01  # at the threshold: not a detection
    with torch.no_grad():
        found_boxes, found_scores, labels, count = ssdlite.final_detections(boxes, scores, 0.01, 0.55, 300, 5, nms_op)
    assert count.tolist() == [4] and labels.tolist() == [[1, 2, 1, 1, 0]]
    torch.testing.assert_close(found_scores, torch.tensor([[0.9, 0.85, 0.7, 0.5, 0.0]]))
    torch.testing.assert_close(found_boxes[0], torch.stack([chain[0], chain[0], chain[2], chain[4], torch.zeros(4)]))
    capped = ssdlite.final_detections(boxes, scores, 0.01, 0.55, 300, 2, nms_op)
    assert capped[3].tolist() == [2] and capped[2].tolist() == [[1, 2]]
    per_class = ssdlite.final_detections(boxes, scores, 0.01, 0.55, 2, 20, nms_op)  # class 1's best two: 0.9, 0.8
    assert per_class[3].tolist() == [2] and per_class[1][0, :2].tolist() == pytest.approx([0.9, 0.85])


@pytest.mark.parametrize("format", FORMATS)
def test_a_trained_like_detector_passes_the_export_check(format, trained_like, trained_like_file):
    """The export tool's check (runtimes.check) accepts a correct fp32 export of a trained-like network, and finds
    every detection (the check's limit leaves room for the near-ties of random heads). (INT8: this random head's
    foreground scores are near-ties that int8 reorders, 0.6 of the top 10 kept; INT8 files are checked on the spread
    detector and by AP on the built-in set.)"""
    model, images = trained_like
    path = trained_like_file(format)
    checks = runtimes.check(model, runtimes.load(path, threads=1), torch.from_numpy(np.concatenate(images[:2])))
    assert checks and all(check.passed for check in checks), "; ".join(map(str, checks))
    assert [check.value for check in checks] == [1.0]


@pytest.mark.parametrize("format", FORMATS)
def test_a_postprocessed_detector_gives_the_predictors_detections(format, trained_like, trained_like_file, photos):
    """Same labels, scores within 1e-4 and boxes within 1e-2 px at the input size, over the top 100 at the model's
    default threshold, on real photos and the built-in validation images (OpenVINO's fp32 scores differ from
    PyTorch's by up to 1.05e-5 there, ONNX Runtime's by less than 1e-6; boxes by up to 1e-3 px)."""
    model = trained_like[0]
    path = trained_like_file(format)
    assert runtimes.read_metadata(path)["postprocessed"]
    ours, theirs = Predictor(path, threads=1)(photos), Predictor(model)(photos)
    assert sum(len(result.scores) > 0 for result in theirs) > len(photos) / 2  # most images have detections
    for mine, reference in zip(ours, theirs):
        assert same_detections(at_input(reference), at_input(mine), TOLERANCE, limit=TOP, box_tolerance=BOX_TOLERANCE)


@pytest.mark.parametrize("format", [format for format in FORMATS if format not in export.APP])  # test_mediapipe's
def test_postprocessed_files_take_a_batch_and_pad_each_image(format, trained_like, trained_like_file):
    model, images = trained_like
    runtime = runtimes.load(trained_like_file(format), threads=1)
    batch = torch.from_numpy(np.concatenate(images)).mul(255).round().to(torch.uint8)  # photos, then a gray one
    boxes, scores, labels, count = runtime(batch)
    assert boxes.shape == (len(images), 300, 4) and scores.shape == labels.shape == (len(images), 300)
    assert scores.dtype == torch.float32 and labels.dtype == count.dtype == torch.int32
    assert count[0] > 0 and count[-1] == 0  # the gray photo: nothing over the threshold
    for index in range(len(images)):
        alone = runtime(batch[index:index + 1])
        torch.testing.assert_close([output[index] for output in (boxes, scores, labels, count)],
                                   [output[0] for output in alone], atol=1e-4, rtol=0)
        found = int(count[index])
        assert bool((scores[index, :found] > model.score_thresh).all()) and not scores[index, found:].any()
        assert not boxes[index, found:].any() and not labels[index, found:].any()
        assert bool((labels[index, :found] >= 1).all())  # label 0 is the background, never a detection
        assert bool((scores[index, :found].diff() <= 0).all())  # best first


def test_overrides_thin_out_a_postprocessed_files_detections(trained_like, trained_like_file):
    """A higher score threshold and a lower cap give what the PyTorch Predictor gives with them; settings that the
    file cannot apply (another NMS IoU, a lower threshold, a higher cap) are one-line errors naming --raw."""
    model, path = trained_like[0], trained_like_file("onnx")
    photo = read_image(SAMPLE_IMAGES["3dogs"])
    for options in [dict(score_thresh=0.03), dict(max_det=5)]:
        ours, theirs = Predictor(path, **options)(photo)[0], Predictor(model, **options)(photo)[0]
        assert 0 < len(theirs.scores) < 300
        assert same_detections(at_input(theirs), at_input(ours), TOLERANCE, box_tolerance=BOX_TOLERANCE)
    for options, message in [(dict(nms_thresh=0.3), "nms_thresh=0.3: .* applies its own post-processing "
                                                     r"\(nms_thresh=0.55\)"),
                             (dict(score_thresh=0.0001), "score_thresh=0.0001: "),
                             (dict(max_det=500), r"max_det=500: .*\(max_det=300\), which only a higher score_thresh "
                                                 "or a lower max_det can narrow; export it with --raw")]:
        with pytest.raises(ArgumentError, match=message):
            Predictor(path, **options)


# -- segmentation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("format", FORMATS)
def test_a_postprocessed_segmenter_gives_the_predictors_masks(format, models, final):  # noqa: F811
    """The class mask (uint8), batched: arg-max of the bilinear logits, as the Predictor's; at any input size (ONNX,
    OpenVINO: photos at their own size, as the Predictor on PyTorch) or the file's (ExecuTorch, LiteRT)."""
    model, path = models[SEGMENTER], final(format, SEGMENTER)
    runtime = runtimes.load(path, threads=1)
    sizes = [tuple(runtime.metadata["input_size"])] if runtime.metadata["input_size"] else [(64, 128), (96, 160)]
    if not runtime.metadata["input_size"]:
        photos = [SAMPLE_IMAGES["kitten"], next((REAL / "cityscapes_sample" / "leftImg8bit").glob("*.png"))]
        ours, theirs = Predictor(path, threads=1)(photos), Predictor(model)(photos)
        for mine, reference in zip(ours, theirs):
            assert mine.mask.shape == reference.mask.shape and len(np.unique(reference.mask)) > 3
            assert (mine.mask == reference.mask).mean() > 0.999
    for size in sizes:
        images = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8)
        mask = class_map(runtime(images)[0], runtime.metadata)  # LiteRT: channels-last logits, as MediaPipe reads
        with torch.no_grad():
            expected = model.forward_batch(images)[0].argmax(1)
        assert mask.dtype == torch.uint8 and mask.shape == (3, *size)
        assert (mask == expected).float().mean() > 0.999


# -- both, INT8, contract ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("format, name", [
    pytest.param(format, name, marks=pytest.mark.slow) if (format, name) in SLOW_INT8 else (format, name)
    for format in FORMATS for name in (DETECTOR, SEGMENTER)])
def test_int8_postprocessed_files_pass_the_export_check(format, name, models, final):  # noqa: F811
    model = models[name]
    runtime = runtimes.load(final(format, name, int8=True), threads=1)
    images = torch.from_numpy(np.concatenate(calibration(name, model)[:2]))
    checks = runtimes.check(model, runtime, images)
    assert checks and all(check.passed for check in checks), "; ".join(map(str, checks))


def test_the_output_contract_of_the_onnx_and_openvino_files(trained_like_file, final):
    """The tensors the README documents: names, element types and shapes, as each runtime reports them."""
    onnx = pytest.importorskip("onnx")
    detections = [("boxes", "float32", ["batch", 300, 4]), ("scores", "float32", ["batch", 300]),
                  ("labels", "int32", ["batch", 300]), ("count", "int32", ["batch"])]
    contract = {trained_like_file("onnx"): ([("images", "uint8", ["batch", 320, 320, 3])], detections),
                final("onnx", SEGMENTER): ([("images", "uint8", ["batch", "height", "width", 3])],
                                           [("mask", "uint8", ["batch", "height", "width"])])}
    for path, (inputs, outputs) in contract.items():
        graph = onnx.load(str(path)).graph

        def described(values):
            return [(value.name, onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name,
                     [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]) for value in values]

        assert described(graph.input) == inputs and described(graph.output) == outputs
        metadata = runtimes.read_metadata(path)
        assert metadata["outputs"] == [name for name, _, _ in outputs] and metadata["postprocessed"]
        assert (metadata["input_layout"], metadata["input_dtype"]) == ("NHWC", "uint8")
    openvino = pytest.importorskip("openvino")
    ir = openvino.Core().read_model(str(trained_like_file("openvino")))
    described = [(port.get_any_name(), port.get_element_type().get_type_name(), str(port.get_partial_shape()))
                 for port in [*ir.inputs, *ir.outputs]]
    assert described == [("images", "u8", "[?,320,320,3]"), ("boxes", "f32", "[?,300,4]"), ("scores", "f32", "[?,300]"),
                         ("labels", "i32", "[?,300]"), ("count", "i32", "[?]")]
    assert "NonMaxSuppression" in {op.get_type_name() for op in ir.get_ordered_ops()}  # OpenVINO's own NMS


# -- an app: onnxruntime, numpy and Pillow -----------------------------------------------------------------------------

BLOCKED = ("torch", "torchvision", "timm", "mbbackbones", "heads")
APP = """import json, runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None  # importing it fails
detect = runpy.run_path({example!r})["detect"]
found = [detect(sys.argv[1], photo) for photo in sys.argv[2:]]
loaded = sorted(name for name in sys.modules if name.split(".")[0] in {blocked!r} and sys.modules[name] is not None)
print(json.dumps({{"loaded": loaded, "found": [{{key: getattr(value, "tolist", lambda: value)()
                                              for key, value in one.items()}} for one in found]}}))
"""


def test_the_onnx_app_example_runs_without_torch_and_finds_the_predictors_detections(trained_like, trained_like_file,
                                                                                   tmp_path):
    """``heads/deploy/onnx_app_example.py``, the README's snippet, in a process where importing torch, torchvision,
    timm or our packages fails: on photos whose resize to 320 is exact whatever the rounding (each pixel of a
    320 x 320 photo repeated 1x1, 2x3 and 3x2 times), the Predictor's detections, boxes mapped back to the photo."""
    example = pytest.importorskip("heads.deploy.onnx_app_example")  # needs onnxruntime
    model, path = trained_like[0], trained_like_file("onnx")
    files = []
    for (name, source), (tall, wide) in zip([*SAMPLE_IMAGES.items()] * 2, [(1, 1), (2, 3), (3, 2), (2, 2)]):
        photo = np.asarray(resized(read_image(source), (320, 320))[0].permute(1, 2, 0))
        files.append(tmp_path / f"{name}_{tall}x{wide}.png")
        Image.fromarray(np.repeat(np.repeat(photo, tall, 0), wide, 1)).save(files[-1])
    script = APP.format(blocked=BLOCKED, example=example.__file__)
    run = subprocess.run([sys.executable, "-c", script, str(path), *map(str, files)], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    report = json.loads(run.stdout)
    assert report["loaded"] == []
    for found, reference in zip(report["found"], Predictor(model)(files), strict=True):
        assert len(reference.scores) > 0
        assert found["names"] == [model.meta["categories"][label] for label in found["labels"]]
        ours = in_input_pixels({key: torch.tensor(found[key]) for key in ("boxes", "scores", "labels")},
                               reference.image.shape[:2])
        assert same_detections(at_input(reference), ours, TOLERANCE, limit=TOP, box_tolerance=BOX_TOLERANCE)


def test_the_app_examples_resize_is_the_predictors_within_two_levels():
    """On a real photo, the example's Pillow resize (bilinear at pixel centres, no antialiasing) and the Predictor's
    (torch's uint8 bilinear) differ by at most 2 grey levels (fixed-point rounding: Pillow truncates, torch rounds);
    ``Image.resize`` would differ by up to ~40 (it averages over the scale's footprint)."""
    example = pytest.importorskip("heads.deploy.onnx_app_example")
    photo = read_image(SAMPLE_IMAGES["3dogs"])
    ours = np.asarray(example.resize(Image.fromarray(photo), 320, 320)).astype(int)
    theirs = resized(photo, (320, 320))[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(ours - theirs).max() <= 2 and np.abs(ours - theirs).mean() < 1
