"""Pascal VOC's mAP@0.5: hand-computed cases, and the independent mean-average-precision package."""
import numpy as np
import pytest

from heads.detection.coco import coco_index
from heads.detection.evaluate import evaluate, voc_ap, voc_evaluate


def ground_truth(boxes, categories=("aeroplane", "bicycle", "bird"), num_images=2):
    """A COCO index of ``boxes``: ``(image_id, category_id, [x, y, w, h], difficult)``."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(1, num_images + 1)]
    annotations = [{"id": k, "image_id": image, "category_id": category, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": difficult} for k, (image, category, box, difficult) in enumerate(boxes, start=1)]
    return coco_index({"images": images, "annotations": annotations,
                       "categories": [{"id": k, "name": name} for k, name in enumerate(categories, start=1)]})


def results(detections):
    """COCO results of ``(image_id, category_id, [x, y, w, h], score)``."""
    return [{"image_id": image, "category_id": category, "bbox": box, "score": score}
            for image, category, box, score in detections]


# aeroplane (1): image 1 holds A and a difficult D, image 2 holds B and C; 3 positives.
# bicycle (2): only a difficult box, so no positives: not measured. bird (3): one box, never detected.
HAND_TRUTH = [(1, 1, [0, 0, 10, 10], 0), (1, 1, [20, 0, 10, 10], 1), (2, 1, [0, 0, 10, 10], 0),
              (2, 1, [30, 30, 10, 10], 0), (1, 2, [40, 40, 10, 10], 1), (2, 3, [60, 60, 10, 10], 0)]
HAND_DETECTIONS = [
    (1, 1, [0, 0, 10, 10], 0.9),    # A: hit
    (1, 1, [20, 0, 10, 10], 0.8),   # D, difficult: neither hit nor miss
    (1, 1, [1, 0, 10, 10], 0.7),    # A again (IoU 90 / 110 = 0.82), taken: false positive
    (2, 1, [50, 50, 10, 10], 0.6),  # nothing there: false positive
    (2, 1, [0, 0, 10, 10], 0.5),    # B: hit
    (2, 1, [30, 30, 10, 10], 0.4),  # C: hit
    (1, 2, [40, 40, 10, 10], 0.9),  # the difficult bicycle
]


def test_hand_computed_case():
    # aeroplane, counted detections in score order: hit, FP, FP, hit, hit
    #   precision 1/1, 1/2, 1/3, 2/4, 3/5;  recall 1/3, 1/3, 1/3, 2/3, 3/3
    # 11-point: t = 0, .1, .2, .3 -> max precision at recall >= t = 1 (4 points);
    #   t = .4, .5, .6 -> max(2/4, 3/5) = 0.6 (3 points); t = .7 ... 1 -> 3/5 = 0.6 (4 points)
    #   (4 * 1 + 7 * 0.6) / 11 = 8.2 / 11 = 0.745454...
    # all points: precision envelope 1 up to recall 1/3, then 0.6 up to 1:  1/3 * 1 + 2/3 * 0.6 = 0.733333...
    # bird: no detection, AP 0 (both kinds); bicycle: no non-difficult box, -1 and left out of the means
    metrics = voc_evaluate(ground_truth(HAND_TRUTH), results(HAND_DETECTIONS))
    expected = [("aeroplane", 8.2 / 11, 1 / 3 + 0.4), ("bicycle", -1, -1), ("bird", 0, 0)]
    assert [name for name, _, _ in metrics.per_class] == [name for name, _, _ in expected]
    np.testing.assert_allclose([row[1:] for row in metrics.per_class], [row[1:] for row in expected], rtol=1e-12)
    assert metrics.stats == pytest.approx({"voc07_mAP50": (8.2 / 11 + 0) / 2, "voc_mAP50": (11 / 15 + 0) / 2},
                                          rel=1e-12)


def test_difficult_boxes_are_neither_hits_nor_misses():
    truth = [box for box in HAND_TRUTH if box[:2] != (1, 1) or not box[3]]  # without the difficult aeroplane D
    # the detection on D now is a false positive: counted hit, FP, FP, FP, hit, hit
    #   precision 1, 1/2, 1/3, 1/4, 2/5, 3/6; recall 1/3 (4 times), 2/3, 1
    # 11-point: (4 * 1 + 7 * max(2/5, 3/6)) / 11 = 7.5 / 11; all points: 1/3 * 1 + 2/3 * 1/2 = 2/3
    aeroplane = voc_evaluate(ground_truth(truth), results(HAND_DETECTIONS)).per_class[0]
    assert aeroplane[1:] == pytest.approx((7.5 / 11, 2 / 3), rel=1e-12)
    # and a difficult box that nobody detects costs nothing: the same numbers as without it
    without = voc_evaluate(ground_truth(truth), results(HAND_DETECTIONS[:1] + HAND_DETECTIONS[2:]))
    with_difficult = voc_evaluate(ground_truth(HAND_TRUTH), results(HAND_DETECTIONS[:1] + HAND_DETECTIONS[2:]))
    assert with_difficult.per_class[0] == without.per_class[0]


def test_a_detection_whose_best_box_is_difficult_is_ignored_even_over_another_box():
    # image 1: Y [0, 0, 10, 10] and the difficult X [2, 0, 10, 10]; image 2: Z. Detections: Y (hit); X exactly
    # (IoU 1 with X, 80 / 120 with the taken Y): its best box is difficult, so neither; Z (hit). Precision 1, 1;
    # recall 1/2, 1: AP 1 both ways. (Matching it to Y, a duplicate, would give 0.848 and 0.833.)
    truth = ground_truth([(1, 1, [0, 0, 10, 10], 0), (1, 1, [2, 0, 10, 10], 1), (2, 1, [50, 50, 10, 10], 0)])
    detections = results([(1, 1, [0, 0, 10, 10], 0.9), (1, 1, [2, 0, 10, 10], 0.8), (2, 1, [50, 50, 10, 10], 0.7)])
    assert voc_evaluate(truth, detections).per_class[0][1:] == (1.0, 1.0)


def test_eleven_point_thresholds_are_exact_tenths():
    # 10 positives, 3 hits then a false positive: recall 0.1, 0.2, 0.3, 0.3; precision 1, 1, 1, 3/4.
    # recall 3/10 reaches the threshold 0.3, so t = 0, .1, .2, .3 take precision 1: 4 / 11. (np.arange(0, 1.1, 0.1)
    # gives 0.30000000000000004 as its fourth threshold, which 3/10 misses: 3 / 11.)
    recall, precision = np.array([1, 2, 3, 3]) / 10, np.array([1, 1, 1, 0.75])
    assert voc_ap(recall, precision, eleven_point=True) == pytest.approx(4 / 11, rel=1e-12)
    # all points: 0.3 * 1 + 0.7 * 0 (nothing found past recall 0.3)
    assert voc_ap(recall, precision) == pytest.approx(0.3, rel=1e-12)
    assert voc_ap(np.array([]), np.array([])) == 0 == voc_ap(np.array([]), np.array([]), eleven_point=True)


def test_duplicates_and_misses_need_an_overlap_over_one_half():
    # a detection overlapping its box exactly one half is a miss (the devkit's test is ov > 0.5): [0, 0, 10, 10]
    # against [0, 0, 10, 5] overlaps 50 / 100. Counted: FP, hit; precision 0, 1/2; recall 0, 1.
    # 11-point: every t takes 1/2: 0.5; all points: 1 * 1/2
    truth = ground_truth([(1, 1, [0, 0, 10, 5], 0)], num_images=1)
    detections = results([(1, 1, [0, 0, 10, 10], 0.9), (1, 1, [0, 0, 10, 5], 0.8)])
    assert voc_evaluate(truth, detections).per_class[0][1:] == pytest.approx((0.5, 0.5), rel=1e-12)


def test_evaluate_reports_voc_beside_coco():
    truth, detected = ground_truth(HAND_TRUTH), results(HAND_DETECTIONS)
    metrics = evaluate(truth, detected, voc=True)
    assert metrics.stats["voc07_mAP50"] == pytest.approx((8.2 / 11) / 2, rel=1e-12)
    assert metrics.stats["AP50"] == evaluate(truth, detected).stats["AP50"]
    assert "Pascal VOC mAP @[ IoU>0.50 |  11-point ] = 0.373" in metrics.summary
    assert "Pascal VOC mAP @[ IoU>0.50 | all-point ] = 0.367" in metrics.summary
    table = metrics.per_class_table().splitlines()
    assert table[0].split() == ["|", "class", "|", "AP", "|", "AP50", "|", "VOC07", "|", "VOC", "|"]
    assert table[2].endswith("|  0.745 |  0.733 |") and "no GT" in table[3]
    row = metrics.to_json()["per_class"][0]
    assert row["voc07_AP50"] == pytest.approx(8.2 / 11) and row["voc_AP50"] == pytest.approx(11 / 15)
    assert "voc07_mAP50" not in evaluate(truth, detected).stats


# ---- against the mean-average-precision package (PyPI; the dev extra)


def random_case(rng, num_images=12, num_classes=3, difficult_fraction=0.0):
    """Integer boxes (exact overlaps, no ties at the 0.5 threshold by rounding) and unique scores."""
    truth, detections = [], []
    for image in range(1, num_images + 1):
        for _ in range(rng.integers(0, 6)):
            x, y, w, h = rng.integers(0, 60, size=2).tolist() + rng.integers(5, 40, size=2).tolist()
            category = int(rng.integers(1, num_classes + 1))
            truth.append((image, category, [x, y, w, h], int(rng.random() < difficult_fraction)))
            for _ in range(rng.integers(0, 3)):  # near it (IoU mostly over 0.5), sometimes off it
                shift = [int(rng.integers(-side // 5, side // 5 + 1)) for side in (w, h)]
                resize = rng.integers(-3, 4, size=2).tolist()
                detections.append([image, category, [x + shift[0], y + shift[1], w + resize[0], h + resize[1]]])
        for _ in range(rng.integers(0, 3)):  # anywhere
            detections.append([image, int(rng.integers(1, num_classes + 1)),
                               rng.integers(0, 60, size=2).tolist() + rng.integers(5, 40, size=2).tolist()])
    scores = rng.permutation(len(detections)) / len(detections) + 0.001
    return truth, [(*d, float(s)) for d, s in zip(detections, scores)]


def package_metric(truth, detections, num_images, num_classes):
    """The package's metric, fed VOC's inclusive pixel boxes (its width is xmax - xmin + 1): [x, y, w, h] is xmin =
    x + 1 .. xmax = x + w, as VOC boxes are read here. Its class ids count from 0."""
    from mean_average_precision import MetricBuilder

    metric = MetricBuilder.build_evaluation_metric("map_2d", async_mode=False, num_classes=num_classes)
    for image in range(1, num_images + 1):
        gt = [[x + 1, y + 1, x + w, y + h, category - 1, difficult, 0]
              for i, category, (x, y, w, h), difficult in truth if i == image]
        predicted = [[x + 1, y + 1, x + w, y + h, category - 1, score]
                     for i, category, (x, y, w, h), score in detections if i == image]
        metric.add(np.array(predicted, dtype=float).reshape(-1, 6), np.array(gt, dtype=float).reshape(-1, 7))
    return metric


@pytest.mark.parametrize("seed", range(4))
def test_matches_mean_average_precision_without_difficult(seed):
    rng = np.random.default_rng(seed)
    truth, detections = random_case(rng)
    package = package_metric(truth, detections, 12, 3)
    eleven = package.value(iou_thresholds=0.5, recall_thresholds=np.arange(11) / 10, mpolicy="greedy")[0.5]
    area = package.value(iou_thresholds=0.5, mpolicy="greedy")[0.5]
    ours = voc_evaluate(ground_truth(truth, num_images=12), results(detections)).per_class
    measured = [k for k, (_, _, ap) in enumerate(ours) if ap >= 0]
    assert len(measured) == 3
    for k in measured:
        assert ours[k][1:] == pytest.approx((eleven[k]["ap"], area[k]["ap"]), abs=1e-6)  # the package's float32


@pytest.mark.parametrize("seed", range(4))
def test_matches_mean_average_precision_with_difficult(seed):
    """The package ignores detections whose best box is difficult, as the devkit does, with two differences worked
    around here. Its recall divides by all boxes, difficult ones too: its recall is rescaled to the devkit's
    (non-difficult boxes) before its own AP functions integrate the curve. And it pairs the difficult flags with the
    wrong boxes when an image holds several detections and several boxes of a class (``compute_match_table``'s
    ``_tile`` repeats where it should tile, in 2024.1.5.0): each image keeps one detection per class here (duplicates
    are compared without difficult boxes above)."""
    from mean_average_precision.utils import (
        compute_average_precision,
        compute_average_precision_with_recall_thresholds,
    )

    rng = np.random.default_rng(100 + seed)
    truth, detections = random_case(rng, difficult_fraction=0.3)
    first = {}
    for detection in detections:
        first.setdefault(tuple(detection[:2]), detection)
    detections = list(first.values())
    package = package_metric(truth, detections, 12, 3).value(iou_thresholds=0.5, mpolicy="greedy")[0.5]
    ours = voc_evaluate(ground_truth(truth, num_images=12), results(detections)).per_class
    checked = 0
    for k, (_, ap07, ap) in enumerate(ours):
        boxes = [box for box in truth if box[1] == k + 1]
        positives = sum(not box[3] for box in boxes)
        if positives == 0:
            assert ap == ap07 == -1
            continue
        precision, recall = package[k]["precision"], package[k]["recall"]
        recall = np.round(recall * len(boxes)) / positives  # hits / non-difficult boxes
        assert (ap07, ap) == pytest.approx(
            (compute_average_precision_with_recall_thresholds(precision, recall, np.arange(11) / 10),
             compute_average_precision(precision, recall)), abs=1e-12)
        checked += 1
    assert checked >= 2
    not_difficult = ground_truth([(*box[:3], 0) for box in truth], num_images=12)
    assert voc_evaluate(not_difficult, results(detections)).per_class != ours  # the difficult boxes count
