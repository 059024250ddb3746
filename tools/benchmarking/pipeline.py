"""The data pipeline on its own: how many training images per second one DataLoader worker reads and augments.

A worker spends its time in ``dataset[(index, seed)]``: decoding, augmenting and converting to a tensor. Each
row times that call in this process with one torch and one OpenCV thread (a worker's share of a busy machine),
on the built-in datasets at real-data sizes; a training step's images/s divided by a row's images/s is the
number of workers that keep the step fed. Rows are timed in alternation, like the model rows.

Run: ``cd tools && python -m benchmarking.pipeline [--quick] [--json FILE]``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple

import cv2
import torch
from torch.utils.data import Dataset

from heads.data import sample_seed
from heads.detection.builtin import builtin_coco
from heads.detection.coco import CocoDetection
from heads.detection.transforms import SSDTrainTransform
from heads.segmentation.builtin import builtin_cityscapes
from heads.segmentation.cityscapes import Cityscapes
from heads.segmentation.transforms import SegTrainTransform
from heads.training.tasks import DetectionTask

from .harness import latencies_ms, machine

DETECTION_POLICIES = ("ssd", "ssdlite")


class PipelineSettings(NamedTuple):
    """Dataset sizes and repeats of one pipeline measurement."""

    images: int  # per dataset; one timed call reads them all once
    coco_sides: tuple[int, int]  # built-in COCO widths and heights are drawn from this range
    detect_size: int  # SSD output side
    cityscapes_size: tuple[int, int]  # (height, width) of the built-in scenes
    crop_size: tuple[int, int]  # SegTrainTransform crops (height, width)
    repeats: int
    warmup: int
    budget_s: float  # timed seconds, once three rounds are done


# COCO images are mostly 480-640 pixels a side, Cityscapes' 1024 x 2048; SSDLite trains at 320, LR-ASPP on 512 x 1024
FULL = PipelineSettings(16, (480, 640), 320, (1024, 2048), (512, 1024), 10, 1, 60.0)
QUICK = PipelineSettings(3, (64, 96), 320, (64, 128), (32, 64), 2, 1, 1.0)


class Row(NamedTuple):
    dataset: str
    pipeline: str
    data: Dataset


def pipeline_rows(settings: PipelineSettings, root: Path) -> Iterator[Row]:
    """Reading alone, then reading and each augmentation: the COCO-format set (``ssd`` and ``ssdlite`` policies)
    and the Cityscapes-layout set (``SegTrainTransform``), written under ``root`` unless already there."""
    low, high = settings.coco_sides
    coco = builtin_coco(root / f"coco_{settings.images}_{low}_{high}", num_train=settings.images, num_val=1,
                        size_range=(low, high))
    name, size = f"built-in COCO, {low}-{high} px", settings.detect_size
    yield Row(name, "read", CocoDetection(coco, "train2017", train=True))
    for policy in DETECTION_POLICIES:
        transform = SSDTrainTransform(size, **DetectionTask.policies[policy])
        yield Row(name, f"{policy} -> {size}x{size}", CocoDetection(coco, "train2017", transform=transform, train=True))
    (height, width), (crop_height, crop_width) = settings.cityscapes_size, settings.crop_size
    scenes = builtin_cityscapes(root / f"cityscapes_{settings.images}_{height}x{width}", num_train=settings.images,
                                num_val=1, size=(height, width))
    name = f"built-in Cityscapes, {width}x{height}"
    yield Row(name, "read", Cityscapes(scenes, "train"))
    yield Row(name, f"SegTrainTransform -> {crop_width}x{crop_height} crops",
              Cityscapes(scenes, "train", transform=SegTrainTransform(crop_size=settings.crop_size)))


@contextmanager
def one_thread():
    """Torch and OpenCV on one thread each, as in a DataLoader worker sharing the machine with the others."""
    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])


def _read(data: Dataset, items: list[tuple[int, int]]) -> None:
    for item in items:
        data[item]


def measure_pipeline(settings: PipelineSettings, root: Path) -> dict:
    """Images per second (median and best round) and ms per image of each of :func:`pipeline_rows`."""
    rows = list(pipeline_rows(settings, root))
    items = [(index, sample_seed(0, index)) for index in range(settings.images)]  # the same draws every round
    with one_thread():
        info = machine()  # the load average before we add to it
        timings = latencies_ms([partial(_read, row.data, items) for row in rows], settings.repeats,
                               settings.warmup, settings.budget_s)
    count = settings.images
    return dict(machine=info, rows=[
        dict(task="pipeline", dataset=row.dataset, pipeline=row.pipeline, images=count,
             images_per_s=round(count * 1e3 / median, 1), images_per_s_best=round(count * 1e3 / low, 1),
             ms_per_image=round(median / count, 2))
        for row, (median, low) in zip(rows, timings)])


def markdown(result: dict) -> str:
    info = result["machine"]
    lines = [f"{info['date']}, {info['cpu']}, one process, {info['threads']} thread, torch {info['torch']}, "
             f"load average {info['load_average']:.2f} at start", "",
             "| dataset | pipeline | images/s (median / best) | ms per image |", "|---|---|---:|---:|"]
    lines += [f"| {row['dataset']} | {row['pipeline']} | {row['images_per_s']} / {row['images_per_s_best']} | "
              f"{row['ms_per_image']} |" for row in result["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny datasets, 2 repeats (smoke test)")
    parser.add_argument("--data-root", type=Path, help="keep the built-in datasets here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        result = measure_pipeline(settings, args.data_root or Path(tmp))
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
