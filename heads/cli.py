"""The command lines of ``tools/``: training, evaluation, inference and export.

Each ``*_main(argv)`` parses its arguments and runs; errors in the inputs (missing files, unknown models,
unreadable data) end it with one line on stderr and exit code 2. Each imports only what its own work needs,
so that, say, inference with a detector never loads the segmentation or augmentation libraries.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _parser(description: str):
    """A parser with --model and --device, and a required group holding --weights (tools add alternatives)."""
    parser = argparse.ArgumentParser(description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="training run folder, its last.pt, or a state dict file")
    parser.add_argument("--model", help="registered model name (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser, source


def _add_data(parser: argparse.ArgumentParser, split: str) -> None:
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-root", help="dataset root")
    data.add_argument("--builtin", action="store_true", help="the built-in dataset (generated on first use)")
    parser.add_argument("--split", default=split)
    parser.add_argument("--limit", type=int, help="first N images only")
    parser.add_argument("--out", type=Path, help="folder for the outputs")
    parser.add_argument("--json", type=Path, help="write the metrics here")


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, body: Callable):
    """Parse ``argv`` and call ``body(args)``; input errors exit with one line and status 2."""
    args = parser.parse_args(argv)
    try:
        return body(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")


def _write_json(path: Path | None, metrics) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(metrics if isinstance(metrics, str) else json.dumps(metrics, indent=1))


# -- training ---------------------------------------------------------------------------------------------------

def train_main(argv: list[str] | None = None, task: str = "detection") -> dict:
    """``tools/train_*.py``: ``--config FILE [--resume PATH|auto] [--key value ...]``; returns the final metrics."""
    from .training.config import load_config
    from .training.engine import CHECKPOINT, Trainer
    from .training.tasks import get_task

    parser = argparse.ArgumentParser(description=f"Train a {task} model. Any config key can be overridden "
                                                 "with --key value (see heads/training/config.py for the list).")
    parser.add_argument("--config", help="YAML file with TrainConfig keys")
    parser.add_argument("--resume", help="checkpoint (or run folder) to continue exactly; 'auto': the output's")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides, task=task, **get_task(task).defaults)
        resume = args.resume
        if resume == "auto":
            resume = str(Path(cfg.output) / CHECKPOINT) if (Path(cfg.output) / CHECKPOINT).is_file() else None
        trainer = Trainer(cfg, get_task(cfg.task), resume=resume)
        metrics = trainer.fit()
    except (ValueError, FileNotFoundError) as error:  # config, data and checkpoint errors: one line, no traceback
        parser.exit(2, f"error: {error}\n")
    if trainer.env.main:
        print(f"done: {trainer.step} steps; checkpoint {trainer.output / CHECKPOINT}; "
              f"{trainer.task.main_metric} = {metrics.get(trainer.task.main_metric, float('nan')):.4f}")
    return metrics


# -- detection --------------------------------------------------------------------------------------------------

def eval_det_main(argv: list[str] | None = None):
    """COCO box AP of a model, or of an existing results file; returns the ``CocoMetrics``."""
    from .detection.coco import LABEL_MODES
    from .detection.evaluate import BACKENDS

    parser, source = _parser("Evaluate a detector on COCO (or the built-in set): COCOeval's summary, AP per class.")
    source.add_argument("--results", help="score this COCO results JSON instead of running a model")
    _add_data(parser, "val2017")
    parser.add_argument("--label-mode", choices=LABEL_MODES, help="default: the run's, else contiguous")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", choices=BACKENDS, default="pycocotools")
    return _run(parser, argv, _eval_det)


def _eval_det(args):
    from .deploy.predictor import find_weights, load_model, resolve_device
    from .detection.builtin import builtin_coco
    from .detection.coco import CocoDetection
    from .detection.evaluate import evaluate, load_results, predict_detections, save_results, to_coco_results

    config = find_weights(args.weights)[1] if args.weights else None
    label_mode = args.label_mode or (config.label_mode if config else "contiguous")
    dataset = CocoDetection(args.data_root or builtin_coco(), args.split, label_mode=label_mode)
    image_ids = dataset.image_ids[:args.limit]
    if args.results:
        results = load_results(args.results)
    else:
        device = resolve_device(args.device)
        loaded = load_model(args.weights, args.model, num_classes=dataset.num_classes, device=device)
        detections, image_ids = predict_detections(loaded.model, dataset, args.batch_size, device, args.limit)
        results = to_coco_results(detections, image_ids, dataset.label_to_category)
        if args.out:
            save_results(results, args.out / "detections.json")
    if not dataset.coco.anns:  # test-dev: nothing to score here; the results file is the submission
        print(f"{args.split} has no annotations: wrote {len(results)} detections for the evaluation server")
        return None
    metrics = evaluate(dataset.coco, results, backend=args.backend, image_ids=image_ids)
    print(metrics.summary, metrics.per_class_table(), sep="\n\n")
    _write_json(args.json, metrics.to_json())
    return metrics


# -- segmentation -----------------------------------------------------------------------------------------------

def eval_seg_main(argv: list[str] | None = None):
    """Cityscapes IoU of a model, or of a folder of label-id PNGs; returns the ``SegMetrics``."""
    from .segmentation.inference import MODES

    parser, source = _parser("Evaluate a segmenter on Cityscapes (or the built-in set): IoU per class and category.")
    source.add_argument("--predictions", type=Path, help="score this folder of <stem>*_labelIds.png files instead")
    _add_data(parser, "val")
    parser.add_argument("--mode", choices=MODES, default="whole")
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"), help="slide window")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide step (default: 2/3 crop)")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--write-predictions", action="store_true",
                        help="label-id PNGs for the Cityscapes server and overlays, in --out/predictions")
    return _run(parser, argv, _eval_seg)


def _eval_seg(args):
    from .deploy.predictor import load_model, resolve_device
    from .segmentation.builtin import builtin_cityscapes
    from .segmentation.cityscapes import Cityscapes
    from .segmentation.evaluate import evaluate_folder, evaluate_model, plot_confusion

    if args.write_predictions and not args.out:
        raise ValueError("--write-predictions needs --out (the folder to write them to)")
    dataset = Cityscapes(args.data_root or builtin_cityscapes(), args.split)
    # the first --limit samples, so that a model and --predictions are scored on the same files
    dataset.files, dataset.stems = dataset.files[:args.limit], dataset.stems[:args.limit]
    if args.predictions:
        metrics = evaluate_folder(args.predictions, dataset)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            plot_confusion(metrics.confusion, dataset.class_names, args.out / "confusion.png")
    else:
        device = resolve_device(args.device)
        model = load_model(args.weights, args.model, device=device).model
        metrics = evaluate_model(model, dataset, device, output=args.out, write=args.write_predictions,
                                   mode=args.mode, crop=args.crop, stride=args.stride, flip=args.flip,
                                   scales=args.scales)
    print(metrics.table())
    _write_json(args.json, metrics.to_json())
    return metrics


# -- inference --------------------------------------------------------------------------------------------------

def list_images(path: Path) -> list[Path]:
    """``path`` itself, or the images directly inside the folder ``path``, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return images


def infer_main(argv: list[str] | None = None) -> list:
    """Predict on an image or a folder; write one PNG picture per image; returns the timings."""
    from .deploy.predictor import BACKENDS as INFER_BACKENDS

    parser, _ = _parser("Run a detector or segmenter on images; write pictures of the predictions.")
    parser.add_argument("--task", choices=("detection", "segmentation"), help="checked against the model's")
    parser.add_argument("input", type=Path, help="an image or a folder of images")
    parser.add_argument("--out", type=Path, required=True, help="folder for <image stem>.png pictures")
    parser.add_argument("--score-thresh", type=float, default=0.3, help="detection: draw boxes scoring this or more")
    parser.add_argument("--backend", choices=INFER_BACKENDS, default="pytorch",
                        help="onnxruntime: the exported graph on ONNX Runtime (CPU); pre/post-processing as pytorch")
    parser.add_argument("--onnx", type=Path, help="with --backend onnxruntime: this file from tools/export.py "
                                                  "(default: export the model now)")
    return _run(parser, argv, _infer)


def _infer(args) -> list:
    from tqdm import tqdm

    from .data import read_image
    from .deploy.predictor import Timings, load_model, make_predictor
    from .visualize import draw_detections, overlay_mask

    images = list_images(args.input)
    loaded = load_model(args.weights, args.model, device=args.device)
    if args.task and args.task != loaded.task:
        raise ValueError(f"--task {args.task} but {loaded.name} is a {loaded.task} model")
    predictor = make_predictor(loaded, args.backend, args.onnx)
    args.out.mkdir(parents=True, exist_ok=True)
    timings = []
    for path in tqdm(images, desc="infer", disable=len(images) == 1):
        image = read_image(path)
        output, timing = predictor(image)
        if loaded.task == "detection":
            picture = draw_detections(image, **output, class_names=loaded.class_names, score_thresh=args.score_thresh)
        else:
            from .segmentation.cityscapes import PALETTE

            picture = overlay_mask(image, output, PALETTE)
        picture.save(args.out / f"{path.stem}.png")
        tqdm.write(f"{path.name}: {timing}")
        timings.append(timing)
    print(f"mean over {len(timings)} images: {Timings.mean(timings)}")
    return timings


# -- export -----------------------------------------------------------------------------------------------------

def export_main(argv: list[str] | None = None) -> list[Path]:
    """Export to ONNX (and INT8 with --int8), print the largest difference to PyTorch; returns the files written."""
    from .deploy import export  # onnx and onnxruntime are needed for this tool only

    parser, source = _parser("Export a detector, segmenter or features_only backbone to ONNX (BatchNorm folded, "
                             "dynamic batch), check it with ONNX Runtime, optionally quantize it to INT8.")
    source.add_argument("--backbone", help="a registered backbone to export as a features_only network")
    parser.add_argument("--backbone-weights", help="with --backbone: a local weights file")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file (INT8: <stem>.int8.onnx beside it)")
    parser.add_argument("--size", type=int, nargs="+", metavar="PX",
                        help="export size, S or H W (default: detection its own, segmentation 512 1024, backbone 224)")
    parser.add_argument("--opset", type=int, default=export.OPSET, help=f"ONNX opset ({export.OPSET} or newer)")
    parser.add_argument("--int8", action="store_true", help="also write a static INT8 (QDQ) model")
    parser.add_argument("--calibration", default="builtin",
                        help="'builtin' (the task's built-in training images) or a folder of images; "
                             "INT8 calibration and the check against PyTorch")
    parser.add_argument("--calibration-images", type=int, default=32, help="how many calibration images")
    return _run(parser, argv, _export)


def _export(args) -> list[Path]:
    import numpy as np
    import torch

    from .backbone import create_backbone
    from .data import read_image
    from .deploy import export
    from .deploy.predictor import load_model, resolve_device

    if args.size is not None and len(args.size) > 2:
        raise ValueError(f"--size takes S or H W, got {len(args.size)} numbers")
    if args.calibration_images < 1:
        raise ValueError(f"--calibration-images {args.calibration_images}: at least one image is needed")
    device = resolve_device(args.device)
    if args.backbone:
        model = create_backbone(args.backbone, args.backbone_weights).eval().to(device)
    else:
        model = load_model(args.weights, args.model, device=device).model
    size = export.export_size(model, None if args.size is None else (args.size * 2)[:2])  # S -> S S
    paths = export.builtin_images(export.model_kind(model)) if args.calibration == "builtin" else list_images(
        Path(args.calibration))
    batches = [export.model_input(model, read_image(path), size) for path in paths[:args.calibration_images]]
    written = [export.export_onnx(model, args.out, size, opset=args.opset)]
    if args.int8:
        written.append(export.quantize_int8(written[0], args.out.with_suffix(".int8.onnx"), batches))
    check = torch.from_numpy(np.concatenate(batches[:2]))  # two images: the batch axis is dynamic
    for path in written:
        differences = export.compare_outputs(model, export.OnnxModel(path), check)
        print(f"{path}: max |ONNX Runtime - PyTorch| " + ", ".join(f"{k} {v:.2g}" for k, v in differences.items()))
    return written
