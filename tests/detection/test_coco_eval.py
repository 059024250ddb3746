import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch
from conftest import REAL
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from heads.detection.evaluate import BACKENDS, STAT_NAMES, evaluate, load_results, save_results, to_coco_results

SAMPLE = REAL / "coco_sample" / "annotations" / "instances_val2017.json"
SAMPLE_IMAGE = 39769
CAT, COUCH, BED, REMOTE = 17, 63, 65, 75
TOLERANCE = 1e-12  # pycocotools divides by tp + fp + eps, faster_coco_eval does not: last-bit differences

# (image id, category id, [x, y, w, h], iscrowd); areas below 32², between 32² and 96², above 96²
SYNTHETIC = [
    (1, 1, [10, 10, 20, 20], 0),
    (1, 1, [50, 40, 60, 50], 0),
    (1, 5, [100, 100, 150, 120], 0),
    (1, 9, [5, 150, 30, 30], 0),
    (2, 5, [20, 20, 25, 25], 0),
    (2, 9, [60, 60, 120, 110], 0),
    (2, 1, [0, 0, 200, 60], 1),
    (3, 9, [10, 10, 40, 40], 0),
    (3, 9, [70, 20, 15, 15], 0),
    (3, 5, [100, 120, 80, 60], 0),
    (3, 5, [0, 100, 90, 90], 1),
]


def load_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def gt_results(coco: COCO, score: float = 1.0, category_ids=None) -> list[dict]:
    """The non-crowd ground truth (optionally of some categories only) as detections."""
    return [
        {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": list(ann["bbox"]), "score": score}
        for ann in coco.dataset["annotations"]
        if not ann["iscrowd"] and (category_ids is None or ann["category_id"] in category_ids)
    ]


def shrunk(results: list[dict], width_fraction: float) -> list[dict]:
    """Boxes narrowed to ``width_fraction`` of their width: IoU with the original = width_fraction."""
    return [{**r, "bbox": [r["bbox"][0], r["bbox"][1], r["bbox"][2] * width_fraction, r["bbox"][3]]} for r in results]


def jittered(coco: COCO, seed: int = 0) -> list[dict]:
    """Noisy boxes with random scores, false positives, and detections on crowd regions."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in coco.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        dx, dy, dw, dh = rng.uniform(-0.2, 0.2, size=4) * [w, h, w, h]
        box = [round(float(v), 2) for v in (x + dx, y + dy, w + dw, h + dh)]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": box,
                        "score": round(float(rng.uniform()), 4)})
    for image_id in coco.getImgIds():
        for _ in range(5):
            x, y = rng.uniform(0, 200, size=2)
            w, h = rng.uniform(5, 120, size=2)
            box = [round(float(v), 2) for v in (x, y, w, h)]
            results.append({"image_id": image_id, "category_id": int(rng.choice(coco.getCatIds())), "bbox": box,
                            "score": round(float(rng.uniform()), 4)})
    return results


def per_class_numbers(metrics) -> list[float]:
    return [value for _, ap, ap50 in metrics.per_class for value in (ap, ap50)]


@pytest.fixture(scope="module")
def sample() -> COCO:
    return load_coco(SAMPLE)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> COCO:
    annotations = [
        {"id": index, "image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in (x, y, w, h)],
         "area": float(w * h), "iscrowd": iscrowd, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}
        for index, (image_id, category_id, (x, y, w, h), iscrowd) in enumerate(SYNTHETIC, start=1)
    ]
    image_ids = sorted({image_id for image_id, *_ in SYNTHETIC})
    dataset = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 256, "height": 256} for i in image_ids],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "bolt"}, {"id": 5, "name": "nut"}, {"id": 9, "name": "washer"}],
    }
    path = tmp_path_factory.mktemp("synthetic") / "instances.json"
    path.write_text(json.dumps(dataset))
    return load_coco(path)


# Sample image: 2 cats, 2 remotes (medium), couch, bed; no small boxes, so APs = ARs = -1.
# AR1 = 0.75: one detection per category finds 1 of 2 cats, 1 of 2 remotes, the couch and the bed.
FALSE_POSITIVE = {"image_id": SAMPLE_IMAGE, "category_id": CAT, "bbox": [600.0, 400.0, 30.0, 30.0], "score": 1.0}
SAMPLE_CASES = {
    "ground_truth": (lambda gt: gt_results(gt), {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "APs": -1.0, "AR1": 0.75}),
    # remotes and couch found, cats and bed missed: half of the four categories
    "partial": (lambda gt: gt_results(gt, category_ids={REMOTE, COUCH}),
                {"AP": 0.5, "APm": 1.0, "APl": 1 / 3, "AR100": 0.5}),
    # IoU 0.72 matches at thresholds 0.50 ... 0.70: 5 of 10
    "iou_0.72": (lambda gt: shrunk(gt_results(gt), 0.72), {"AP": 0.5, "AP50": 1.0, "AP75": 0.0, "AR100": 0.5}),
    # a false cat ranked first: cat precision 2/3 at every recall, the other three categories 1
    "false_positive_first": (lambda gt: [FALSE_POSITIVE] + gt_results(gt, score=0.9),
                             {"AP": 11 / 12, "AP50": 11 / 12, "AR100": 1.0}),
    "empty": (lambda gt: [], {"AP": 0.0, "AP50": 0.0, "APs": -1.0, "APm": 0.0, "AR100": 0.0, "ARl": 0.0}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_known_numbers_on_the_sample(sample, case, backend):
    make_results, expected = SAMPLE_CASES[case]
    metrics = evaluate(sample, make_results(sample), backend=backend)
    assert list(metrics.stats) == list(STAT_NAMES)
    assert {name: metrics.stats[name] for name in expected} == pytest.approx(expected, abs=TOLERANCE)
    lines = metrics.summary.splitlines()
    assert len(lines) == 12 and lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")


def test_evaluate_leaves_results_untouched(sample):
    results = gt_results(sample)
    before = json.dumps(results)
    evaluate(sample, results)
    assert json.dumps(results) == before


@pytest.mark.parametrize(
    "dataset, make_results, image_ids",
    [
        ("sample", lambda gt: shrunk(gt_results(gt), 0.8), None),
        ("sample", lambda gt: [FALSE_POSITIVE] + jittered(gt), None),
        ("synthetic", gt_results, None),
        ("synthetic", jittered, None),
        ("synthetic", lambda gt: jittered(gt, seed=1), [1, 3]),
        ("synthetic", lambda gt: [], None),
    ],
)
def test_backends_agree(request, dataset, make_results, image_ids):
    gt = request.getfixturevalue(dataset)
    reference, faster = (evaluate(gt, make_results(gt), backend, image_ids) for backend in BACKENDS)
    assert faster.stats == pytest.approx(reference.stats, abs=TOLERANCE)
    assert [name for name, _, _ in faster.per_class] == [name for name, _, _ in reference.per_class]
    assert per_class_numbers(faster) == pytest.approx(per_class_numbers(reference), abs=TOLERANCE)
    assert faster.summary == reference.summary


def test_synthetic_area_ranges_and_crowds(synthetic):
    metrics = evaluate(synthetic, gt_results(synthetic))
    perfect = ("AP", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl")
    assert [metrics.stats[name] for name in perfect] == pytest.approx([1.0] * len(perfect), abs=TOLERANCE)
    # detections on crowd regions are ignored, not false positives
    crowds = [{**r, "score": 0.99} for r in gt_results(synthetic)]
    crowds += [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in synthetic.dataset["annotations"] if a["iscrowd"]]
    assert evaluate(synthetic, crowds).stats["AP"] == pytest.approx(1.0, abs=TOLERANCE)


def test_image_ids_restrict_evaluation(synthetic):
    only_image_1 = [r for r in gt_results(synthetic) if r["image_id"] == 1]
    assert evaluate(synthetic, only_image_1).stats["AP"] < 1.0
    assert evaluate(synthetic, only_image_1, image_ids=[1]).stats["AP"] == pytest.approx(1.0, abs=TOLERANCE)
    with pytest.raises(ValueError, match=r"image_ids not in the ground truth: \[7\]"):
        evaluate(synthetic, only_image_1, image_ids=[1, 7])


def test_results_outside_the_ground_truth_are_rejected(sample):
    with pytest.raises(ValueError, match=r"results refer to image ids not in the ground truth: \[1\]"):
        evaluate(sample, [{**gt_results(sample)[0], "image_id": 1}])
    with pytest.raises(ValueError, match=r"results use category ids not in the ground truth: \[0\]"):
        evaluate(sample, [{**gt_results(sample)[0], "category_id": 0}])


def test_per_class(sample):
    metrics = evaluate(sample, gt_results(sample, category_ids={REMOTE}))
    per_class = {name: (ap, ap50) for name, ap, ap50 in metrics.per_class}
    assert len(per_class) == 80
    assert per_class["remote"] == (1.0, 1.0)
    assert per_class["cat"] == per_class["bed"] == (0.0, 0.0)
    assert per_class["person"] == (-1.0, -1.0)
    rows = {line.split("|")[1].strip(): line for line in metrics.per_class_table().splitlines()}
    assert "no GT" in rows["person"] and "1.000" in rows["remote"] and "0.000" in rows["cat"]
    assert len({len(line) for line in rows.values()}) == 1  # aligned
    as_json = json.loads(json.dumps(metrics.to_json()))
    assert as_json["stats"] == metrics.stats and as_json["summary"] == metrics.summary
    assert {row["class"]: row["AP"] for row in as_json["per_class"]}["remote"] == 1.0


def test_to_coco_results_round_trip(sample):
    anns = sample.dataset["annotations"]
    label_to_category = {1: CAT, 2: COUCH, 3: BED, 4: REMOTE}
    category_to_label = {c: label for label, c in label_to_category.items()}
    detection = {
        "boxes": box_convert(torch.tensor([a["bbox"] for a in anns]), "xywh", "xyxy"),
        "scores": torch.linspace(1.0, 0.5, len(anns)),
        "labels": torch.tensor([category_to_label[a["category_id"]] for a in anns]),
    }
    results = to_coco_results([detection], [SAMPLE_IMAGE], label_to_category)
    assert [r["bbox"] for r in results] == [a["bbox"] for a in anns]
    assert [r["category_id"] for r in results] == [a["category_id"] for a in anns]
    assert {r["image_id"] for r in results} == {SAMPLE_IMAGE}
    assert [r["score"] for r in results] == pytest.approx(detection["scores"].tolist())
    assert evaluate(sample, results).stats["AP"] == 1.0


def test_to_coco_results_drops_labels_without_a_category_and_checks_lengths():
    detection = {"boxes": torch.zeros(2, 4), "scores": torch.ones(2), "labels": torch.tensor([1, 0])}
    assert [r["category_id"] for r in to_coco_results([detection], [5], {1: 17})] == [17]
    with pytest.raises(ValueError, match="1 detections for 2 image ids"):
        to_coco_results([detection], [5, 6], {0: 1, 1: 17})


def test_save_and_load_results(sample, tmp_path):
    path = tmp_path / "out" / "detections.json"
    save_results(gt_results(sample), path)
    assert load_results(path) == gt_results(sample)
    assert [p.name for p in path.parent.iterdir()] == ["detections.json"]  # no temp file left


@pytest.mark.parametrize(
    "content, error, message",
    [
        (None, FileNotFoundError, "results file not found"),
        ("[{", ValueError, "malformed JSON"),
        ('{"image_id": 1}', ValueError, "expected a JSON list of results, got dict"),
        ('[{"image_id": 1, "category_id": 2, "score": 0.5}]', ValueError, "entry 0 is not a dict with"),
        ('[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3], "score": 0.5}]', ValueError,
         r"entry 0: bbox \[1, 2, 3\] is not \[x, y, w, h\]"),
        ("[3]", ValueError, "entry 0 is not"),
    ],
)
def test_load_results_errors(tmp_path, content, error, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message) as raised:
        load_results(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_backend_errors(sample, monkeypatch):
    with pytest.raises(ValueError, match="Available: pycocotools, faster_coco_eval"):
        evaluate(sample, [], backend="detectron2")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now fails
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        evaluate(sample, [], backend="faster_coco_eval")


ENTRY = {"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"score": float("nan")}, "score nan is not a finite number"),
        ({"score": float("inf")}, "score inf is not a finite number"),
        ({"score": "0.5"}, "score '0.5' is not a finite number"),
        ({"bbox": [1.0, 2.0, float("inf"), 4.0]}, r"bbox \[1.0, 2.0, inf, 4.0\] is not \[x, y, w, h\]"),
        ({"bbox": [float("nan"), 2.0, 3.0, 4.0]}, r"bbox \[nan, 2.0, 3.0, 4.0\] is not"),
        ({"bbox": [1.0, 2.0, -3.0, 4.0]}, r"bbox \[1.0, 2.0, -3.0, 4.0\] is not \[x, y, w, h\] .* w, h >= 0"),
        ({"bbox": ["1", 2.0, 3.0, 4.0]}, r"bbox \['1', 2.0, 3.0, 4.0\] is not"),
        ({"bbox": "1 2 3 4"}, r"bbox '1 2 3 4' is not"),
        ({"image_id": "1"}, "image_id '1' is not an integer"),
        ({"category_id": 2.5}, "category_id 2.5 is not an integer"),
        ({"category_id": True}, "category_id True is not an integer"),
    ],
)
def test_load_results_rejects_bad_values_with_the_entry_index(tmp_path, change, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([ENTRY, ENTRY, {**ENTRY, **change}]))  # json writes nan/inf as NaN/Infinity
    with pytest.raises(ValueError, match=message) as raised:
        load_results(path)
    assert str(raised.value).startswith(f"{path}: entry 2: ") and "\n" not in str(raised.value)
