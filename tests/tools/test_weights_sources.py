"""Every tool takes every kind of --weights (a registered name, a weights file, an exported file), and scores or
draws a model under its own categories: labels become the dataset's ids through the model's metadata."""
import json
from pathlib import Path

import pytest
import torch
from benchmarking.workloads import calibrated_torchvision_detector
from conftest import REAL
from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights
from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights, lraspp_mobilenet_v3_large

import heads
from heads.cli import eval_det_main, eval_seg_main, export_main, infer_main
from heads.data import read_image
from heads.deploy import runtimes
from heads.detection.builtin import builtin_coco
from heads.segmentation.builtin import builtin_cityscapes

DETECTOR, SEGMENTER = "ssdlite320_mbv3_large_reduced", "lraspp_mbv3_large"
COCO = ["--data-root", str(REAL / "coco_sample"), "--split", "val2017"]  # a real COCO image, 80 categories

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("data_home")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The published detector (torchvision's file in the hub cache, COCO's 91 labels) as a registered name, as a
    plain state dict and as an ONNX file; the published segmenter (VOC's 21 labels) in the cache."""
    folder = tmp_path_factory.mktemp("sources")
    hub = folder / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    photos = [torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float() / 255
              for path in heads.SAMPLE_IMAGES.values()]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(folder / "torch"))
        torch.save(calibrated_torchvision_detector(photos, background_logit=6.0).state_dict(),
                   hub / Path(SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.url).name)
        torch.save(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).state_dict(),
                   hub / Path(LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.url).name)
        model = heads.create_model(DETECTOR, pretrained=True)
        torch.save(model.state_dict(), folder / "weights.pth")
        runtimes.export(model, folder / "detector.onnx")
        yield {"name": [DETECTOR], "file": [str(folder / "weights.pth"), "--model", DETECTOR],
               "exported": [str(folder / "detector.onnx")]}


@pytest.mark.parametrize("kind", ["name", "file", "exported"])
def test_eval_det_takes_every_kind_of_weights_and_scores_under_the_models_ids(kind, sources, tmp_path):
    """Each written detection's category is, by name, the class torchvision's weights give its label."""
    out = tmp_path / "eval"
    plain = ["--label-mode", "coco91"] if kind == "file" else []  # a plain state dict names no categories
    eval_det_main(["--weights", *sources[kind], *COCO, *plain, "--out", str(out)])
    written = json.loads((out / "detections.json").read_text())
    photo = REAL / "coco_sample" / "val2017" / "000000039769.jpg"
    if kind == "exported":  # the tool scores the file through the Predictor
        found = heads.Predictor(sources[kind][0])(photo)[0]
        labels, scores = found.labels, found.scores
    else:  # the tool scores the PyTorch model on the image in [0, 1], as in training
        model = heads.create_model(DETECTOR, pretrained=True).eval()
        with torch.no_grad():
            found = model([torch.from_numpy(read_image(photo).copy()).permute(2, 0, 1).float() / 255])[0]
        labels, scores = found["labels"], found["scores"]
    label_of = {round(score, 6): label for score, label in zip(scores.tolist(), labels.tolist())}
    names = SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"]
    coco = {c["id"]: c["name"] for c in json.loads((REAL / "coco_sample" / "annotations" /
                                                    "instances_val2017.json").read_text())["categories"]}
    top = sorted(written, key=lambda r: -r["score"])[:50]
    assert len(top) == 50 and all(coco[r["category_id"]] == names[label_of[r["score"]]] for r in top)


@pytest.mark.parametrize("kind", ["name", "file", "exported"])
def test_infer_takes_every_kind_of_weights(kind, sources, tmp_path):
    results = infer_main(["--weights", *sources[kind], str(heads.SAMPLE_IMAGES["3dogs"]), "--out", str(tmp_path)])
    assert len(results) == 1 and (tmp_path / "3dogs.png").is_file() and (tmp_path / "detections.json").is_file()


@pytest.mark.parametrize("kind", ["name", "file"])
def test_export_takes_every_kind_of_weights(kind, sources, tmp_path):
    assert export_main(["--weights", *sources[kind], "--out", str(tmp_path / "d.onnx")]) == [tmp_path / "d.onnx"]


def test_export_refuses_an_exported_file(sources, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--weights", *sources["exported"], "--out", str(tmp_path / "again.onnx")])
    assert exit_info.value.code == 2 and "is an exported file already" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([DETECTOR, "--builtin"], f"{DETECTOR}'s categories are not the dataset's: its label 3 is 'car' (category 3), "
                              "which"),
    ([SEGMENTER, "--builtin"], f"{SEGMENTER} predicts 21 classes (__background__, aeroplane, bicycle, bird, ...)"),
])
def test_a_model_of_other_categories_is_refused_naming_both(argv, message, sources, capsys):
    main = eval_det_main if argv[0] == DETECTOR else eval_seg_main
    builtin_coco(), builtin_cityscapes()  # written first: their progress bars are not the tool's output
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--weights", *argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message in error, error
