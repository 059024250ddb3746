"""Evaluation and inference tools, in-process, on runs trained for two steps on the built-in datasets."""
import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

from heads.cli import eval_det_main, eval_seg_main, infer_main
from heads.detection.builtin import builtin_coco
from heads.detection.coco import CocoDetection
from heads.detection.evaluate import load_results
from heads.loading import load as load_model
from heads.segmentation.builtin import builtin_cityscapes
from heads.segmentation.cityscapes import PALETTE, Cityscapes
from heads.segmentation.evaluate import PREDICTION_SUFFIX, official_scores
from heads.training.config import make_config
from heads.training.engine import Trainer
from heads.training.tasks import get_task
from heads.visualize import class_colour, draw_detections, overlay_mask

pytestmark = pytest.mark.usefixtures("data_home", "one_thread")  # built-in sets under a temporary folder
TINY = dict(max_steps=2, batch_size=2, workers=0, eval_limit=4, optimizer="adam", lr=0.001, lr_batch=2)


def _train(task: str, output, **values):
    cfg = make_config({"task": task, "output": str(output), **TINY, **values})
    Trainer(cfg, get_task(task)).fit()
    return output


@pytest.fixture(scope="module")
def det_run(data_home, tmp_path_factory):
    return _train("detection", tmp_path_factory.mktemp("det_run"), model="ssdlite320_mbv3_small_reduced")


@pytest.fixture(scope="module")
def seg_run(data_home, tmp_path_factory):
    return _train("segmentation", tmp_path_factory.mktemp("seg_run"), model="lraspp_mbv3_small_reduced",
                  crop_size=[128, 256])


@pytest.fixture(scope="module")
def images(det_run, seg_run, tmp_path_factory):
    """Two images of different sizes: a built-in COCO one and a built-in Cityscapes one."""
    folder = tmp_path_factory.mktemp("images")
    coco = CocoDetection(builtin_coco(), "val2017")
    shutil.copy(coco.image_dir / coco.coco.imgs[coco.image_ids[0]]["file_name"], folder)
    shutil.copy(Cityscapes(builtin_cityscapes(), "val").files[0][0], folder)
    return sorted(folder.iterdir())


def test_eval_det_writes_results_that_rescore_the_same(det_run, tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["--builtin", "--limit", "4"]
    metrics = eval_det_main(["--weights", str(det_run), *common, "--batch-size", "2", "--out", str(out),
                             "--json", str(tmp_path / "metrics.json")])
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 6 and printed.count("Average Recall") == 6
    assert "| class" in printed and "| circle" in printed
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics.to_json()
    results = load_results(out / "detections.json")
    assert {r["image_id"] for r in results} <= set(CocoDetection(builtin_coco(), "val2017").image_ids[:4])

    coco = CocoDetection(builtin_coco(), "val2017").coco  # pycocotools itself on the written file: the same numbers
    official = COCOeval(coco, coco.loadRes(str(out / "detections.json")), "bbox")
    official.params.imgIds = coco.getImgIds()[:4]
    with contextlib.redirect_stdout(io.StringIO()):
        official.evaluate(), official.accumulate(), official.summarize()
    assert list(metrics.stats.values()) == pytest.approx(official.stats.tolist(), abs=1e-12)
    faster = eval_det_main(["--results", str(out / "detections.json"), *common, "--scorer", "faster_coco_eval"])
    assert faster.stats == pytest.approx(metrics.stats, abs=1e-9)


def test_eval_det_on_test_dev_writes_a_submission(det_run, tmp_path, capsys):
    """COCO's test-dev ships images and image_info_test-dev2017.json without annotations."""
    val = CocoDetection(builtin_coco(), "val2017")
    shutil.copytree(val.image_dir, tmp_path / "test2017")
    (tmp_path / "annotations").mkdir()
    info = {key: val.coco.dataset[key] for key in ("info", "images", "categories")}
    (tmp_path / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(info))
    assert eval_det_main(["--weights", str(det_run), "--data-root", str(tmp_path), "--split", "test-dev2017",
                          "--limit", "2", "--out", str(tmp_path / "out")]) is None
    assert "has no annotations: wrote" in capsys.readouterr().out
    assert {r["image_id"] for r in load_results(tmp_path / "out" / "detections.json")} <= set(val.image_ids[:2])


def test_eval_seg_writes_predictions_that_rescore_the_same(seg_run, tmp_path, capsys):
    out = tmp_path / "eval"
    metrics = eval_seg_main(["--weights", str(seg_run), "--builtin", "--limit", "2", "--out", str(out),
                             "--write-predictions", "--json", str(tmp_path / "metrics.json")])
    printed = capsys.readouterr().out
    assert "road" in printed and "category" in printed and "pixel accuracy" in printed
    assert (out / "confusion.png").is_file()
    stems = Cityscapes(builtin_cityscapes(), "val").stems[:2]
    assert sorted(p.name for p in (out / "predictions").glob("*.png")) == [s + PREDICTION_SUFFIX for s in stems]
    assert json.loads((tmp_path / "metrics.json").read_text())["miou"] == pytest.approx(metrics.miou)

    dataset = Cityscapes(builtin_cityscapes(), "val")
    official = official_scores(sorted((out / "predictions").glob("*.png")), [label for _, label in dataset.files[:2]])
    assert official["miou"] == pytest.approx(metrics.miou, abs=1e-6)  # cityscapesScripts on the written files
    rescored = eval_seg_main(["--predictions", str(out / "predictions"), "--builtin", "--limit", "2",
                              "--out", str(tmp_path / "rescored")])
    assert (rescored.confusion == metrics.confusion).all() and (tmp_path / "rescored" / "confusion.png").is_file()


def test_eval_seg_slide_flip_scales_run(seg_run, capsys):
    """(What sliding windows, flips and scales compute: tests/segmentation/test_inference.py.)"""
    metrics = eval_seg_main(["--weights", str(seg_run), "--builtin", "--limit", "1", "--mode", "slide",
                             "--crop", "128", "256", "--stride", "96", "192", "--flip", "--scales", "0.75", "1"])
    assert metrics.confusion.sum() == 256 * 512 - (Cityscapes(builtin_cityscapes(), "val")[0][1] == 255).sum()
    assert "mean" in capsys.readouterr().out


@pytest.mark.parametrize("run, task", [("det_run", "detection"), ("seg_run", "segmentation")])
def test_infer_draws_each_image(run, task, images, tmp_path, capsys, request):
    out = tmp_path / "pictures"
    results = infer_main(["--weights", str(request.getfixturevalue(run)), "--task", task, str(images[0].parent),
                          "--out", str(out), *(["--score-thresh", "0.01"] if task == "detection" else [])])
    assert len(results) == 2 and all(r.timings.total_ms > 0 for r in results)
    for path in images:
        with Image.open(out / f"{path.stem}.png") as picture, Image.open(path) as original:
            assert picture.size == original.size and picture.mode == "RGB"
    assert "mean over 2 images" in capsys.readouterr().out


def test_plain_state_dict_needs_the_model_name(det_run, tmp_path):
    loaded = load_model(det_run)
    assert loaded.class_names == ["__background__", "circle", "square", "triangle", "cross", "star"]
    path = tmp_path / "weights.pth"
    torch.save(loaded.model.state_dict(), path)
    loaded = load_model(path, "ssdlite320_mbv3_small_reduced", num_classes=6)
    assert loaded.config is None and loaded.class_names[1] == "class 1"
    with pytest.raises(ValueError, match="plain state dict: say which model"):
        load_model(path)


@pytest.mark.parametrize("main, argv, message", [
    (eval_det_main, ["--weights", "{tmp}/missing.pt", "--builtin"], "checkpoint not found"),
    (eval_det_main, ["--weights", "{det}", "--model", "ssdlite_nope", "--builtin"], "Unknown task model"),
    (eval_det_main, ["--weights", "{det}", "--data-root", "{tmp}/nowhere"], "COCO path not found"),
    (eval_seg_main, ["--weights", "{seg}", "--data-root", "{tmp}/nowhere"], "Cityscapes root not found"),
    (infer_main, ["--weights", "{det}", "{tmp}/nowhere", "--out", "{tmp}/out"], "input not found"),
    (infer_main, ["--weights", "{seg}", "--task", "detection", "{seg}/plot.png", "--out", "{tmp}"],
     "segmentation model"),
])
def test_errors_are_one_line(main, argv, message, det_run, seg_run, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, det=det_run, seg=seg_run) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: ") and error.count("\n") == 1 and message in error


def test_draw_detections_colours_classes_and_skips_low_scores():
    image = np.full((120, 160, 3), 128, dtype=np.uint8)
    boxes = torch.tensor([[10.0, 10.0, 80.0, 100.0], [90.0, 20.0, 150.0, 110.0]])
    names = ["__background__", "circle", "square"]
    picture = np.asarray(draw_detections(image, boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.2]), names))
    assert tuple(picture[60, 10]) == class_colour(1)  # left edge of the kept box
    assert (picture[:, 90:] == 128).all()  # the box under the threshold is not drawn
    assert (np.asarray(draw_detections(image, boxes, [1, 2], [0.1, 0.2], names)) == image).all()
    assert len({class_colour(label) for label in range(91)}) == 91


def test_overlay_mask_blends_and_keeps_ignored_pixels():
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    mask = np.full((4, 6), 255, dtype=np.uint8)
    mask[:2] = 13  # car
    picture = np.asarray(overlay_mask(image, mask, PALETTE, alpha=1.0))
    assert (picture[:2] == PALETTE[13]).all() and (picture[2:] == 0).all()
    half = np.asarray(overlay_mask(image + 100, mask, PALETTE))
    assert (half[0, 0] == np.round(50 + 0.5 * PALETTE[13])).all()
    with pytest.raises(ValueError, match="does not match"):
        overlay_mask(image, mask[:3], PALETTE)
