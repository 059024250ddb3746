"""Segmentation evaluation as the Cityscapes benchmark computes it: a confusion matrix over class ids, IoU per class
(under the dataset's class names) and per category (where the dataset groups its classes, as Cityscapes does),
Cityscapes label-id result files, a parity hook into cityscapesScripts' own evaluator, and the loop that scores a
model on a dataset."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..data import DataError, unwrap_worker_errors
from ..visualize import overlay_mask
from .cityscapes import CATEGORIES, CLASS_NAMES, ID_TO_TRAIN_ID, IGNORE_INDEX, PALETTE, TRAIN_ID_TO_ID, read_label_ids
from .inference import predict

PREDICTION_SUFFIX = "_labelIds.png"  # <city>_<seq>_<frame>_labelIds.png: matches the official "<stem>*.png" search


def _iou(matrix: np.ndarray, void: np.ndarray) -> np.ndarray:
    """Per-row IoU of a ground-truth x prediction matrix whose rows also lost ``void`` pixels to no class (misses);
    NaN where a class is in neither."""
    true_positive = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) + void - true_positive
    with np.errstate(invalid="ignore"):
        return true_positive / union


def _nanmean(values) -> float:
    values = np.asarray(list(values), dtype=np.float64)
    valid = values[~np.isnan(values)]
    return float(valid.mean()) if valid.size else math.nan


def _percent(value: float) -> str:
    return "   n/a" if math.isnan(value) else f"{100 * value:6.2f}"


@dataclass(frozen=True)
class SegMetrics:
    """Scores of one confusion matrix (rows: ground truth, columns: prediction, ignored pixels excluded).

    A class with neither ground-truth nor predicted pixels has IoU NaN and is left out of the means, as in
    cityscapesScripts. Category IoU merges the classes of each category before computing IoU, also as there.
    ``void_pixels`` counts evaluated pixels predicted as no class (a void label id in a prediction file); they
    are misses of their ground-truth class, as cityscapesScripts scores them, and are not in ``confusion``.
    """

    miou: float
    per_class_iou: dict[str, float]
    category_iou: dict[str, float]
    pixel_accuracy: float
    confusion: np.ndarray
    void_pixels: int = 0

    @property
    def category_miou(self) -> float:
        return _nanmean(self.category_iou.values())

    def table(self) -> str:
        """Aligned per-class and per-category IoU (percent), with their means and the pixel accuracy."""
        width = max(map(len, [*self.per_class_iou, *self.category_iou, "pixel accuracy"]))
        rule = "-" * (width + 8)

        def block(header: str, scores: dict[str, float], mean: float) -> list[str]:
            rows = [f"{name:<{width}}  {_percent(value)}" for name, value in scores.items()]
            return [f"{header:<{width}}  {'IoU':>6}", rule, *rows, rule, f"{'mean':<{width}}  {_percent(mean)}"]

        lines = block("class", self.per_class_iou, self.miou)
        if self.category_iou:
            lines += ["", *block("category", self.category_iou, self.category_miou)]
        lines += ["", f"{'pixel accuracy':<{width}}  {_percent(self.pixel_accuracy)}"]
        if self.void_pixels:
            lines.append(f"{self.void_pixels} px predicted as void label ids, scored as misses (as cityscapesScripts)")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The scores and the confusion matrix as JSON; NaN becomes null."""
        def finite(value: float) -> float | None:
            return None if math.isnan(value) else value

        return json.dumps({
            "miou": finite(self.miou), "category_miou": finite(self.category_miou),
            "pixel_accuracy": finite(self.pixel_accuracy),
            "per_class_iou": {name: finite(value) for name, value in self.per_class_iou.items()},
            "category_iou": {name: finite(value) for name, value in self.category_iou.items()},
            "confusion": self.confusion.tolist(), "void_pixels": self.void_pixels,
        }, indent=2)


class ConfusionMatrix:
    """An int64 ground-truth x prediction pixel count over class ids, accumulated batch by batch (by default over
    Cityscapes' 19 train ids and their categories).

    ``matrix`` has one column more than classes: predictions equal to ``ignore_index`` (no class, e.g. a void
    label id in a prediction file) are counted there, as misses of the ground-truth class. ``categories`` gives
    each class's category (for category IoU); pass ``()`` to skip it. Keep the matrix on the device of the
    predictions (``device=``) when summing it over processes with NCCL.
    """

    def __init__(self, class_names=CLASS_NAMES, categories=CATEGORIES, ignore_index: int = IGNORE_INDEX,
                 device: torch.device | str | None = None):
        if categories and len(categories) != len(class_names):
            raise ValueError(f"{len(categories)} categories for {len(class_names)} classes")
        if 0 <= ignore_index < len(class_names):
            raise ValueError(f"ignore_index {ignore_index} is a class index; use a value outside "
                             f"0..{len(class_names) - 1}")
        self.class_names = tuple(class_names)
        self.categories = tuple(categories)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(len(class_names), len(class_names) + 1, dtype=torch.int64, device=device)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count class-index predictions against targets of the same shape; ``ignore_index`` targets are skipped,
        ``ignore_index`` predictions count as misses."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        keep = target != self.ignore_index
        pred, target = pred[keep].long(), target[keep].long()
        n, void = self.num_classes, pred == self.ignore_index
        if pred.numel():
            classes = torch.cat([pred[~void], target])
            low, high = classes.min().item(), classes.max().item()
            if low < 0 or high >= n:
                raise ValueError(f"class indices must lie in 0..{n - 1} (or be {self.ignore_index}: ignored in "
                                 f"targets, a miss in predictions), got values {low}..{high}")
        counts = torch.bincount(target * (n + 1) + pred.masked_fill(void, n), minlength=n * (n + 1)).view(n, n + 1)
        self.matrix += counts.to(self.matrix.device)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of another matrix over the same classes."""
        if other.class_names != self.class_names:
            raise ValueError("cannot merge confusion matrices over different classes")
        self.matrix += other.matrix.to(self.matrix.device)

    def compute(self) -> SegMetrics:
        counts = self.matrix.cpu().numpy()
        matrix, void = counts[:, :-1], counts[:, -1]
        iou = _iou(matrix, void)
        category_names = list(dict.fromkeys(self.categories))
        member = np.array([[c == name for name in category_names] for c in self.categories], dtype=np.int64)
        category_iou = _iou(member.T @ matrix @ member, member.T @ void) if self.categories else np.zeros(0)
        total = counts.sum()
        return SegMetrics(
            miou=_nanmean(iou),
            per_class_iou=dict(zip(self.class_names, iou.tolist())),
            category_iou=dict(zip(category_names, category_iou.tolist())),
            pixel_accuracy=float(np.trace(matrix) / total) if total else math.nan,
            confusion=matrix,
            void_pixels=int(void.sum()),
        )


def plot_confusion(matrix, class_names, path: str | Path) -> Path:
    """Save the row-normalised confusion matrix (the share of each ground-truth class per prediction) as a PNG."""
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    rows = matrix.sum(1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = 0.4 * len(class_names) + 2
    figure = Figure(figsize=(size + 1, size), layout="constrained")  # no pyplot: renders with Agg, no global state
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(class_names)), class_names, rotation=90)
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set(xlabel="prediction", ylabel="ground truth")
    figure.colorbar(image, ax=axes, label="share of ground-truth pixels")
    figure.savefig(path, dpi=100)
    return Path(path)


def write_predictions(pred_train_ids, stem: str, out_dir: str | Path, image: np.ndarray | None = None) -> Path:
    """Write ``out_dir/<stem>_labelIds.png``: the H x W train-id prediction as Cityscapes label ids, the format of
    the benchmark server and cityscapesScripts (which find it by ``<city>_<seq>_<frame>*.png``). With the uint8
    RGB ``image``, also ``<stem>_overlay.jpg`` (JPEG, so that search never picks it up). Returns the PNG path."""
    pred = np.asarray(pred_train_ids.cpu() if isinstance(pred_train_ids, torch.Tensor) else pred_train_ids)
    if pred.ndim != 2 or pred.min() < 0 or pred.max() >= len(CLASS_NAMES):
        raise ValueError(f"{stem}: expected an H x W map of train ids 0..{len(CLASS_NAMES) - 1}, got shape "
                         f"{pred.shape} with values {pred.min()}..{pred.max()}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}{PREDICTION_SUFFIX}"
    Image.fromarray(TRAIN_ID_TO_ID[pred]).save(path)
    if image is not None:
        overlay_mask(image, pred, PALETTE).save(out_dir / f"{stem}_overlay.jpg", quality=90)
    return path


def _find_prediction(files: list[Path], stem: str, pred_dir: Path) -> Path:
    matches = [path for path in files if path.name.startswith(stem)]
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(path.name for path in matches)
        raise DataError(f"expected one prediction {stem}*.png under {pred_dir}, found {found}")
    return matches[0]


def evaluate_folder(pred_dir: str | Path, dataset) -> SegMetrics:
    """Score label-id PNGs under ``pred_dir`` (searched recursively, one ``<stem>*.png`` per sample, as
    cityscapesScripts does) against the labels of a :class:`~heads.cityscapes.Cityscapes` dataset.

    Scores equal ``evaluateImgLists``' on every file it accepts: void label ids (0 'unlabeled', 9 'parking', ...)
    are misses, counted in ``void_pixels``; ids outside the label table are an error naming the file.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"prediction folder not found: {pred_dir}")
    files = sorted(pred_dir.rglob("*.png"))
    confusion = ConfusionMatrix(dataset.class_names, dataset.categories, dataset.ignore_index)
    for stem, (image_path, label_path) in zip(dataset.stems, dataset.files):
        if label_path is None:
            raise DataError(f"no ground truth to score {image_path} against")
        pred_path = _find_prediction(files, stem, pred_dir)
        pred_ids, target = read_label_ids(pred_path), ID_TO_TRAIN_ID[read_label_ids(label_path)]
        if pred_ids.shape != target.shape:
            raise DataError(f"prediction {pred_path} is {pred_ids.shape[1]}x{pred_ids.shape[0]} but its ground truth "
                            f"{label_path} is {target.shape[1]}x{target.shape[0]} (width x height)")
        confusion.update(torch.from_numpy(ID_TO_TRAIN_ID[pred_ids]), torch.from_numpy(target))
    return confusion.compute()


def official_scores(pred_files, gt_files) -> dict:
    """cityscapesScripts' ``evaluateImgLists`` on label-id PNG pairs (no instance scores, no files written), in
    :class:`SegMetrics`' names: ``miou``, ``per_class_iou``, ``category_iou``, ``category_miou``."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = copy.copy(official.args)  # the module's args are global: leave them as they were
    args.evalInstLevelScore, args.evalPixelAccuracy, args.JSONOutput, args.quiet = False, False, False, True
    try:
        result = official.evaluateImgLists([str(p) for p in pred_files], [str(p) for p in gt_files], args)
    except SystemExit:  # its printError() prints the reason and exits
        raise DataError("cityscapesScripts' evaluateImgLists failed: see the ERROR line it printed") from None
    return {
        "miou": result["averageScoreClasses"],
        "per_class_iou": {name: result["classScores"][name] for name in CLASS_NAMES},
        "category_iou": {name: result["categoryScores"][name] for name in dict.fromkeys(CATEGORIES)},
        "category_miou": result["averageScoreCategories"],
    }


def check_categories(meta: dict, dataset) -> None:
    """A model scored on ``dataset`` must predict its classes, in its order (by name; by count for a model whose
    metadata names no dataset ids): else one line naming both."""
    named = meta.get("dataset_ids") is not None
    if (list(meta["categories"]) if named else meta["num_classes"]) != (list(dataset.class_names) if named else
                                                                          len(dataset.class_names)):
        raise DataError(f"{meta['name']} predicts {meta['num_classes']} classes ({', '.join(meta['categories'][:4])}, "
                        f"...) but {dataset.location} holds {len(dataset.class_names)} "
                        f"({', '.join(dataset.class_names[:4])}, ...): evaluate it on the data it was trained on")


def evaluate_model(model: nn.Module, dataset, device, limit: int | None = None, output: Path | None = None,
                   write: bool = False, workers: int = 0, env=None, **options) -> SegMetrics:
    """Confusion-matrix metrics of ``model`` on ``dataset`` (images decoded by ``workers`` processes, ``options``
    for :func:`heads.segmentation.inference.predict`); with ``output``, the tables and the confusion PNG are
    written there, and with ``write`` also label-id predictions and colourised overlays.

    Under torchrun (``env``, the engine's ``Distributed``) each process scores its share of the images and the
    confusion matrices are summed, so every process gets the metrics of the whole set.
    """
    confusion = ConfusionMatrix(dataset.class_names, dataset.categories, dataset.ignore_index, device=device)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = range(count) if env is None else env.shard(count)
    for index, pred, mask in _predictions(model, dataset, indices, device, workers, options):
        confusion.update(pred, mask)
        if write and output is not None:
            write_predictions(pred.cpu().numpy(), dataset.stems[index], Path(output) / "predictions",
                              image=dataset.load(index)[0])
    if env is not None:
        env.sum(confusion.matrix)
    metrics = confusion.compute()
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.txt").write_text(metrics.table() + "\n")
        (output / "metrics.json").write_text(metrics.to_json())
        plot_confusion(metrics.confusion, dataset.class_names, output / "confusion.png")
    return metrics


def _predictions(model, dataset, indices, device, workers: int, options: dict):
    """``(index, predicted train ids, target train ids)`` for the dataset items ``indices``: from a network (with
    :func:`~heads.segmentation.inference.predict` ``options``), or from a backend adapter with
    ``predictions(paths)`` (an exported file's Predictor), which reads the image files itself."""
    if hasattr(model, "predictions"):
        if any(value != default for value, default in ((options.get("mode", "whole"), "whole"),
                                                         (options.get("flip", False), False),
                                                         (list(options.get("scales", [1.0])), [1.0]))):
            raise ValueError("sliding windows, flips and scales need the PyTorch model, not an exported file")
        paths = dataset.image_paths()
        for index, mask in zip(indices, model.predictions([paths[i] for i in indices])):
            yield index, mask.to(device), torch.from_numpy(dataset.load(index)[1]).to(device)
        return
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), num_workers=workers)
    batches = tqdm(unwrap_worker_errors(loader), total=len(loader), desc="evaluate", leave=False)
    for index, (image, mask) in zip(indices, batches):
        yield index, predict(model, model.normalize(image.to(device)), **options)[0].argmax(0), mask[0].to(device)
