"""The old ONNX Runtime predictor path of heads.deploy.predictor (make_predictor(..., "onnxruntime")), kept as it was.

It imports ``export.OnnxModel`` and feeds segmenters normalised images, which the deployment runtimes replaced
(``heads.deploy.runtimes``: graphs take images in [0, 1]); the Predictor being rewritten on those runtimes replaces
this path and these tests.
"""
import numpy as np
import pytest
from PIL import Image
from test_runtimes import DETECTOR, SEGMENTER, models, one_thread, weights  # noqa: F401  (fixtures)
from torchvision.ops import box_iou

from heads.assets import SAMPLE_IMAGES
from heads.cli import infer_main
from heads.data import read_image
from heads.deploy import runtimes
from heads.deploy.predictor import load_model, make_predictor

OLD_PATH = pytest.mark.xfail(raises=ImportError, strict=True,
                             reason="predictor.py's ONNX backend imports export.OnnxModel, replaced by runtimes.load")


@pytest.fixture(scope="module")
def detector_files(models, tmp_path_factory):  # noqa: F811
    return [runtimes.export(models[DETECTOR], tmp_path_factory.mktemp("onnx") / "ssdlite.onnx")]


def agreement(ours: dict, theirs: dict, iou: float) -> float:
    """The fraction of ``ours`` detections that ``theirs`` has too (same label, box IoU >= ``iou``), in any order."""
    same = (ours["labels"][:, None] == theirs["labels"][None]) & (box_iou(ours["boxes"], theirs["boxes"]) >= iou)
    return same.any(1).float().mean().item()


@OLD_PATH
@pytest.mark.parametrize("name", [DETECTOR, SEGMENTER])
def test_infer_onnxruntime_draws_what_pytorch_draws(name, weights, detector_files, tmp_path, photos):  # noqa: F811
    common = ["--weights", str(weights[name]), "--model", name, str(photos), "--score-thresh", "0.2"]
    infer_main([*common, "--out", str(tmp_path / "pytorch")])
    onnx_file = detector_files[0] if name == DETECTOR else None  # the segmenter is exported on the fly
    infer_main([*common, "--out", str(tmp_path / "onnxruntime"), "--backend", "onnxruntime",
                *(["--onnx", str(onnx_file)] if onnx_file else [])])
    pictures = sorted(p.name for p in (tmp_path / "pytorch").iterdir())
    assert pictures == ["3dogs.png", "gray.png", "kitten.png"]
    assert sorted(p.name for p in (tmp_path / "onnxruntime").iterdir()) == pictures
    for picture in pictures:
        ours, theirs = (np.asarray(Image.open(tmp_path / backend / picture)) for backend in ("pytorch", "onnxruntime"))
        assert (ours != theirs).any(-1).mean() < 0.001

    loaded = load_model(weights[name], name)
    image = read_image(SAMPLE_IMAGES["3dogs"])
    expected, got = make_predictor(loaded)(image)[0], make_predictor(loaded, "onnxruntime", onnx_file)(image)[0]
    if name == DETECTOR:
        assert agreement(got, expected, iou=0.999) >= 0.99
    else:
        assert (got == expected).mean() > 0.999


def test_onnx_file_needs_the_onnxruntime_backend(weights, detector_files, tmp_path, capsys, photos):  # noqa: F811
    with pytest.raises(SystemExit):
        infer_main(["--weights", str(weights[DETECTOR]), "--model", DETECTOR, str(photos), "--out", str(tmp_path),
                    "--onnx", str(detector_files[0])])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "needs backend='onnxruntime'" in error
