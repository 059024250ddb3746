"""COCO reading and the built-in shapes dataset, written as specifications (augmentation: test_ssd_augmentation.py)."""
import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL, exif_jpeg, write_coco
from PIL import Image
from pycocotools.cocoeval import COCOeval

from heads.data import DataError
from heads.detection.builtin import builtin_coco
from heads.detection.coco import CocoDetection, collate_detection
from heads.detection.transforms import SSDTrainTransform

REAL_SAMPLE = REAL / "coco_sample"
COCO_KEYS = {"info", "licenses", "images", "annotations", "categories"}
ANNOTATION_KEYS = {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}


def instances(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    return builtin_coco(tmp_path_factory.mktemp("data") / "shapes", num_train=40, num_val=12)


def gray_image(width=64, height=48, mode="RGB") -> Image.Image:
    return Image.new(mode, (width, height), {"RGB": (90, 90, 90), "L": 90, "CMYK": (10, 20, 30, 40)}[mode])


# ---- the built-in dataset


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_builtin_is_exact_coco(builtin, split):
    dataset = instances(builtin, split)
    assert set(dataset) == COCO_KEYS
    assert all(set(ann) == ANNOTATION_KEYS for ann in dataset["annotations"])
    assert all({"id", "file_name", "width", "height"} <= set(image) for image in dataset["images"])
    category_ids = sorted(category["id"] for category in dataset["categories"])
    assert len(category_ids) == 5 and category_ids != list(range(1, 6))
    for image in dataset["images"]:
        with Image.open(builtin / split / image["file_name"]) as file:
            assert file.size == (image["width"], image["height"])


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_builtin_variety(builtin, split):
    dataset = instances(builtin, split)
    sizes = {(image["width"], image["height"]) for image in dataset["images"]}
    assert len(sizes) > 5 and any(width != height for width, height in sizes)
    annotated = {ann["image_id"] for ann in dataset["annotations"]}
    assert any(image["id"] not in annotated for image in dataset["images"]), "no empty image"
    modes = {Image.open(builtin / split / image["file_name"]).mode for image in dataset["images"]}
    assert modes == {"RGB", "L"}


def test_builtin_train_has_crowds_and_large_objects(builtin):
    dataset = instances(builtin, "train2017")
    assert any(ann["iscrowd"] for ann in dataset["annotations"])
    sizes = {image["id"]: min(image["width"], image["height"]) for image in dataset["images"]}
    relative = [max(ann["bbox"][2:]) / sizes[ann["image_id"]] for ann in dataset["annotations"] if not ann["iscrowd"]]
    assert 0.1 < min(relative) and max(relative) < 0.65


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_builtin_evaluates_perfectly_against_itself(builtin, split):
    """The files are what pycocotools expects: ground truth used as detections scores AP 1."""
    coco = CocoDetection(builtin, split).coco
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in coco.dataset["annotations"] if not a["iscrowd"]]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
def test_builtin_segmentation_matches_boxes(builtin):
    coco = CocoDetection(builtin, "val2017").coco
    for ann in coco.dataset["annotations"]:
        ys, xs = np.nonzero(coco.annToMask(ann))
        x, y, w, h = ann["bbox"]
        assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x, y, x + w, y + h], atol=2)
        assert 0 < ann["area"] <= w * h + 2 * (w + h)


def test_builtin_is_written_once(builtin):
    annotation_file = builtin / "annotations" / "instances_train2017.json"
    before = annotation_file.stat().st_mtime_ns
    assert builtin_coco(builtin, num_train=40, num_val=12) == builtin
    assert annotation_file.stat().st_mtime_ns == before
    assert not [p for p in builtin.parent.iterdir() if p != builtin], "a staging folder was left behind"


def test_builtin_refuses_other_arguments_on_same_root(builtin):
    with pytest.raises(DataError, match="delete it or pass another root"):
        builtin_coco(builtin, num_train=41, num_val=12)


def test_builtin_is_deterministic(tmp_path):
    first, second = (builtin_coco(tmp_path / name, num_train=4, num_val=2, seed=7) for name in "ab")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


def test_builtin_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MBBACKBONES_DATA", str(tmp_path))
    assert builtin_coco(num_train=2, num_val=1) == tmp_path / "builtin_coco"


@pytest.mark.parametrize("label_mode, num_classes", [("contiguous", 6), ("coco91", 42)])
def test_builtin_loads(builtin, label_mode, num_classes):
    dataset = CocoDetection(builtin, "train2017", label_mode=label_mode, train=True)
    assert len(dataset) == 40 and dataset.num_classes == num_classes
    assert dataset.class_names[dataset.category_to_label[3]] == "circle"
    annotations = instances(builtin, "train2017")["annotations"]
    for image, target in (dataset[i] for i in range(len(dataset))):
        assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() <= image.max() <= 1
        objects = [a for a in annotations if a["image_id"] == target["image_id"] and not a["iscrowd"]]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)])
        torch.testing.assert_close(target["boxes"], expected.reshape(-1, 4))  # shapes lie inside: nothing clipped
        assert target["labels"].tolist() == [dataset.category_to_label[a["category_id"]] for a in objects]


# ---- reading real COCO


@pytest.mark.parametrize("label_mode, label_of_cat, num_classes", [("contiguous", 16, 81), ("coco91", 17, 91)])
def test_real_sample_labels(label_mode, label_of_cat, num_classes):
    dataset = CocoDetection(REAL_SAMPLE, label_mode=label_mode)
    assert dataset.num_classes == num_classes == len(dataset.class_names)
    assert dataset.category_to_label[17] == label_of_cat and dataset.label_to_category[label_of_cat] == 17
    assert dataset.class_names[label_of_cat] == dataset.coco.cats[17]["name"]
    assert dataset.class_names[0] == "__background__"
    assert dataset.class_names.count("N/A") == (10 if label_mode == "coco91" else 0)


def test_real_sample_boxes_match_json():
    dataset = CocoDetection(REAL_SAMPLE)
    image, target = dataset[0]
    annotations = instances(REAL_SAMPLE, "val2017")["annotations"]
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)])
    assert image.shape == (3, 480, 640) and target["image_id"] == 39769
    torch.testing.assert_close(target["boxes"], expected.clamp(max=640))
    assert target["labels"].tolist() == [dataset.category_to_label[a["category_id"]] for a in annotations]


def test_index_past_the_end_ends_iteration():
    dataset = CocoDetection(REAL_SAMPLE)
    assert len(list(dataset)) == 1
    with pytest.raises(IndexError):
        dataset[1]


def test_unknown_label_mode_lists_choices():
    with pytest.raises(ValueError, match="contiguous.*coco91"):
        CocoDetection(REAL_SAMPLE, label_mode="voc")


@pytest.mark.parametrize("train, expected", [
    (True, [[1, 2, 30, 40], [50, 10, 64, 20]]),
    (False, [[1, 2, 30, 40], [50, 10, 64, 20], [0, 0, 10, 10], [5, 5, 5, 20], [64, 0, 64, 10]]),
])
def test_crowd_and_degenerate_boxes_dropped_in_training(tmp_path, train, expected):
    boxes = [([1, 2, 29, 38], 0), ([50, 10, 30, 10], 0), ([0, 0, 10, 10], 1), ([5, 5, 0, 15], 0), ([70, 0, 5, 10], 0)]
    root = write_coco(tmp_path, {"a.jpg": gray_image()}, [("a.jpg", bbox, crowd) for bbox, crowd in boxes])
    _, target = CocoDetection(root, train=train)[0]
    assert target["boxes"].tolist() == expected
    assert len(target["labels"]) == len(expected)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_become_rgb(tmp_path, mode):
    root = write_coco(tmp_path, {"a.jpg": gray_image(mode=mode)}, [])
    image, target = CocoDetection(root)[0]
    assert image.shape == (3, 48, 64) and target["boxes"].shape == (0, 4)


@pytest.mark.parametrize("recorded, upright", [((48, 64), True), ((64, 48), False)])
def test_a_photo_with_an_exif_orientation_is_read_in_the_frame_of_its_record(tmp_path, recorded, upright):
    """A photo annotated as viewers show it is turned upright; one annotated as stored (COCO's own photos with an
    orientation tag) is not. Boxes are in the recorded frame either way."""
    root = write_coco(tmp_path, {"a.jpg": gray_image(*recorded)}, [("a.jpg", [1, 2, 30, 20], 0)])
    stored = exif_jpeg(root / "val2017" / "a.jpg", 6)  # 64 x 48 as stored, 48 x 64 upright
    image, target = CocoDetection(root)[0]
    pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(pixels, np.rot90(stored, -1) if upright else stored)
    assert target["boxes"].tolist() == [[1, 2, 31, 22]]


def test_a_photo_whose_record_matches_neither_frame_is_named(tmp_path):
    root = write_coco(tmp_path, {"a.jpg": gray_image(50, 50)}, [])
    exif_jpeg(root / "val2017" / "a.jpg", 6)
    with pytest.raises(DataError) as raised:
        CocoDetection(root)[0]
    assert str(raised.value) == (f"{root / 'annotations' / 'instances_val2017.json'}: image 1 is recorded as 50x50 but "
                                 f"{root / 'val2017' / 'a.jpg'} is 64x48 as stored and 48x64 upright (EXIF orientation "
                                 "6) (width x height); fix the record")


def break_root(root: Path):
    return root / "missing"


def break_annotations(root: Path):
    (root / "annotations" / "instances_val2017.json").unlink()
    return root


def truncate_json(root: Path):
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(path.read_text()[:40])
    return root


def drop_key(root: Path):
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "annotations"}))
    return root


def bad_bbox(root: Path):
    path = root / "annotations" / "instances_val2017.json"
    dataset = json.loads(path.read_text())
    dataset["annotations"][0]["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(dataset))
    return root


@pytest.mark.parametrize("corrupt, message", [
    (break_root, "missing"),
    (break_annotations, r"instances_val2017\.json"),
    (truncate_json, r"instances_val2017\.json: invalid JSON at line 1 column \d+"),
    (drop_key, r"instances_val2017\.json: missing key\(s\) \['annotations'\]"),
    (bad_bbox, r"instances_val2017\.json: annotations\[0\] \(id 1\) has malformed bbox \[1, 2, 3\]"),
])
def test_broken_dataset_errors_name_the_file(tmp_path, corrupt, message):
    root = write_coco(tmp_path / "coco", {"a.jpg": gray_image()}, [("a.jpg", [1, 2, 3, 4], 0)])
    with pytest.raises(DataError, match=message):
        CocoDetection(corrupt(root))


@pytest.fixture
def with_corrupt(tmp_path) -> Path:
    images = {"a.jpg": gray_image(), "b.jpg": b"not a jpeg", "c.jpg": gray_image(32, 32)}
    return write_coco(tmp_path, images, [("c.jpg", [1, 1, 8, 8], 0)])


def test_corrupt_image_error_names_file(with_corrupt):
    with pytest.raises(DataError, match=r"b\.jpg"):
        CocoDetection(with_corrupt)[1]


def test_skip_corrupt_returns_next_and_counts(with_corrupt, caplog):
    dataset = CocoDetection(with_corrupt, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        samples = [dataset[1], dataset[(1, 5)]]
    assert [target["image_id"] for _, target in samples] == [3, 3]
    assert dataset.skipped == {str(with_corrupt / "val2017" / "b.jpg")}
    assert len(caplog.records) == 1 and "b.jpg" in caplog.records[0].getMessage()


def test_all_corrupt_ends_with_error(tmp_path):
    root = write_coco(tmp_path, {"a.jpg": b"junk", "b.jpg": b"junk"}, [])
    with pytest.raises(DataError, match="no readable image"):
        CocoDetection(root, skip_corrupt=True)[0]


def test_collate_keeps_lists(builtin):
    dataset = CocoDetection(builtin, "val2017")
    images, targets = collate_detection([dataset[0], dataset[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2


def test_dataset_applies_transform_with_item_seed(builtin):
    dataset = CocoDetection(builtin, "train2017", transform=SSDTrainTransform(256), train=True)
    (image, target), (again, target_again) = dataset[(3, 11)], dataset[(3, 11)]
    assert image.shape == (3, 256, 256) and image.dtype == torch.float32 and image.max() <= 1
    assert torch.equal(image, again) and torch.equal(target["boxes"], target_again["boxes"])
