"""Segmentation metrics: hand-made confusion cases and parity with cityscapesScripts' official evaluator."""
import fnmatch
import json
import math
import shutil

import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as official
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.csHelpers import getCsFileInfo
from cityscapesscripts.helpers.labels import labels as official_labels
from PIL import Image

from heads.data import DataError
from heads.segmentation.builtin import builtin_cityscapes
from heads.segmentation.cityscapes import CLASS_NAMES, TRAIN_ID_TO_ID, Cityscapes
from heads.segmentation.evaluate import (
    ConfusionMatrix,
    evaluate_folder,
    evaluate_model,
    official_scores,
    plot_confusion,
    write_predictions,
)

TOY = dict(class_names=("a", "b", "c"), categories=("x", "x", "y"))


@pytest.fixture(scope="module")
def val_set(tmp_path_factory) -> Cityscapes:
    root = builtin_cityscapes(tmp_path_factory.mktemp("data") / "cityscapes", num_train=1, num_val=6, size=(96, 192))
    return Cityscapes(root, "val")


def _noisy(mask: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Ground truth with ``fraction`` of the pixels replaced by random classes, ignore pixels predicted too."""
    pred = np.where(mask == 255, rng.integers(0, 19, mask.shape), mask)
    noise = rng.random(mask.shape) < fraction
    return np.where(noise, rng.integers(0, 19, mask.shape), pred).astype(np.uint8)


@pytest.fixture(scope="module")
def predictions(val_set, tmp_path_factory):
    """Label-id PNGs for the val set: perfect, lightly and heavily noisy, and one with cars called persons."""
    out_dir, rng = tmp_path_factory.mktemp("pred"), np.random.default_rng(0)
    for index, stem in enumerate(val_set.stems):
        image, mask = val_set.load(index)
        pred = _noisy(mask, rng, [0.0, 0.0, 0.05, 0.3, 0.6, 0.1][index])
        if index == 5:
            pred[pred == 13] = 11
        write_predictions(pred, stem, out_dir, image=image if index == 0 else None)
    return out_dir


def test_perfect_prediction_scores_one_and_absent_classes_are_nan():
    confusion = ConfusionMatrix(**TOY)
    target = torch.tensor([[0, 0, 1], [1, 255, 255]])
    confusion.update(target.clone().masked_fill_(target == 255, 2), target)
    metrics = confusion.compute()
    assert metrics.miou == 1.0 and metrics.pixel_accuracy == 1.0
    assert metrics.per_class_iou["a"] == metrics.per_class_iou["b"] == 1.0 and math.isnan(metrics.per_class_iou["c"])
    assert metrics.category_iou["x"] == 1.0 and math.isnan(metrics.category_iou["y"])


def test_hand_computed_iou_and_ignored_pixels():
    confusion = ConfusionMatrix(**TOY)
    confusion.update(torch.tensor([0, 1, 1, 1, 0, 2, 1]), torch.tensor([0, 0, 1, 1, 255, 2, 255]))
    metrics = confusion.compute()
    assert metrics.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert metrics.per_class_iou == {"a": 0.5, "b": 2 / 3, "c": 1.0}
    assert metrics.miou == pytest.approx((0.5 + 2 / 3 + 1) / 3) and metrics.pixel_accuracy == 0.8
    assert metrics.category_iou == {"x": 1.0, "y": 1.0}  # a and b are merged before IoU


def test_predicted_but_absent_class_scores_zero():
    confusion = ConfusionMatrix(**TOY)
    confusion.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    assert confusion.compute().per_class_iou == {"a": 0.5, "b": pytest.approx(math.nan, nan_ok=True), "c": 0.0}
    assert confusion.compute().miou == 0.25


def test_merge_and_errors():
    """(The all-reduce over processes: tests/training/test_distributed.py, with two processes.)"""
    pred, target = torch.randint(0, 19, (2, 32, 32)), torch.randint(0, 19, (2, 32, 32))
    whole, first, second = ConfusionMatrix(), ConfusionMatrix(), ConfusionMatrix()
    whole.update(pred, target)
    first.update(pred[0], target[0])
    second.update(pred[1], target[1])
    first.merge(second)
    assert torch.equal(first.matrix, whole.matrix) and whole.matrix.sum() == 2 * 32 * 32
    with pytest.raises(ValueError, match=r"0\.\.18.*got values 0\.\.19"):
        whole.update(torch.tensor([19]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        whole.update(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"ignore_index 0 is a class index; use a value outside 0\.\.18"):
        ConfusionMatrix(ignore_index=0)


def test_prediction_files_follow_the_official_naming(val_set, predictions):
    for stem, (_, label_path) in zip(val_set.stems, val_set.files):
        args = type("Args", (), {"predictionPath": str(predictions), "predictionWalk": None})()
        found = official.getPrediction(args, str(label_path))  # exits unless exactly one file matches
        info = getCsFileInfo(str(label_path))
        assert fnmatch.fnmatch(found, f"*/{info.city}_{info.sequenceNb}_{info.frameNb}*.png")
        assert found == str(predictions / f"{stem}_labelIds.png")
    stem, mask = val_set.stems[0], val_set.load(0)[1]
    written = np.asarray(Image.open(predictions / f"{stem}_labelIds.png"))  # a perfect prediction
    assert (written == TRAIN_ID_TO_ID[mask])[mask != 255].all()
    assert Image.open(predictions / f"{stem}_overlay.jpg").size == (192, 96)


def test_scores_equal_the_official_evaluator(val_set, predictions):
    ours = evaluate_folder(predictions, val_set)
    pred_files = [predictions / f"{stem}_labelIds.png" for stem in val_set.stems]
    reference = official_scores(pred_files, [label for _, label in val_set.files])
    assert 0.1 < ours.miou < 1.0 and not any(math.isnan(v) for v in ours.per_class_iou.values())  # noise: all 19
    assert ours.miou == pytest.approx(reference["miou"], abs=1e-6)
    assert ours.category_miou == pytest.approx(reference["category_miou"], abs=1e-6)
    for key in ("per_class_iou", "category_iou"):
        assert list(getattr(ours, key)) == list(reference[key])
        for name, value in getattr(ours, key).items():
            assert value == pytest.approx(reference[key][name], abs=1e-6, nan_ok=True), name


def test_absent_classes_match_the_official_evaluator(val_set, tmp_path):
    """Perfect predictions: classes in no ground truth are NaN and left out of the means, on both sides."""
    for index, stem in enumerate(val_set.stems):
        mask = val_set.load(index)[1]
        write_predictions(np.where(mask == 255, 0, mask), stem, tmp_path)
    ours = evaluate_folder(tmp_path, val_set)
    reference = official_scores(sorted(tmp_path.glob("*.png")), [label for _, label in val_set.files])
    present = set(np.unique([val_set.load(index)[1] for index in range(len(val_set))]).tolist()) - {255}
    assert ours.miou == reference["miou"] == 1.0 and len(present) > 4
    assert [math.isnan(v) for v in ours.per_class_iou.values()] == \
        [math.isnan(v) for v in reference["per_class_iou"].values()] == [i not in present for i in range(19)]


def test_evaluate_folder_errors(val_set, predictions, tmp_path):
    shutil.copytree(predictions, tmp_path, dirs_exist_ok=True)
    stem = val_set.stems[1]
    path = tmp_path / f"{stem}_labelIds.png"
    Image.fromarray(np.zeros((10, 10), np.uint8) + 7).save(path)
    with pytest.raises(DataError, match=f"{path} is 10x10 but its ground truth .* is 192x96"):
        evaluate_folder(tmp_path, val_set)
    Image.fromarray(np.full((96, 192), 200, np.uint8)).save(path)
    with pytest.raises(DataError, match=f"{path} holds label ids \\[200\\] outside the Cityscapes label table"):
        evaluate_folder(tmp_path, val_set)
    Image.fromarray(np.zeros((96, 192, 3), np.uint8)).save(path)
    with pytest.raises(DataError, match=f"{path} must be a single-channel PNG of label ids, got shape"):
        evaluate_folder(tmp_path, val_set)
    shutil.copy(path, tmp_path / f"{stem}_leftImg8bit.png")
    with pytest.raises(DataError, match=f"one prediction {stem}\\*.png .* found .*_labelIds.png"):
        evaluate_folder(tmp_path, val_set)
    path.unlink()
    (tmp_path / f"{stem}_leftImg8bit.png").unlink()
    with pytest.raises(DataError, match=f"one prediction {stem}\\*.png under {tmp_path}, found none"):
        evaluate_folder(tmp_path, val_set)
    with pytest.raises(DataError, match="evaluateImgLists failed"):
        official_scores([], val_set.files[0][1:])


def test_reports_table_json_and_confusion_plot(val_set, predictions, tmp_path):
    metrics = evaluate_folder(predictions, val_set)
    lines = metrics.table().splitlines()
    assert all(any(line.startswith(name) for line in lines) for name in (*CLASS_NAMES, "vehicle", "pixel accuracy"))
    assert len({len(line) for line in lines if line}) == 1  # aligned columns
    report = json.loads(metrics.to_json())
    assert report["miou"] == pytest.approx(metrics.miou) and len(report["confusion"]) == 19
    path = plot_confusion(metrics.confusion, CLASS_NAMES, tmp_path / "confusion.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200


VOID_IDS = [label.id for label in official_labels if label.id >= 0 and not 0 <= label.trainId < 255]


def _assert_equal_scores(ours, reference):
    assert ours.miou == pytest.approx(reference["miou"], abs=1e-9)
    assert ours.category_miou == pytest.approx(reference["category_miou"], abs=1e-9)
    for key in ("per_class_iou", "category_iou"):
        for name, value in getattr(ours, key).items():
            assert value == pytest.approx(reference[key][name], abs=1e-9, nan_ok=True), name


def test_void_predictions_score_as_the_official_evaluator(val_set, predictions, tmp_path):
    """Label ids that are not evaluated classes (0 'unlabeled', 9 'parking', ...) are accepted by cityscapesScripts
    and count as misses of the ground-truth class; the number of such pixels is reported."""
    rng, expected_void = np.random.default_rng(1), 0
    for index, stem in enumerate(val_set.stems):
        ids = np.asarray(Image.open(predictions / f"{stem}_labelIds.png")).copy()
        void = rng.random(ids.shape) < [0.0, 0.3, 0.02, 0.1, 1.0, 0.05][index]
        ids[void] = rng.choice(VOID_IDS, size=int(void.sum()))
        Image.fromarray(ids).save(tmp_path / f"{stem}_labelIds.png")
        expected_void += int((void & (val_set.load(index)[1] != 255)).sum())
    ours = evaluate_folder(tmp_path, val_set)
    reference = official_scores([tmp_path / f"{stem}_labelIds.png" for stem in val_set.stems],
                                [label for _, label in val_set.files])
    _assert_equal_scores(ours, reference)
    assert expected_void > 1000 and ours.void_pixels == expected_void
    assert f"{expected_void} px" in ours.table() and json.loads(ours.to_json())["void_pixels"] == expected_void


def test_16_bit_label_pngs_score_as_the_official_evaluator(val_set, predictions, tmp_path):
    """cityscapesScripts reads PNGs with numpy as they are: 16-bit label ids within the table are accepted."""
    for stem in val_set.stems:
        ids = np.asarray(Image.open(predictions / f"{stem}_labelIds.png"))
        Image.fromarray(ids.astype(np.uint16)).save(tmp_path / f"{stem}_labelIds.png")
    assert Image.open(tmp_path / f"{val_set.stems[0]}_labelIds.png").mode == "I;16"
    pred_files = [tmp_path / f"{stem}_labelIds.png" for stem in val_set.stems]
    ours = evaluate_folder(tmp_path, val_set)
    _assert_equal_scores(ours, official_scores(pred_files, [label for _, label in val_set.files]))
    assert ours.miou == evaluate_folder(predictions, val_set).miou
    Image.fromarray(np.full((96, 192), 300, np.uint16)).save(pred_files[0])
    with pytest.raises(DataError, match=f"{pred_files[0]} holds label ids \\[300\\] outside"):
        evaluate_folder(tmp_path, val_set)


def test_confusion_counts_void_predictions_as_misses():
    """Hand-computed: class a has 2 GT pixels, one predicted a, one void (255): IoU 1/2; b is untouched."""
    confusion = ConfusionMatrix(**TOY)
    confusion.update(torch.tensor([0, 255, 1, 255]), torch.tensor([0, 0, 1, 255]))
    metrics = confusion.compute()
    assert metrics.per_class_iou["a"] == 0.5 and metrics.per_class_iou["b"] == 1.0
    assert metrics.category_iou["x"] == 2 / 3 and metrics.void_pixels == 1 and metrics.pixel_accuracy == 2 / 3
    assert metrics.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_one_line_with_or_without_workers(val_set, tmp_path, workers):
    from heads.registry import create_model

    root = tmp_path / "cityscapes"
    shutil.copytree(val_set.root, root)
    broken = root / val_set.files[1][0].relative_to(val_set.root)
    broken.write_bytes(b"not a png")
    model = create_model("lraspp_mbv3_small", num_classes=19).eval()
    with pytest.raises(DataError) as raised:
        evaluate_model(model, Cityscapes(root, "val"), "cpu", limit=2, workers=workers)
    message = str(raised.value)
    assert message.startswith(f"corrupt or unreadable image {broken}: ") and "\n" not in message
