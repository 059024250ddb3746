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
    """Export to ONNX, OpenVINO, ExecuTorch or LiteRT (INT8 with --int8) and check the file against PyTorch: each
    comparison with its tolerance and PASS/FAIL (exit status 1 on a FAIL); returns the files written."""
    from .deploy.export import FORMATS, OPSET

    parser, source = _parser("Export a detector, segmenter or features_only backbone for a deployment runtime "
                             "(BatchNorm folded, images in [0, 1] in, metadata inside), optionally as INT8, and "
                             "check it against PyTorch.")
    source.add_argument("--backbone", help="a registered backbone to export as a features_only network")
    parser.add_argument("--backbone-weights", help="with --backbone: a local weights file")
    parser.add_argument("--num-classes", type=int, help="classes of a plain state dict (default: the model's)")
    parser.add_argument("--format", choices=FORMATS, help="runtime format (default: from the --out suffix: "
                        + ", ".join(f"{suffix} {name}" for name, suffix in FORMATS.items()) + ")")
    parser.add_argument("--out", type=Path, required=True, help="the file to write")
    parser.add_argument("--size", type=int, nargs="+", metavar="PX",
                        help="export size, S or H W (default: detection its own, segmentation 512 1024, backbone 224)")
    parser.add_argument("--opset", type=int, help=f"ONNX opset (default and minimum {OPSET})")
    parser.add_argument("--int8", action="store_true", help="post-training static INT8 quantization")
    parser.add_argument("--calibration", help="INT8 calibration and check images: a folder of images, or "
                        "'builtin' (the built-in set's validation images); default: the run's validation images "
                        "(from its config) for --int8, the package's sample photos for the fp32 check")
    parser.add_argument("--calibration-images", type=int, default=32, help="how many calibration images")
    return _run(parser, argv, _export)


def _check_images(args, kind: str, config) -> list[Path]:
    """Images to calibrate INT8 on and to check the export with (see ``--calibration``)."""
    from .assets import SAMPLE_IMAGES
    from .deploy import export

    if args.calibration == "builtin":
        return export.builtin_images(kind, "val")
    if args.calibration is not None:
        return list_images(Path(args.calibration))
    if config is not None and args.int8:
        return export.validation_images(config.task, config.dataset, config.data_root, config.val_split)
    if args.int8:
        raise ValueError(f"--int8 needs calibration images and {args.weights or args.backbone} has no run config "
                         "naming its validation images: pass --calibration FOLDER (the task's own validation "
                         "images) or --calibration builtin")
    return list(SAMPLE_IMAGES.values())  # fp32: the check only; nothing is generated or written


def _export(args) -> list[Path]:
    import numpy as np
    import torch

    from .backbone import create_backbone
    from .data import read_image
    from .deploy import export, runtimes
    from .deploy.predictor import load_model, resolve_device

    if args.size is not None and len(args.size) > 2:
        raise ValueError(f"--size takes S or H W, got {len(args.size)} numbers")
    if args.calibration_images < 1:
        raise ValueError(f"--calibration-images {args.calibration_images}: at least one image is needed")
    format = args.format or runtimes.format_of(args.out)
    device = resolve_device(args.device)
    if args.backbone:
        model, config = create_backbone(args.backbone, args.backbone_weights).eval().to(device), None
    else:
        loaded = load_model(args.weights, args.model, num_classes=args.num_classes, device=device)
        model, config = loaded.model, loaded.config
    size = export.export_size(model, None if args.size is None else (args.size * 2)[:2])  # S -> S S
    paths = _check_images(args, export.model_kind(model), config)[:args.calibration_images]
    batches = [export.model_input(model, read_image(path), size) for path in paths]
    options = {} if args.opset is None else {"opset": args.opset}
    try:
        path = runtimes.export(model, args.out, format, int8=args.int8, calibration=batches if args.int8 else None,
                               size=size, **options)
        runtime = runtimes.load(path)
    except ImportError as error:  # a runtime's extra is not installed
        raise ValueError(str(error)) from None
    except OSError as error:  # the --out path: a folder, a file where a folder should be, no permission
        where = f" ({error.filename})" if error.filename else ""
        raise ValueError(f"cannot write {args.out}: {error.strerror or error}{where}") from None
    precision = "INT8" if args.int8 else "fp32"
    source = f", calibrated on {len(batches)} images from {paths[0].parent}" if args.int8 else ""
    print(f"wrote {path} ({format}, {precision}{source})")
    checks = runtimes.check(model, runtime, torch.from_numpy(np.concatenate(batches[:2])))
    print(f"check against PyTorch on {min(2, len(batches))} images: " + "; ".join(map(str, checks)))
    if not all(check.passed for check in checks):
        raise SystemExit(f"error: {path} differs from PyTorch beyond the tolerance (kept for inspection)")
    return runtimes.exported_files(path)
