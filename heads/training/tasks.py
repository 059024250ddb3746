"""What the training engine needs to know about each task: datasets, model, loss and evaluation."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from .config import TrainConfig
from .engine import unwrap


def _moved(targets, device):
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


class Task:
    """The engine's view of a task; subclasses add datasets, collate, losses and evaluation."""

    name: str
    main_metric: str
    defaults: dict = {}  # TrainConfig values that differ from the (detection) defaults

    @staticmethod
    def model(cfg: TrainConfig, train_set) -> nn.Module:
        return registry.create_model(cfg.model, num_classes=train_set.num_classes, pretrained=cfg.pretrained,
                                     pretrained_backbone=cfg.pretrained_backbone, **cfg.model_kwargs)

    @staticmethod
    def check_dataset(cfg: TrainConfig, choices: dict[str, str], policies) -> None:
        if cfg.dataset not in choices:
            raise ValueError(f"dataset={cfg.dataset!r} is not a {cfg.task} dataset; choose one of {', '.join(choices)}")
        if cfg.dataset != "builtin" and not cfg.data_root:
            raise ValueError(f"dataset: {cfg.dataset} needs data_root ({choices[cfg.dataset]})")
        if cfg.augment not in policies:
            raise ValueError(f"augment={cfg.augment!r} is not a {cfg.task} policy; choose one of {', '.join(policies)}")


class DetectionTask(Task):
    """SSDLite on COCO or the built-in COCO-format dataset."""

    name = "detection"
    main_metric = "AP"
    policies = {"ssdlite": dict(zoom_out=False, photometric=False), "ssd": {},
                "none": dict(zoom_out=False, photometric=False, iou_crop=False, hflip=0.0)}

    @staticmethod
    def datasets(cfg: TrainConfig):
        from ..detection.builtin import builtin_coco
        from ..detection.coco import CocoDetection
        from ..detection.transforms import SSDTrainTransform

        policies = DetectionTask.policies
        Task.check_dataset(cfg, {"coco": "the folder with train2017/, val2017/, annotations/", "builtin": ""},
                           policies)
        root = cfg.data_root if cfg.dataset == "coco" else builtin_coco(cfg.data_root)
        transform = SSDTrainTransform(cfg.model_kwargs.get("size", 320), **policies[cfg.augment])
        common = dict(label_mode=cfg.label_mode, skip_corrupt=cfg.skip_corrupt)
        train = CocoDetection(root, cfg.train_split, transform=transform, train=True, **common)
        return train, CocoDetection(root, cfg.val_split, **common)

    @staticmethod
    def collate(batch):
        from ..detection.coco import collate_detection

        return collate_detection(batch)

    @staticmethod
    def losses(model: nn.Module, batch, device) -> dict:
        images, targets = batch
        return model([image.to(device, non_blocking=True) for image in images], _moved(targets, device))

    @staticmethod
    def forward_images(model: nn.Module, batch, device) -> None:
        images, _ = batch
        model.predict(torch.stack([model.resize(image.to(device)) for image in images]))

    @staticmethod
    def evaluate(model: nn.Module, dataset, cfg: TrainConfig, device, output: Path | None = None) -> dict:
        """COCO box AP of ``model`` on ``dataset`` (its first ``cfg.eval_limit`` images)."""
        from ..detection.evaluate import evaluate_model

        metrics = evaluate_model(model, dataset, device, cfg.batch_size, cfg.eval_limit, cfg.workers,
                                 cfg.eval_backend, output)
        print(metrics.summary)
        return metrics.stats


class SegmentationTask(Task):
    """LR-ASPP on Cityscapes or the built-in Cityscapes-layout dataset."""

    name = "segmentation"
    main_metric = "mIoU"
    # mmsegmentation's LR-ASPP Cityscapes recipe: SGD 0.01 per 16 images, poly decay, 512x1024 crops
    defaults = dict(model="lraspp_mbv3_large", dataset="builtin", train_split="train", val_split="val",
                    augment="default", lr=0.01, lr_batch=16, weight_decay=4e-5, scheduler="poly", warmup_steps=0,
                    batch_size=4, epochs=1721, output="runs/segmentation")

    @staticmethod
    def datasets(cfg: TrainConfig):
        from ..segmentation.builtin import builtin_cityscapes
        from ..segmentation.cityscapes import Cityscapes
        from ..segmentation.transforms import SegTrainTransform

        Task.check_dataset(cfg, {"cityscapes": "the folder with leftImg8bit/ and gtFine/", "builtin": ""},
                           ("default", "none"))
        root = cfg.data_root if cfg.dataset == "cityscapes" else builtin_cityscapes(cfg.data_root)
        transform = SegTrainTransform(crop_size=cfg.crop_size) if cfg.augment == "default" else None
        return Cityscapes(root, cfg.train_split, transform=transform), Cityscapes(root, cfg.val_split)

    @staticmethod
    def collate(batch):
        return torch.utils.data.default_collate(batch)

    @staticmethod
    def losses(model: nn.Module, batch, device) -> dict:
        images, masks = batch
        logits = model(unwrap(model).normalize(images.to(device, non_blocking=True)))
        return {"cross_entropy": F.cross_entropy(logits.float(), masks.to(device), ignore_index=255)}

    @staticmethod
    def forward_images(model: nn.Module, batch, device) -> None:
        model(unwrap(model).normalize(batch[0].to(device)))

    @staticmethod
    def evaluate(model: nn.Module, dataset, cfg: TrainConfig, device, output: Path | None = None) -> dict:
        from ..segmentation.evaluate import evaluate_model

        metrics = evaluate_model(model, dataset, device, limit=cfg.eval_limit, output=output, workers=cfg.workers)
        print(metrics.table())
        return {"mIoU": metrics.miou, "category_mIoU": metrics.category_miou,
                "pixel_accuracy": metrics.pixel_accuracy}


TASKS = {"detection": DetectionTask, "segmentation": SegmentationTask}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not supported; choose one of {', '.join(TASKS)}")
    return TASKS[name]
