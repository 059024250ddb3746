"""The command lines of ``tools/``: training, evaluation, inference and export.

Each ``*_main(argv)`` parses its arguments and runs; errors in the inputs (missing files, unknown models,
unreadable data) end it with one line on stderr and exit code 2. Each imports only what its own work needs,
so that, say, inference with a detector never loads the segmentation or augmentation libraries.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from mbbackbones.choices import ArgumentError


class Parser(argparse.ArgumentParser):
    """argparse, with its mistakes in one line as every other input error of the tools (no usage block above)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser(description: str):
    """A parser with --model and --device, and a required group holding --weights (tools add alternatives)."""
    parser = Parser(description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="a training run folder (its best.pt), a weights file, an exported file "
                                          "(.onnx, .xml, .pte, .tflite) or a registered name (published weights)")
    parser.add_argument("--model", help="the registered model of a plain state dict")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (exported files: the CPU)")
    return parser, source


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_data(parser: argparse.ArgumentParser, split: str | None, split_help: str | None = None) -> None:
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-root", "--data_root", dest="data_root", help="dataset root")
    data.add_argument("--builtin", action="store_true", help="the built-in dataset (generated on first use)")
    parser.add_argument("--split", default=split, help=split_help)
    parser.add_argument("--limit", type=positive, help="first N images only")
    parser.add_argument("--out", type=Path, help="folder for the outputs")
    parser.add_argument("--json", type=Path, help="write the metrics here")


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input (config, data, weights, paths, choices): one line, no traceback. Anything else
    is a bug and keeps its traceback."""
    from mbbackbones.checkpoint import CheckpointError, WeightsUnavailable

    from .data import DataError
    from .deploy.export import MissingExtra
    from .training.config import ConfigError
    from .training.run import RunError

    return (ArgumentError, ConfigError, DataError, CheckpointError, WeightsUnavailable, RunError, MissingExtra,
            FileNotFoundError, FloatingPointError)


def _user_errors_exit(parser: argparse.ArgumentParser, body: Callable):
    """``body()``, with the :func:`user_errors` it raises ending the tool: one line on stderr, exit status 2."""
    try:
        return body()
    except user_errors() as error:
        parser.exit(2, f"error: {error}\n")


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, body: Callable, files: tuple[str, ...] = ("json",)):
    """Parse ``argv``, check the outputs (:func:`_check_outputs`; ``files``: the options naming a file) and call
    ``body(args)``; input errors exit with one line and status 2."""
    args = parser.parse_args(argv)

    def checked():
        _check_outputs(args, files)
        return body(args)
    return _user_errors_exit(parser, checked)


def _check_outputs(args: argparse.Namespace, files: tuple[str, ...]) -> None:
    """Before any work: the tool can write each output it was given (``--out``, ``--json``), a file for the options
    in ``files``, a folder (made here if missing) for the others; else an ``ArgumentError`` naming the option."""
    for name in ("out", "json"):
        path = getattr(args, name, None)
        if path is None:
            continue
        option, is_file = f"--{name} {path}", name in files
        if is_file and path.is_dir():
            raise ArgumentError(f"{option} is a folder; give the file to write")
        if not is_file and path.exists() and not path.is_dir():
            raise ArgumentError(f"{option} is a file; give a folder (made if missing)")
        folder = path.parent if is_file else path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            in_the_way = isinstance(error, (FileExistsError, NotADirectoryError))
            reason = "a file is in the way" if in_the_way else error.strerror or error
            raise ArgumentError(f"{option}: cannot write into {folder}: {reason}") from None


def _write_json(path: Path | None, metrics) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(metrics if isinstance(metrics, str) else json.dumps(metrics, indent=1))


# -- training ---------------------------------------------------------------------------------------------------

def train_main(argv: list[str] | None = None, task: str = "detection"):
    """``tools/train_*.py``: ``--config FILE [--resume PATH|auto] [--key value ...]``; returns the ``Run``."""
    from .training.config import RESUMABLE, ConfigError, describe_fields
    from .training.launch import configure, run_training
    from .training.tasks import get_task

    parser = Parser(
        description=f"Train a {task} model. Any config key can be given as --key value (or --key=value), after the "
                    "config file's values.", epilog="config keys:\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with config keys")
    parser.add_argument("--resume", help="run folder (or its checkpoint) to continue exactly, from its own config; "
                                         f"only {', '.join(RESUMABLE)} may change. 'auto': the output folder's, when "
                                         "it has one")
    args, overrides = parser.parse_known_args(argv)

    def body():
        cfg, resume = configure(args.config, overrides, args.resume, task=task)
        if cfg.task != task:
            raise ConfigError(f"{resume or args.config or 'command line'}: task is {cfg.task}; this tool trains "
                              f"{task} models (use {get_task(cfg.task).tool})")
        return run_training(cfg, resume)

    return _user_errors_exit(parser, body)


# -- detection --------------------------------------------------------------------------------------------------

def eval_det_main(argv: list[str] | None = None):
    """COCO box AP of a model, or of an existing results file; returns the ``CocoMetrics``."""
    from .detection.coco import LABEL_MODES
    from .detection.evaluate import BACKENDS

    parser, source = _parser("Evaluate a detector on COCO or Pascal VOC (or a built-in set): COCOeval's summary, AP "
                             "per class; on VOC also VOC's mAP@0.5 (11-point and all-point).")
    source.add_argument("--results", help="score this COCO results JSON instead of running a model")
    _add_data(parser, None, "default: val2017 (COCO), val (VOC)")
    parser.add_argument("--dataset", choices=("coco", "voc"),
                        help="the layout of --data-root, or which built-in set; default: the run's, else coco")
    parser.add_argument("--label-mode", choices=LABEL_MODES, help="default: the run's, else contiguous")
    parser.add_argument("--batch-size", type=positive, default=8)
    parser.add_argument("--scorer", choices=BACKENDS, default="pycocotools", help="the COCOeval implementation")
    return _run(parser, argv, _eval_det)


def _eval_det(args):
    from .detection.builtin import builtin_coco
    from .detection.coco import CocoDetection
    from .detection.evaluate import (
        detect_dataset,
        evaluate,
        evaluate_model,
        load_results,
        model_categories,
        save_results,
    )
    from .detection.voc import VocDetection
    from .voc import DATASETS, builtin_voc

    network, config = _network(args, "detection") if args.weights else (None, None)
    kind = args.dataset or ("voc" if config and config.dataset in DATASETS else "coco")
    split = args.split or {"coco": "val2017", "voc": "val"}[kind]
    if kind == "voc":
        if args.label_mode not in (None, "contiguous"):
            raise ArgumentError(f"--label-mode {args.label_mode} numbers COCO's categories; VOC's 20 classes are "
                                "labels 1..20: leave it out")
        dataset = VocDetection(args.data_root or builtin_voc(), split)
    else:
        label_mode = args.label_mode or (config.label_mode if config else "contiguous")
        dataset = CocoDetection(args.data_root or builtin_coco(), split, label_mode=label_mode)
    categories = model_categories(network.meta, dataset) if network is not None else None  # the model's own ids
    if not dataset.coco.anns:  # test-dev: nothing to score here; the results file is the submission
        if network is None:
            raise ArgumentError(f"{split} has no annotations to score --results against")
        if args.out is None:
            raise ArgumentError(f"{split} has no annotations: pass --out, where the submission file goes")
        results, _ = detect_dataset(network, dataset, _device(args), args.batch_size, args.limit,
                                    label_to_category=categories)
        save_results(results, args.out / "detections.json")
        print(f"{split} has no annotations: wrote {len(results)} detections for the evaluation server to "
              f"{args.out / 'detections.json'}")
        return None
    if args.results:
        metrics = evaluate(dataset.coco, load_results(args.results), backend=args.scorer,
                           image_ids=dataset.image_ids[:args.limit], voc=dataset.voc_metric)
    else:
        metrics = evaluate_model(network, dataset, _device(args), args.batch_size, args.limit, backend=args.scorer,
                                 output=args.out, label_to_category=categories)
    print(metrics.summary, metrics.per_class_table(), sep="\n\n")
    _write_json(args.json, metrics.to_json())
    return metrics


def _device(args):
    from .devices import resolve_device

    return resolve_device(args.device)


def _network(args, task: str):
    """What an evaluation tool scores: the PyTorch model (evaluated exactly as in training) and its run's config,
    or, for an exported file, a :class:`~heads.deploy.predictor.Predictor` on its runtime."""
    from .deploy.predictor import Predictor
    from .loading import load
    from .training.tasks import get_task

    loaded = load(args.weights, args.model, args.device)
    if loaded.task != task:
        raise ArgumentError(f"{args.weights} is a {loaded.task} model; evaluate it with "
                            f"{get_task(loaded.task).eval_tool}")
    return (loaded.model if loaded.runtime is None else Predictor(loaded)), loaded.config


# -- segmentation -----------------------------------------------------------------------------------------------

def eval_seg_main(argv: list[str] | None = None):
    """Cityscapes IoU of a model, or of a folder of label-id PNGs; returns the ``SegMetrics``."""
    from .segmentation.inference import MODES

    parser, source = _parser("Evaluate a segmenter on Cityscapes, Pascal VOC or image and mask folders (or their "
                             "built-in sets): IoU per class (and per category on Cityscapes).")
    source.add_argument("--predictions", type=Path, help="score this folder of <stem>*_labelIds.png files instead")
    _add_data(parser, "val", "the split (masks: the folder under images/ and masks/)")
    parser.add_argument("--dataset", choices=tuple(SEGMENTATION_LAYOUTS),
                        help="the layout of --data-root (default: the run's, else cityscapes); masks: a folder "
                             "holding images/<split>/, masks/<split>/ and classes.txt, as the built-in set")
    parser.add_argument("--mode", choices=MODES, default="whole")
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"), help="slide window")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide step (default: 2/3 crop)")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--write-predictions", action="store_true",
                        help="label-id PNGs for the Cityscapes server and overlays, in --out/predictions")
    return _run(parser, argv, _eval_seg)


SEGMENTATION_LAYOUTS = {"cityscapes": "builtin", "voc": "builtin_voc", "masks": "builtin_masks"}  # -> built-in set


def _segmentation_data(args, config):
    """The validation set ``args`` name, in the layout of ``--dataset`` or of the run's ``config``."""
    from .training.config import make_config
    from .training.tasks import SegmentationTask

    layout_of = {builtin: layout for layout, builtin in SEGMENTATION_LAYOUTS.items()}
    trained_on = config.dataset if config is not None else "cityscapes"
    layout = args.dataset or layout_of.get(trained_on, trained_on)
    values = dict(task="segmentation", dataset=SEGMENTATION_LAYOUTS[layout] if args.builtin else layout,
                  val_split=args.split)
    if layout == "masks" and not args.builtin:
        root = Path(args.data_root)
        values.update(val_images=str(root / "images" / args.split), val_masks=str(root / "masks" / args.split),
                      classes=str(root / "classes.txt"))
    elif not args.builtin:
        values["data_root"] = args.data_root
    return SegmentationTask.dataset(make_config(values, "the command line"), train=False)


def _eval_seg(args):
    from .segmentation.cityscapes import Cityscapes
    from .segmentation.evaluate import check_categories, evaluate_folder, evaluate_model, plot_confusion

    if args.write_predictions and not args.out:
        raise ArgumentError("--write-predictions needs --out (the folder to write them to)")
    network, config = _network(args, "segmentation") if args.weights else (None, None)
    dataset = _segmentation_data(args, config)
    if (args.write_predictions or args.predictions) and not isinstance(dataset, Cityscapes):
        raise ArgumentError("--write-predictions and --predictions read and write Cityscapes label-id PNGs: use them "
                            "with --dataset cityscapes")
    # the first --limit samples, so that a model and --predictions are scored on the same files
    dataset.files, dataset.stems = dataset.files[:args.limit], dataset.stems[:args.limit]
    if args.predictions:
        metrics = evaluate_folder(args.predictions, dataset)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            plot_confusion(metrics.confusion, dataset.class_names, args.out / "confusion.png")
    else:
        check_categories(network.meta, dataset)
        metrics = evaluate_model(network, dataset, _device(args), output=args.out, write=args.write_predictions,
                                 mode=args.mode, crop=args.crop, stride=args.stride, flip=args.flip,
                                 scales=args.scales)
    print(metrics.table())
    _write_json(args.json, metrics.to_json())
    return metrics


# -- inference --------------------------------------------------------------------------------------------------

def infer_main(argv: list[str] | None = None) -> list:
    """``tools/infer.py``: predict on images, videos or a camera; write a picture per image (an annotated video per
    video) and the results; returns the results of the still images (a video's frames are written, not kept)."""
    parser = Parser(
        description="Predict with a detector or segmenter on images, folders, globs, videos or a camera: a picture "
                    "per image plus detections.json (COCO results) or label-id PNGs, and per video an annotated video "
                    "plus, for a detector, <name>_detections.json (per frame), in --out. Ctrl-C stops a camera.")
    parser.add_argument("--weights", required=True,
                        help="a registered name (its published weights), a training run folder (its best.pt), a "
                             "weights file, or an exported file (.onnx, .xml, .pte, .tflite: the runtime follows)")
    parser.add_argument("--model", help="the registered model of a plain state dict")
    parser.add_argument("inputs", nargs="+", type=_input,
                        help="images, videos, folders of them, globs (quote them), or a camera index (0: the first)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pictures, videos and result files")
    parser.add_argument("--task", choices=("detection", "segmentation"), help="checked against the model's")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (exported files: the CPU)")
    parser.add_argument("--score-thresh", type=float, help="detection: keep (and draw) boxes scoring this or more "
                                                           "(default: the model's, drawing those over 0.3)")
    parser.add_argument("--nms-thresh", type=float, help="detection: NMS IoU threshold (default: the model's)")
    parser.add_argument("--max-det", type=positive, help="detection: detections per image (default: the model's)")
    parser.add_argument("--batch-size", type=positive, default=8, help="images (or frames) per forward pass")
    parser.add_argument("--fps", type=float, help="the annotated videos' frame rate (default: the one each video or "
                                                  "camera reports)")
    parser.add_argument("--threads", type=positive, help="exported files: the runtime's threads")
    return _run(parser, argv, _infer)


def _input(text: str) -> str | int:
    """An input of ``tools/infer.py``: a camera index (digits naming no file), else a path or glob."""
    return int(text) if text.isdigit() and not Path(text).exists() else text


def _infer(args) -> list:
    import contextlib

    import numpy as np
    from tqdm import tqdm

    from .deploy.predictor import Predictor
    from .results import Timings

    predictor = Predictor(args.weights, device=args.device, score_thresh=args.score_thresh,
                          nms_thresh=args.nms_thresh, max_det=args.max_det, name=args.model,
                          batch_size=args.batch_size, **({"threads": args.threads} if args.threads else {}))
    if args.task and args.task != predictor.task:
        raise ArgumentError(f"--task {args.task} but {args.weights} is a {predictor.task} model")
    images, frames, total, stopped = [], 0, np.zeros(len(Timings._fields)), False
    results = predictor.stream(args.inputs, out=args.out, fps=args.fps)
    try:
        with contextlib.closing(results):  # stopped, a video's outputs are complete for the frames done
            for result in results:
                if result.frame is None:
                    tqdm.write(f"{result.name}: {result.timings}")
                    images.append(result)
                else:
                    frames += 1
                total += result.timings
    except KeyboardInterrupt:
        stopped = True
    what = " and ".join(f"{n} {word}" for n, word in ((len(images), "images"), (frames, "frames")) if n) or "0 images"
    if stopped:
        print(f"stopped after {what}")
    mean = Timings(*(total / max(len(images) + frames, 1)).tolist())
    print(f"mean over {what} (after a warm-up): {mean}")
    result_type = predictor.model_cls.result_type
    if images:
        print(f"wrote {len(images)} pictures (<name>.png) and {result_type.outputs} to {args.out}")
    if frames:
        records = f" and <name>_{result_type.records_file} (per frame)" if result_type.records_file else ""
        print(f"wrote annotated videos (<name>.mp4; .avi for .avi sources){records} to {args.out}")
    return images


# -- export -----------------------------------------------------------------------------------------------------

def export_main(argv: list[str] | None = None) -> list[Path]:
    """Export to ONNX, OpenVINO, ExecuTorch or LiteRT (INT8 with --int8) and check the file against PyTorch: each
    comparison with its tolerance and PASS/FAIL (exit status 1 on a FAIL); returns the files written."""
    from .deploy.export import FORMATS, OPSET

    parser, source = _parser("Export a detector, segmenter or features_only backbone for a deployment runtime "
                             "(BatchNorm folded, metadata inside; a detector's or segmenter's ONNX and OpenVINO "
                             "files take RGB uint8 images and give the final detections or class mask), optionally "
                             "as INT8, and check it against PyTorch.")
    source.add_argument("--backbone", help="a registered backbone to export as a features_only network")
    parser.add_argument("--backbone-weights", help="with --backbone: a local weights file")
    parser.add_argument("--num-classes", type=int, help="classes of a plain state dict (default: the model's)")
    parser.add_argument("--format", choices=FORMATS, help="runtime format (default: from the --out suffix: "
                        + ", ".join(f"{suffix} {name}" for name, suffix in FORMATS.items()) + ")")
    parser.add_argument("--out", type=Path, required=True, help="the file to write")
    parser.add_argument("--size", type=positive, nargs="+", metavar="PX",
                        help="export size, S or H W (default: detection its own, segmentation 512 1024, backbone 224)")
    parser.add_argument("--opset", type=int, help=f"ONNX opset (default and minimum {OPSET})")
    parser.add_argument("--int8", action="store_true", help="post-training static INT8 quantization")
    parser.add_argument("--raw", action="store_true", help="the raw graph, without the post-processing: images in "
                        "[0, 1] in, decoded boxes and class probabilities per default box (detection) or logits "
                        "(segmentation) out")
    parser.add_argument("--calibration", help="INT8 calibration and check images: a folder of images, or "
                        "'builtin' (the built-in set's validation images); default: the run's validation images "
                        "(from its config) for --int8, the package's sample photos for the fp32 check")
    parser.add_argument("--calibration-images", type=int, default=32, help="how many calibration images")
    parser.add_argument("--web", type=Path, metavar="DIR", help="also write a web page into DIR that runs the .onnx "
                        "file in the browser (onnxruntime-web from npm, copied in; serve DIR over HTTP)")
    parser.add_argument("--onnxruntime-web", metavar="PATH", help="with --web: an onnxruntime-web package already "
                        "downloaded (folder or .tgz) instead of npm")
    return _run(parser, argv, _export, files=("out",))


def _check_images(args, kind: str, config) -> list[Path]:
    """Images to calibrate INT8 on and to check the export with (see ``--calibration``)."""
    from .assets import SAMPLE_IMAGES
    from .deploy.predictor import list_images
    from .training.config import make_config
    from .training.tasks import TASKS, validation_images

    if args.calibration == "builtin":  # the task's built-in set; classifiers and backbones: the default task's
        return validation_images(make_config({"task": kind} if kind in TASKS else {}))
    if args.calibration is not None:
        return list_images(Path(args.calibration))
    if config is not None and args.int8:
        return validation_images(config)
    if args.int8:
        raise ArgumentError(f"--int8 needs calibration images and {args.weights or args.backbone} has no run config "
                         "naming its validation images: pass --calibration FOLDER (the task's own validation "
                         "images) or --calibration builtin")
    return list(SAMPLE_IMAGES.values())  # fp32: the check only; nothing is generated or written


def _export(args) -> list[Path]:
    import numpy as np
    import torch

    from .backbone import create_backbone
    from .data import read_image
    from .deploy import export, runtimes
    from .devices import resolve_device
    from .loading import load

    if args.size is not None and len(args.size) > 2:
        raise ArgumentError(f"--size takes S or H W, got {len(args.size)} numbers")
    if args.calibration_images < 1:
        raise ArgumentError(f"--calibration-images {args.calibration_images}: at least one image is needed")
    format = args.format or runtimes.format_of(args.out)
    if args.web is not None and (format != "onnx" or args.raw):
        raise ArgumentError("--web runs .onnx files with the post-processing inside: export to .onnx without --raw")
    if args.web is not None and args.web.exists() and not args.web.is_dir():
        raise ArgumentError(f"--web {args.web} is a file; give a folder (made if missing)")
    if args.web is not None:  # the browser runtime first: a missing npm fails before the export's minutes
        from .deploy.web import copy_onnxruntime_web

        args.web.mkdir(parents=True, exist_ok=True)
        copy_onnxruntime_web(args.web, args.onnxruntime_web)
    device = resolve_device(args.device)
    if args.backbone:
        model, config = create_backbone(args.backbone, args.backbone_weights).eval().to(device), None
    else:
        loaded = load(args.weights, args.model, device, num_classes=args.num_classes)
        if loaded.model is None:
            raise ArgumentError(f"{args.weights} is an exported file already; export its training run or weights")
        model, config = loaded.model, loaded.config
    size = export.export_size(model, None if args.size is None else (args.size * 2)[:2])  # S -> S S
    paths = _check_images(args, export.model_kind(model), config)[:args.calibration_images]
    batches = [export.model_input(model, read_image(path), size) for path in paths]
    options = {} if args.opset is None else {"opset": args.opset}
    try:
        path = runtimes.export(model, args.out, format, int8=args.int8, calibration=batches if args.int8 else None,
                               size=size, postprocess=not args.raw, **options)
        runtime = runtimes.load(path)
    except OSError as error:  # the --out path: a folder, a file where a folder should be, no permission
        where = f" ({error.filename})" if error.filename else ""
        raise ArgumentError(f"cannot write {args.out}: {error.strerror or error}{where}") from None
    precision = "INT8" if args.int8 else "fp32"
    source = f", calibrated on {len(batches)} images from {paths[0].parent}" if args.int8 else ""
    inside = ", post-processing inside" if runtime.metadata["postprocessed"] else ""
    print(f"wrote {path} ({format}, {precision}{inside}{source})")
    checks = runtimes.check(model, runtime, torch.from_numpy(np.concatenate(batches[:2])))
    print(f"check against PyTorch on {min(2, len(batches))} images: " + "; ".join(map(str, checks)))
    if not all(check.passed for check in checks):
        raise SystemExit(f"error: {path} differs from PyTorch beyond the tolerance (kept for inspection)")
    if args.web is None:
        return runtimes.exported_files(path)
    from .deploy.web import write_page

    page = write_page(path, args.web, args.web)  # onnxruntime-web is in the folder already
    print(f"wrote the web page {page}: serve it with 'python -m http.server -d {args.web}' and open "
          "http://localhost:8000")
    return [*runtimes.exported_files(path), page]
