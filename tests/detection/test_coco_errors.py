"""Malformed COCO data stops with one line naming the file and the record; unreadable images are left out of
evaluation instead of being replaced; errors in DataLoader workers read as they do in the main process."""
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from heads.data import DataError
from heads.detection.coco import CocoDetection
from heads.detection.evaluate import evaluate_model, predict_detections

ANNOTATIONS = Path("annotations") / "instances_val2017.json"


def make_coco(root: Path, images: dict[str, tuple[int, int] | bytes], boxes: dict[str, list]) -> Path:
    """A COCO folder: ``images`` maps file names to a (width, height) gray image or raw bytes (recorded as 64 x 48),
    ``boxes`` file names to their [x, y, w, h] boxes, all of category 5 ("thing")."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    records, annotations = [], []
    for image_id, (name, content) in enumerate(images.items(), start=1):
        if isinstance(content, bytes):
            (root / "val2017" / name).write_bytes(content)
            content = (64, 48)
        else:
            Image.new("RGB", content, (90, 90, 90)).save(root / "val2017" / name)
        records.append({"id": image_id, "file_name": name, "width": content[0], "height": content[1]})
        for box in boxes.get(name, []):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 5, "bbox": box,
                                "area": float(box[2] * box[3]), "iscrowd": 0})
    dataset = {"images": records, "annotations": annotations, "categories": [{"id": 5, "name": "thing"}]}
    (root / ANNOTATIONS).write_text(json.dumps(dataset))
    return root


def edit(root: Path, change) -> Path:
    path = root / ANNOTATIONS
    dataset = json.loads(path.read_text())
    change(dataset)
    path.write_text(json.dumps(dataset))
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    return make_coco(tmp_path / "coco", {"a.jpg": (64, 48)}, {"a.jpg": [[1, 2, 3, 4], [10, 10, 20, 20]]})


def test_recorded_size_is_checked_when_the_image_is_read(root):
    """The recorded size, not the file's, used to bound the boxes: a wrong record stops the read instead."""
    edit(root, lambda d: d["images"][0].update(width=40))
    dataset = CocoDetection(root)  # no header pass over every file at load: the check costs nothing at read time
    with pytest.raises(DataError) as raised:
        dataset[0]
    message = str(raised.value)
    assert str(root / ANNOTATIONS) in message and "image 1" in message and str(root / "val2017" / "a.jpg") in message
    assert "40x48" in message and "64x48" in message and "\n" not in message


def test_boxes_are_clipped_to_the_image_read_with_a_counted_warning(tmp_path, caplog):
    """Hand-computed: a 64 x 48 image bounds boxes that cross its edges (as torchvision's COCO references do);
    loading says how many reach more than 1 px past it."""
    boxes = [[-4, -2, 10, 10], [60, 40, 10, 20], [30.5, 10.25, 40, 5], [70, 50, 5, 5], [-0.5, 0, 64.5, 48.75]]
    root = make_coco(tmp_path, {"a.jpg": (64, 48)}, {"a.jpg": boxes[:4]})
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(root)
    assert [r.getMessage() for r in caplog.records] == [
        f"{root / ANNOTATIONS}: 4 annotation box(es) reach more than 1 px past their image; they are clipped to it "
        "(first: annotations[0] (id 1) [-4, -2, 10, 10] in a 64x48 image)"]
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[0, 0, 6, 8], [60, 40, 64, 48], [30.5, 10.25, 64, 15.25], [64, 48, 64, 48]]
    _, target = CocoDetection(root, train=True)[0]  # training drops what clipping leaves at most 1 px wide or high
    assert target["boxes"].tolist() == [[0, 0, 6, 8], [60, 40, 64, 48], [30.5, 10.25, 64, 15.25]]
    caplog.clear()
    _, target = CocoDetection(make_coco(tmp_path / "within", {"a.jpg": (64, 48)}, {"a.jpg": boxes[4:]}))[0]
    assert target["boxes"].tolist() == [[0, 0, 64, 48]] and not caplog.records  # within 1 px: clipped quietly


def _set(record_key: str, index: int, **values):
    return lambda d: d[record_key][index].update(values)


def _drop(record_key: str, index: int, key: str):
    return lambda d: d[record_key][index].pop(key)


def _replace(key: str, value):
    return lambda d: d.update({key: value})


@pytest.mark.parametrize("change, message", [
    (_set("annotations", 1, image_id=7), r"annotations\[1\] \(id 2\) refers to image_id 7, which is not in 'images'"),
    (_drop("categories", 0, "id"), r"categories\[0\] has no integer 'id'"),
    (_drop("categories", 0, "name"), r"categories\[0\] \(id 5\) has no string 'name'"),
    (_drop("images", 0, "width"), r"images\[0\] \(id 1\) has no positive integer 'width'"),
    (_drop("images", 0, "height"), r"images\[0\] \(id 1\) has no positive integer 'height'"),
    (_set("images", 0, width="64"), r"images\[0\] \(id 1\) has no positive integer 'width' \(found '64'\)"),
    (_drop("images", 0, "file_name"), r"images\[0\] \(id 1\) has no string 'file_name'"),
    (_drop("images", 0, "id"), r"images\[0\] has no integer 'id'"),
    (_set("annotations", 0, bbox=["1", 2, 3, 4]), r"annotations\[0\] \(id 1\) has malformed bbox \['1', 2, 3, 4\]"),
    (_set("annotations", 0, bbox=[1, 2, float("nan"), 4]), r"annotations\[0\] \(id 1\) has malformed bbox"),
    (_set("annotations", 0, bbox=[1, 2, -3, 4]), r"annotations\[0\] \(id 1\) has malformed bbox"),
    (_set("annotations", 0, category_id=9), r"annotations\[0\] \(id 1\) refers to category_id 9, which is not in "),
    (_set("annotations", 0, iscrowd=2), r"annotations\[0\] \(id 1\) has iscrowd 2, expected 0 or 1"),
    (_set("annotations", 1, id=1), r"annotations\[1\] repeats id 1"),
    (_drop("annotations", 0, "id"), r"annotations\[0\] has no integer 'id'"),
    (_drop("annotations", 0, "area"), r"annotations\[0\] \(id 1\) has no non-negative number 'area'"),
    (_replace("images", {"a.jpg": 1}), r"'images' must be a list of records, got dict"),
    (_replace("annotations", None), r"'annotations' must be a list of records, got NoneType"),
    (_replace("categories", [5]), r"categories\[0\] must be a JSON object, got int"),
])
def test_malformed_records_are_named(root, change, message):
    with pytest.raises(DataError, match=message) as raised:
        CocoDetection(edit(root, change))
    assert str(raised.value).startswith(f"{root / ANNOTATIONS}: ") and "\n" not in str(raised.value)


def test_repeated_image_ids_are_named(tmp_path):
    root = make_coco(tmp_path, {"a.jpg": (64, 48), "b.jpg": (32, 32)}, {})
    with pytest.raises(DataError, match=r"images\[1\] repeats id 1"):
        CocoDetection(edit(root, _set("images", 1, id=1)))


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00binary", b"not json", b"[1, 2]"])
def test_non_json_or_non_object_file_is_named(root, content):
    (root / ANNOTATIONS).write_bytes(content)
    with pytest.raises(DataError, match=f"^{root / ANNOTATIONS}: ") as raised:
        CocoDetection(root)
    assert "\n" not in str(raised.value)


# ---- unreadable images in evaluation


class SizeOracle(nn.Module):
    """A 'detector' that returns, for an image of a given size, the boxes stored for that size (label 1)."""

    def __init__(self, boxes_by_size: dict[tuple[int, int], list]):
        super().__init__()
        self.boxes_by_size = boxes_by_size

    def forward(self, images):
        outputs = []
        for image in images:
            boxes = torch.tensor(self.boxes_by_size[tuple(image.shape[1:])], dtype=torch.float32).reshape(-1, 4)
            labels = torch.ones(len(boxes), dtype=torch.int64)
            outputs.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels})
        return outputs


@pytest.fixture
def with_corrupt(tmp_path) -> Path:
    images = {"a.jpg": (64, 48), "b.jpg": b"not a jpeg", "c.jpg": (32, 32)}
    return make_coco(tmp_path, images, {"a.jpg": [[1, 2, 20, 30]], "b.jpg": [[5, 5, 10, 10]], "c.jpg": [[4, 4, 8, 8]]})


ORACLE = SizeOracle({(48, 64): [[1, 2, 21, 32]], (32, 32): [[4, 4, 12, 12]]})


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_corrupt_leaves_the_image_out_of_evaluation(with_corrupt, workers, caplog):
    dataset = CocoDetection(with_corrupt, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        detections, image_ids = predict_detections(ORACLE, dataset, batch_size=2, device="cpu", workers=workers)
    assert image_ids == [1, 3] and [d["boxes"].tolist() for d in detections] == [[[1, 2, 21, 32]], [[4, 4, 12, 12]]]
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 3" in warnings[0] and "b.jpg" in warnings[0]


def test_skip_corrupt_evaluation_scores_only_readable_images(with_corrupt, tmp_path):
    """Before, image 3 was predicted twice (once in place of image 2) and its detections were written twice."""
    dataset = CocoDetection(with_corrupt, skip_corrupt=True)
    metrics = evaluate_model(ORACLE, dataset, "cpu", batch_size=2, output=tmp_path)
    assert metrics.stats["AP"] == 1.0 and metrics.stats["AR100"] == 1.0
    written = json.loads((tmp_path / "detections.json").read_text())
    assert [(r["image_id"], r["bbox"]) for r in written] == [(1, [1.0, 2.0, 20.0, 30.0]), (3, [4.0, 4.0, 8.0, 8.0])]


def test_without_skip_corrupt_evaluation_stops_at_the_unreadable_image(with_corrupt):
    with pytest.raises(DataError, match=r"corrupt or unreadable image .*b\.jpg"):
        predict_detections(ORACLE, CocoDetection(with_corrupt), batch_size=2, device="cpu")


def test_nothing_readable_is_an_error(tmp_path):
    root = make_coco(tmp_path, {"a.jpg": b"junk", "b.jpg": b"junk"}, {})
    with pytest.raises(DataError, match="none of the 2 images"):
        predict_detections(ORACLE, CocoDetection(root, skip_corrupt=True), batch_size=2, device="cpu")


# ---- errors raised in DataLoader workers


def test_worker_error_is_the_same_line_as_without_workers(with_corrupt):
    messages = []
    for workers in (0, 1):
        with pytest.raises(DataError) as raised:
            predict_detections(ORACLE, CocoDetection(with_corrupt), batch_size=1, device="cpu", workers=workers)
        messages.append(str(raised.value))
    assert messages[0] == messages[1] and "\n" not in messages[1]


def test_training_with_workers_reports_a_corrupt_image_in_one_line(tmp_path, capsys):
    from heads.cli import train_main

    images = {f"{i}.jpg": b"junk" for i in range(4)}
    root = make_coco(tmp_path / "coco", images, dict.fromkeys(images, [[1, 2, 10, 10]]))
    (root / "val2017").rename(root / "train2017")
    (root / ANNOTATIONS).rename(root / "annotations" / "instances_train2017.json")
    make_coco(tmp_path / "val", {"a.jpg": (64, 48)}, {"a.jpg": [[1, 2, 10, 10]]})
    (tmp_path / "val" / "val2017").rename(root / "val2017")
    (tmp_path / "val" / ANNOTATIONS).rename(root / ANNOTATIONS)
    argv = ["--dataset", "coco", "--data-root", str(root), "--model", "ssdlite320_mbv3_small_reduced",
            "--model-kwargs", "{size: 160}", "--batch-size", "2", "--workers", "1", "--max-steps", "1",
            "--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as raised:
        train_main(argv)
    stderr = capsys.readouterr().err  # also holds the progress bar
    assert raised.value.code == 2 and "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: corrupt or unreadable image ") and "train2017" in last_line
