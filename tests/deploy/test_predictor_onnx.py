"""heads.Predictor on exported files, raw (as every file before the post-processing moved inside) and post-processed:
the runtime follows the file, pre- and post-processing are the PyTorch path's (or the file's own)."""
import numpy as np
import pytest
import torch
from test_runtimes import DETECTOR, SEGMENTER, models  # noqa: F401  (a fixture)

from heads.assets import SAMPLE_IMAGES
from heads.cli import eval_det_main, eval_seg_main, infer_main
from heads.data import read_image
from heads.deploy import runtimes
from heads.deploy.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[False, True], ids=["raw", "postprocessed"])
def exported(models, tmp_path_factory, request):  # noqa: F811
    folder = tmp_path_factory.mktemp("exported")
    return {name: runtimes.export(models[name], folder / f"{name}.onnx", postprocess=request.param)
            for name in (DETECTOR, SEGMENTER)}


def test_an_exported_detector_predicts_what_pytorch_predicts(models, exported):  # noqa: F811
    image = read_image(SAMPLE_IMAGES["3dogs"])
    ours, theirs = Predictor(exported[DETECTOR])(image)[0], Predictor(models[DETECTOR])(image)[0]
    assert ours.categories == theirs.categories and len(ours.scores) == len(theirs.scores) > 0
    torch.testing.assert_close(ours.boxes, theirs.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=0)
    assert torch.equal(ours.labels, theirs.labels)


def test_an_exported_segmenter_predicts_what_pytorch_predicts(models, exported):  # noqa: F811
    image = read_image(SAMPLE_IMAGES["kitten"])
    ours, theirs = Predictor(exported[SEGMENTER])(image)[0], Predictor(models[SEGMENTER])(image)[0]
    assert ours.mask.shape == image.shape[:2] and (ours.mask == theirs.mask).mean() > 0.999


def test_tools_take_exported_files(exported, tmp_path, capsys, photos):
    results = infer_main(["--weights", str(exported[DETECTOR]), str(photos), "--out", str(tmp_path / "pictures"),
                          "--threads", "1"])
    assert len(results) == 3 and (tmp_path / "pictures" / "detections.json").is_file()
    with pytest.raises(SystemExit):
        infer_main(["--weights", str(exported[SEGMENTER]), "--task", "detection", str(photos), "--out",
                    str(tmp_path / "x")])
    assert "is a segmentation model" in capsys.readouterr().err
    metrics = eval_seg_main(["--weights", str(exported[SEGMENTER]), "--builtin", "--limit", "2"])
    assert np.isfinite(metrics.pixel_accuracy)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        eval_det_main(["--weights", str(exported[SEGMENTER]), "--builtin"])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a segmentation model; evaluate it with tools/eval_seg.py" in error


def test_a_file_of_the_earlier_exporter_predicts_as_before(models, tmp_path):  # noqa: F811
    """A raw file whose metadata predates the post-processing inside (no ``postprocessed``, ``input_layout``,
    ``input_dtype``): the runtime feeds it float images in [0, 1], the Predictor post-processes its outputs."""
    path = runtimes.export(models[DETECTOR], tmp_path / "earlier.onnx", postprocess=False)
    metadata = runtimes.read_metadata(path)
    for key in ("postprocessed", "input_layout", "input_dtype"):
        del metadata[key]
    runtimes.write_metadata(path, metadata)
    image = read_image(SAMPLE_IMAGES["3dogs"])
    ours, theirs = Predictor(path)(image)[0], Predictor(models[DETECTOR])(image)[0]
    torch.testing.assert_close(ours.boxes, theirs.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=0)
    assert torch.equal(ours.labels, theirs.labels)
