"""Box evaluation: detections to the COCO results format, results files, COCOeval metrics, Pascal VOC's mAP@0.5,
and the loop that scores a model on a dataset.

Two backends give the same 12 COCO numbers, up to float64 rounding: ``pycocotools`` (the reference) and
``faster_coco_eval`` (a C++ port: ``pip install faster-coco-eval``, or the project's ``fast`` extra).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou
from tqdm import tqdm

from ..data import DataError, unwrap_worker_errors
from ..files import atomic_write
from .coco import _is_int, _is_number, _is_xywh, collate_detection

_logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("pycocotools", "faster_coco_eval")
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")
_BOX_DECIMALS = 2  # COCO annotations carry 0.01 px
_SCORE_DECIMALS = 6  # keeps the float32 ranking: fewer ties than the model produced would change AP


@dataclass
class VocMetrics:
    """Pascal VOC's AP@0.5 per class with GT, 11-point (VOC2007) and area under the whole curve (VOC2010 on), and
    their means. -1 where nothing can be measured: a class without non-difficult GT, a mean without such classes."""

    per_class: list[tuple[str, float, float]]  # name, 11-point AP, all-point AP

    @property
    def stats(self) -> dict[str, float]:
        """``voc07_mAP50`` (11-point) and ``voc_mAP50`` (all points), averaged over the classes with GT."""
        measured = np.array([(ap07, ap) for _, ap07, ap in self.per_class if ap >= 0]).reshape(-1, 2)
        means = measured.mean(axis=0).tolist() if len(measured) else [-1.0, -1.0]
        return dict(zip(VOC_STAT_NAMES, means))

    @property
    def summary(self) -> str:
        """The two means, one line each, as COCOeval prints its numbers."""
        return "\n".join(f" Pascal VOC mAP @[ IoU>0.50 | {kind:>9} ] = {value:0.3f}"
                         for kind, value in zip(("11-point", "all-point"), self.stats.values()))


VOC_STAT_NAMES = ("voc07_mAP50", "voc_mAP50")


@dataclass
class CocoMetrics:
    """COCOeval's 12 summary numbers, its printed table, and (name, AP, AP50) per GT category; for VOC data also
    ``voc``, whose means join ``stats`` and whose lines join ``summary``.

    As in COCOeval, a number is -1 when there is nothing to measure it on: ``APs`` without small
    GT boxes, or a category's AP when the evaluated images hold no GT box of that category.
    """

    stats: dict[str, float]
    summary: str
    per_class: list[tuple[str, float, float]]
    voc: VocMetrics | None = None

    def per_class_table(self) -> str:
        """One aligned row per category (with VOC's 11-point and all-point AP50 for VOC data); classes without GT
        read 'no GT'."""
        voc = self.voc.per_class if self.voc is not None else [()] * len(self.per_class)
        columns = ["AP", "AP50"] + (["VOC07", "VOC"] if self.voc is not None else [])
        width = max([len("class")] + [len(name) for name, _, _ in self.per_class])
        rows = [f"| {'class':<{width}} |" + "".join(f" {column:>6} |" for column in columns),
                f"|{'-' * (width + 2)}|" + "--------|" * len(columns)]
        rows += [f"| {name:<{width}} |" + "".join(f" {_format_ap(value)} |" for value in (ap, ap50, *voc_row[1:]))
                 for (name, ap, ap50), voc_row in zip(self.per_class, voc)]
        return "\n".join(rows)

    def to_json(self) -> dict:
        """A JSON-serialisable dict of everything above."""
        per_class = [{"class": name, "AP": ap, "AP50": ap50} for name, ap, ap50 in self.per_class]
        for row, voc_row in zip(per_class, self.voc.per_class if self.voc is not None else []):
            row.update(voc07_AP50=voc_row[1], voc_AP50=voc_row[2])
        return {"stats": dict(self.stats), "per_class": per_class, "summary": self.summary}


def _format_ap(value: float) -> str:
    return f"{'no GT' if value < 0 else f'{value:.3f}':>6}"


def to_coco_results(
    detections: Sequence[Mapping[str, Tensor]], image_ids: Sequence[int], label_to_category: Mapping[int, int]
) -> list[dict]:
    """COCO results entries from torchvision-style detections (xyxy boxes in original pixels).

    ``label_to_category`` maps the model's labels to COCO category ids; detections with a label it
    lacks (the background, or an unused id of torchvision's 91-class space) are dropped.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"to_coco_results: {len(detections)} detections for {len(image_ids)} image ids")
    results = []
    for detection, image_id in zip(detections, image_ids):
        labels = detection["labels"].tolist()
        boxes = box_convert(detection["boxes"].detach().cpu().double(), "xyxy", "xywh").round(decimals=_BOX_DECIMALS)
        scores = detection["scores"].detach().cpu().double().round(decimals=_SCORE_DECIMALS)
        results += [
            {"image_id": image_id if isinstance(image_id, str) else int(image_id),
             "category_id": label_to_category[label], "bbox": box, "score": score}
            for label, box, score in zip(labels, boxes.tolist(), scores.tolist()) if label in label_to_category
        ]
    return results


def save_results(results: list[dict], path: str | os.PathLike) -> None:
    """Write a results JSON (the test-dev submission format) atomically: temp file, then rename."""
    with atomic_write(path, "w") as file:
        json.dump(results, file, separators=(",", ":"))


def load_results(path: str | os.PathLike) -> list[dict]:
    """Read a results JSON: a list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``; an entry with
    a missing key, a non-integer id, or a NaN, infinite, negative-size or non-numeric box or score is refused with
    its index, in one line (a ``DataError``)."""
    try:
        with open(path) as file:
            results = json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: malformed JSON: {error}") from None
    if not isinstance(results, list):
        raise DataError(f"{path}: expected a JSON list of results, got {type(results).__name__}")
    for index, entry in enumerate(results):
        if not (isinstance(entry, dict) and all(key in entry for key in RESULT_KEYS)):
            raise DataError(f"{path}: entry {index} is not a dict with {', '.join(RESULT_KEYS)} (bbox = [x, y, w, h])")
        problem = _result_problem(entry)
        if problem:
            raise DataError(f"{path}: entry {index}: {problem}")
    return results


def _result_problem(entry: dict) -> str | None:
    """What is wrong with the values of a results entry that has all of ``RESULT_KEYS``, or None."""
    for key in ("image_id", "category_id"):
        if not _is_int(entry[key]):
            return f"{key} {entry[key]!r} is not an integer"
    bbox = entry["bbox"]
    if not _is_xywh(bbox):
        return f"bbox {bbox!r} is not [x, y, w, h] of finite numbers with w, h >= 0"
    if not _is_number(entry["score"]):
        return f"score {entry['score']!r} is not a finite number"
    return None


def evaluate(
    coco_gt, results: list[dict], backend: str = "pycocotools", image_ids: Iterable[int] | None = None,
    voc: bool = False,
) -> CocoMetrics:
    """Run COCOeval ``"bbox"`` on ``results`` against ``coco_gt`` (a ``pycocotools.coco.COCO``); with ``voc``, also
    Pascal VOC's mAP@0.5 (:func:`voc_evaluate`, ``coco_gt``'s crowd regions being VOC's difficult objects).

    ``image_ids`` restricts evaluation to those images (when only part of a split was run). Empty
    ``results`` are evaluated as "no detections" rather than failing in ``loadRes``: AP/AR are then
    0, or -1 where the ground truth has nothing to measure (as COCOeval reports any run).
    Nothing is printed; the summary table is returned in ``CocoMetrics.summary``.
    """
    ground_truth, make_eval = _backend(backend, coco_gt)
    _check_known((result["image_id"] for result in results), coco_gt.getImgIds(), "results refer to image ids")
    _check_known((result["category_id"] for result in results), coco_gt.getCatIds(), "results use category ids")
    with contextlib.redirect_stdout(io.StringIO()):
        cocoeval = make_eval(ground_truth, _load_detections(ground_truth, results), "bbox")
        if image_ids is not None:
            cocoeval.params.imgIds = _image_ids(image_ids, coco_gt)
        cocoeval.evaluate()
        cocoeval.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        cocoeval.summarize()
    summary = "\n".join(printed.getvalue().splitlines()[: len(STAT_NAMES)])  # faster_coco_eval adds AR50, AR75
    stats = {name: float(value) for name, value in zip(STAT_NAMES, cocoeval.stats)}
    voc_metrics = voc_evaluate(coco_gt, results, cocoeval.params.imgIds) if voc else None
    if voc_metrics is not None:
        stats.update(voc_metrics.stats)
        summary += "\n" + voc_metrics.summary
    return CocoMetrics(stats=stats, summary=summary, per_class=_per_class(cocoeval, coco_gt), voc=voc_metrics)


def voc_evaluate(coco_gt, results: list[dict], image_ids: Iterable[int] | None = None,
                 iou_threshold: float = 0.5) -> VocMetrics:
    """Pascal VOC's AP per category of ``coco_gt`` (its crowd regions being VOC's difficult objects) for COCO
    ``results`` on ``image_ids`` (default: all), as the devkit's ``VOCevaldet`` / ``voc_eval`` score them.

    Per class, detections in descending score order (ties: in the order given) each take the GT box of their image
    that overlaps them most. Overlapping it more than ``iou_threshold``, a detection is a hit if that box is not
    difficult and not yet taken, a false positive (a duplicate) if taken, and neither if it is difficult; otherwise a
    false positive. Recall counts the non-difficult boxes. AP: the 11-point mean of the best precision at recall
    >= k / 10, k = 0..10 (the Python ports' ``np.arange(0, 1.1, 0.1)`` rounds 0.3, 0.6 and 0.7 one step up, so that a
    recall of exactly 3/10 misses its point there), and the area under the precision envelope (all points). Boxes are
    continuous ``[x, y, w, h]``: VOC's ``+ 1`` pixel convention on 1-based boxes gives the same overlaps (its box
    ``xmin..xmax`` is ``[xmin - 1, xmax)`` here).
    """
    image_ids = set(coco_gt.getImgIds() if image_ids is None else image_ids)
    per_class = []
    for category_id in sorted(coco_gt.cats):
        truth = {image_id: [a for a in coco_gt.imgToAnns[image_id] if a["category_id"] == category_id]
                 for image_id in image_ids}
        detections = [r for r in results if r["category_id"] == category_id and r["image_id"] in image_ids]
        positives = sum(not a.get("iscrowd", 0) for boxes in truth.values() for a in boxes)
        if positives == 0:
            per_class.append((coco_gt.cats[category_id]["name"], -1.0, -1.0))
            continue
        hits = _voc_matches(detections, truth, iou_threshold)
        counted = ~np.isnan(hits)
        true_positives = np.cumsum(hits[counted] == 1)
        recall = true_positives / positives
        precision = true_positives / np.arange(1, counted.sum() + 1)
        per_class.append((coco_gt.cats[category_id]["name"], voc_ap(recall, precision, eleven_point=True),
                          voc_ap(recall, precision)))
    return VocMetrics(per_class)


def _voc_matches(detections: list[dict], truth: dict[int, list[dict]], iou_threshold: float) -> np.ndarray:
    """Per detection, in descending score order: 1 (hit), 0 (false positive) or NaN (matched a difficult box).
    Matches in one image do not depend on other images: each image's detections are matched in one go."""
    order = np.argsort([-d["score"] for d in detections], kind="stable")
    positions = {}
    for position, index in enumerate(order):
        positions.setdefault(detections[index]["image_id"], []).append(position)
    hits = np.zeros(len(detections))
    for image_id, ranked in positions.items():
        anns = truth[image_id]
        if not anns:
            continue
        boxes = [detections[order[position]]["bbox"] for position in ranked]
        overlaps = box_iou(*(box_convert(torch.tensor(b, dtype=torch.float64), "xywh", "xyxy")
                             for b in (boxes, [a["bbox"] for a in anns]))).numpy()
        best = overlaps.argmax(axis=1)  # the first of equal overlaps, as the devkit's
        best_overlap = overlaps[np.arange(len(best)), best]
        taken = [False] * len(anns)
        for position, overlap, box in zip(ranked, best_overlap.tolist(), best.tolist()):
            if overlap <= iou_threshold:
                continue
            if anns[box].get("iscrowd", 0):
                hits[position] = np.nan
            elif not taken[box]:
                hits[position], taken[box] = 1, True
    return hits


def voc_ap(recall: np.ndarray, precision: np.ndarray, eleven_point: bool = False) -> float:
    """VOC's average precision of a ranked list's ``recall`` and ``precision`` after each counted detection:
    11-point (VOC2007) or the area under the precision envelope (VOC2010 on); 0 for an empty list."""
    if eleven_point:
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.arange(11) / 10]))
    recall = np.concatenate(([0.0], recall, [1.0]))
    envelope = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def _backend(backend: str, coco_gt):
    """The ground truth object and COCOeval constructor that ``backend`` evaluates with."""
    if backend == "pycocotools":
        return coco_gt, COCOeval
    if backend != "faster_coco_eval":
        raise ValueError(f"Unknown COCO evaluation backend '{backend}'. Available: {', '.join(BACKENDS)}")
    try:
        import faster_coco_eval
    except ImportError:
        raise ImportError(
            "backend 'faster_coco_eval' needs the faster-coco-eval package: "
            "pip install faster-coco-eval (or the project's extra: pip install 'mbbackbones[fast]')"
        ) from None
    # faster_coco_eval annotates GT dicts in place: give it copies, not the caller's
    dataset = {**coco_gt.dataset, "annotations": [dict(ann) for ann in coco_gt.dataset.get("annotations", [])]}
    return faster_coco_eval.COCO(dataset), functools.partial(faster_coco_eval.COCOeval_faster, print_function=print)


def _load_detections(ground_truth, results: list[dict]):
    """``loadRes`` on copies (it adds keys to each entry); an empty detection set for ``[]``."""
    if results:
        return ground_truth.loadRes([dict(result) for result in results])
    detections = type(ground_truth)()
    detections.dataset = {
        "images": ground_truth.dataset["images"],
        "categories": ground_truth.dataset["categories"],
        "annotations": [],
    }
    detections.createIndex()
    return detections


def _image_ids(image_ids: Iterable[int], coco_gt) -> list[int]:
    ids = sorted({int(image_id) for image_id in image_ids})
    if not ids:
        raise ValueError("evaluate: image_ids is empty, nothing to evaluate")
    _check_known(ids, coco_gt.getImgIds(), "image_ids")
    return ids


def _check_known(ids: Iterable[int], known: Iterable[int], what: str) -> None:
    unknown = sorted(set(ids) - set(known))
    if unknown:
        raise DataError(f"{what} not in the ground truth: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")


def _per_class(cocoeval, coco_gt) -> list[tuple[str, float, float]]:
    """(name, AP, AP50) per category, averaged from ``eval["precision"]`` as COCOeval's summary does."""
    params = cocoeval.params
    # precision: [IoU thresholds, recall points, categories, area ranges, max detections]
    precision = cocoeval.eval["precision"][:, :, :, params.areaRngLbl.index("all"), -1]
    iou50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    return [
        (coco_gt.cats[category_id]["name"], _mean_valid(precision[:, :, k]), _mean_valid(precision[iou50, :, k]))
        for k, category_id in enumerate(params.catIds)
    ]


def _mean_valid(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


class _WithoutReplacement(torch.utils.data.Dataset):
    """The samples ``indices`` of a ``CocoDetection``; an image it skips as unreadable (``skip_corrupt``) gives
    ``(None, {"image_id": id})`` instead of the next readable image, whose detections would be scored under the
    skipped image's id."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        sample = self.dataset.get(index)
        return sample if sample is not None else (None, {"image_id": self.dataset.image_ids[index]})


@torch.no_grad()
def predict_detections(model: nn.Module, dataset, batch_size: int, device, indices=None, workers: int = 0):
    """Detections (torchvision format, original pixels) and image ids for the items ``indices`` (all by default)
    of a ``CocoDetection`` dataset. ``model`` is a PyTorch detector, run on the dataset's decoded images as in
    training, or a backend adapter with ``predictions(paths)`` (an exported file's Predictor), which reads the image
    files itself.

    Images the dataset skips as unreadable (``skip_corrupt``) are left out of both lists, with a warning that
    counts them; evaluate on the returned image ids.
    """
    indices = range(len(dataset)) if indices is None else indices
    if hasattr(model, "predictions"):
        paths = dataset.image_paths()
        return list(model.predictions([paths[i] for i in indices])), [dataset.image_ids[i] for i in indices]
    model.eval()
    loader = torch.utils.data.DataLoader(_WithoutReplacement(dataset, indices), batch_size, num_workers=workers,
                                         collate_fn=collate_detection)
    detections, image_ids, skipped = [], [], []
    with torch.no_grad():
        for images, targets in tqdm(unwrap_worker_errors(loader), total=len(loader), desc="evaluate", leave=False):
            skipped += [target["image_id"] for image, target in zip(images, targets) if image is None]
            readable = [(image, target) for image, target in zip(images, targets) if image is not None]
            if readable:
                outputs = model([image.to(device) for image, _ in readable])
                detections += [{k: v.cpu() for k, v in out.items()} for out in outputs]
                image_ids += [target["image_id"] for _, target in readable]
    if skipped:
        files = [dataset.coco.imgs[image_id]["file_name"] for image_id in skipped]
        if not image_ids:
            raise DataError(f"none of the {len(indices)} images in {dataset.image_dir} could be read: nothing to "
                            "evaluate")
        _logger.warning("evaluation left out %d of %d images as unreadable (skip_corrupt): %s%s", len(skipped),
                        len(indices), ", ".join(files[:10]), " ..." if len(files) > 10 else "")
    return detections, image_ids


def model_categories(meta: dict, dataset) -> dict[int, int]:
    """The dataset's category id of each of a model's labels, from the model's metadata (``meta["dataset_ids"]``),
    checked by name against the dataset's categories: a model of other categories is a one-line DataError naming
    both. A model whose metadata names no ids takes the dataset's own labels, when it has as many classes."""
    source = dataset.annotation_file
    ids = meta.get("dataset_ids")
    if not ids:
        if meta["num_classes"] != dataset.num_classes:
            raise DataError(f"{meta['name']} has {meta['num_classes']} classes (no dataset ids in its metadata) but "
                            f"{source} gives {dataset.num_classes} labels: evaluate it on the data it was trained on")
        return dict(dataset.label_to_category)
    cats = dataset.coco.cats  # labels of categories the dataset lacks (torchvision's N/A ids) are not scored
    mapping = {label: int(category) for label, category in enumerate(ids) if category is not None and label > 0}
    wrong = [(label, meta["categories"][label], category, cats[category]["name"]) for label, category in mapping.items()
             if category in cats and cats[category]["name"] != meta["categories"][label]]
    mapping = {label: category for label, category in mapping.items() if category in cats}
    if wrong or not mapping:
        label, name, category, theirs = wrong[0] if wrong else (None, None, None, None)
        detail = (f"its label {label} is {name!r} (category {category}), which {source} calls {theirs!r}" if wrong else
                  f"none of its category ids is in {source}")
        raise DataError(f"{meta['name']}'s categories are not the dataset's: {detail}; evaluate it on the data it "
                        f"was trained on (its categories: {', '.join(c for c in meta['categories'][1:6])}, ...)")
    return mapping


def detect_dataset(model, dataset, device, batch_size: int = 8, limit: int | None = None, workers: int = 0,
                   env=None, label_to_category: Mapping[int, int] | None = None) -> tuple[list[dict], list[int]] | None:
    """COCO results of ``model`` (see :func:`predict_detections`) on the first ``limit`` images, and their ids;
    labels become category ids through ``label_to_category`` (default: the dataset's; see :func:`model_categories`).

    Under torchrun (``env``, the engine's ``Distributed``) each process predicts its share of the images and the
    first process gets them all; the others get None.
    """
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = range(count) if env is None else env.shard(count)
    detections, image_ids = predict_detections(model, dataset, batch_size, device, indices, workers)
    results = to_coco_results(detections, image_ids, dataset.label_to_category if label_to_category is None
                              else label_to_category)
    if env is not None:
        results, image_ids = env.gather(results), env.gather(image_ids)
        if not env.main:
            return None
    return results, image_ids


def evaluate_model(model, dataset, device, batch_size: int = 8, limit: int | None = None, workers: int = 0,
                   backend: str = "pycocotools", output: Path | None = None, env=None,
                   label_to_category: Mapping[int, int] | None = None) -> CocoMetrics | None:
    """COCO box metrics (and VOC's mAP@0.5 on a ``VocDetection``) of ``model`` on the first ``limit`` images of a
    ``CocoDetection`` dataset (see :func:`detect_dataset`; None on all but the first process); with ``output``,
    ``detections.json``, ``metrics.txt`` and ``metrics.json`` are written there."""
    detected = detect_dataset(model, dataset, device, batch_size, limit, workers, env, label_to_category)
    if detected is None:
        return None
    results, image_ids = detected
    metrics = evaluate(dataset.coco, results, backend=backend, image_ids=image_ids, voc=dataset.voc_metric)
    if output is not None:
        save_results(results, Path(output) / "detections.json")
        (Path(output) / "metrics.txt").write_text(metrics.summary + "\n\n" + metrics.per_class_table() + "\n")
        (Path(output) / "metrics.json").write_text(json.dumps(metrics.to_json(), indent=1))
    return metrics
