"""What the training engine needs to know about each task: datasets, model, loss, evaluation and pictures."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbbackbones.choices import check_choice

from .. import registry
from ..data import DataError
from ..voc import DATASETS as VOC_DATASETS
from .config import ConfigError, TrainConfig
from .distributed import Distributed, unwrap

PICTURES = 4  # validation images drawn into TensorBoard at each evaluation


@torch.no_grad()
def first_pictures(model: nn.Module, dataset, draw) -> list[np.ndarray]:
    """``draw(image)`` (an RGB picture) for each of the first PICTURES validation images, the model in eval mode."""
    model.eval()
    return [np.asarray(draw(dataset[index][0])) for index in range(min(PICTURES, len(dataset)))]


def _moved(targets, device):
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


class Task:
    """The engine's view of a task; subclasses add datasets, collate, losses, evaluation and pictures."""

    name: str
    main_metric: str
    datasets_help: dict[str, str]  # dataset name -> what it needs ("" for a built-in one; builtin_x mirrors x)
    policies: dict  # augment name -> what it means for the task's transform
    outputs: tuple[str, ...]  # files an evaluation writes into the run folder
    tool: str  # the training tool
    eval_tool: str

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """Everything about ``cfg`` that can be checked before reading data: one line naming the key if wrong."""
        entry = registry.check_name(cfg.model)
        if entry.model_cls.task != cls.name:
            tool = TASKS[entry.model_cls.task].tool
            raise ConfigError(f"model {cfg.model} is a {entry.model_cls.task} model, not a {cls.name} one: train it "
                              f"with {tool}, or choose one of {', '.join(registry.list_models(cls.name))}")
        if cfg.freeze is not None and cfg.trainable_backbone_layers is not None:
            raise ConfigError(f"freeze: {cfg.freeze} and trainable_backbone_layers: {cfg.trainable_backbone_layers} "
                              "together; freeze: backbone is trainable_backbone_layers: 0, so set one of them")
        for key in ("num_classes", "pretrained", "pretrained_backbone", "trainable_backbone_layers"):
            if key in cfg.model_kwargs:
                where = "comes from the dataset" if key == "num_classes" else f"is the config key {key}"
                raise ConfigError(f"model_kwargs: {key} {where}; remove it from model_kwargs")
        if cfg.dataset not in cls.datasets_help:
            raise ConfigError(f"dataset: {cfg.dataset!r} is not a {cls.name} dataset; choose one of "
                              f"{', '.join(cls.datasets_help)}")
        generated = not cls.datasets_help[cfg.dataset]
        if generated and cfg.data_root:
            real = [name for name, needs in cls.datasets_help.items() if needs]
            real = next((name for name in real if cfg.dataset.endswith(f"_{name}")), real[0])  # builtin_voc: voc
            raise ConfigError(f"data_root is {cfg.data_root} but dataset is {cfg.dataset}, which is generated under "
                              f"$MBBACKBONES_DATA; to train on {cfg.data_root}, set dataset: {real} "
                              f"({cls.datasets_help[real]})")
        if not generated and not cfg.data_root and not cls.explicit_paths(cfg):
            raise ConfigError(f"dataset: {cfg.dataset} needs data_root ({cls.datasets_help[cfg.dataset]})")
        if cfg.augment not in cls.policies:
            raise ConfigError(f"augment: {cfg.augment!r} is not a {cls.name} policy; choose one of "
                              f"{', '.join(cls.policies)}")

    @staticmethod
    def explicit_paths(cfg: TrainConfig) -> bool:
        """Whether the config names every data file itself, so that no data_root is needed."""
        return False

    @classmethod
    def datasets(cls, cfg: TrainConfig):
        """The training and validation sets of ``cfg``."""
        return cls.dataset(cfg, train=True), cls.dataset(cfg, train=False)

    @classmethod
    def score(cls, metrics: dict) -> float | None:
        """The main metric of an evaluation, to rank checkpoints by; None when there was nothing to measure."""
        value = metrics.get(cls.main_metric)
        return value if value is not None and math.isfinite(value) else None

    @classmethod
    def model(cls, cfg: TrainConfig, train_set) -> nn.Module:
        """The registered model, its classes and their dataset ids in its metadata."""
        model = registry.create_model(cfg.model, num_classes=train_set.num_classes, pretrained=cfg.pretrained,
                                      pretrained_backbone=cfg.pretrained_backbone,
                                      trainable_backbone_layers=0 if cfg.freeze else cfg.trainable_backbone_layers,
                                      **cfg.model_kwargs)
        model.meta.update(categories=list(train_set.class_names), dataset_ids=cls.dataset_ids(train_set),
                          model_kwargs=dict(cfg.model_kwargs), weights=None)
        return model


class DetectionTask(Task):
    """SSDLite on COCO (or a COCO-format folder), Pascal VOC, or the built-in COCO-format or VOC-layout set."""

    name = "detection"
    main_metric = "AP"
    datasets_help = {"coco": "the folder with train2017/, val2017/, annotations/",
                     "voc": "the VOC2012 or VOC2007 folder with JPEGImages/, Annotations/, ImageSets/Main/",
                     "builtin": "", "builtin_voc": ""}
    policies = {"ssdlite": dict(zoom_out=False, photometric=False), "ssd": {},
                "none": dict(zoom_out=False, photometric=False, iou_crop=False, hflip=0.0)}
    outputs = ("detections.json", "metrics.txt", "metrics.json")
    tool = "tools/train_det.py"
    eval_tool = "tools/eval_det.py"

    coco_keys = ("train_images", "train_annotations", "val_images", "val_annotations")  # any COCO-format folder

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        if cfg.dataset in VOC_DATASETS:
            given = [key for key in cls.coco_keys if getattr(cfg, key)]
            if given:
                raise ConfigError(f"{', '.join(given)}: COCO-format paths, but dataset is {cfg.dataset}, which reads "
                                  "the VOC layout under data_root; remove them or set dataset: coco")
            if cfg.label_mode != "contiguous":
                raise ConfigError(f"label_mode: {cfg.label_mode} numbers COCO's categories; VOC's 20 classes are "
                                  "labels 1..20, so remove it or set it to contiguous")
        super().check(cfg)

    @classmethod
    def explicit_paths(cls, cfg: TrainConfig) -> bool:
        return all(getattr(cfg, key) for key in cls.coco_keys)

    @classmethod
    def score(cls, metrics: dict) -> float | None:
        """AP, or None where COCOeval reports -1: the evaluated images hold no ground-truth box."""
        value = super().score(metrics)
        return value if value is None or value >= 0 else None

    @classmethod
    def dataset(cls, cfg: TrainConfig, train: bool):
        from ..detection.builtin import builtin_coco
        from ..detection.coco import CocoDetection
        from ..detection.transforms import SSDTrainTransform
        from ..detection.voc import VocDetection
        from ..voc import builtin_voc

        split = cfg.train_split if train else cfg.val_split
        transform = SSDTrainTransform(cfg.model_kwargs.get("size", 320), **cls.policies[cfg.augment]) if train else None
        common = dict(transform=transform, train=train, skip_corrupt=cfg.skip_corrupt)
        if cfg.dataset in VOC_DATASETS:
            dataset = VocDetection(cfg.data_root if cfg.dataset == "voc" else builtin_voc(), split, **common)
        else:
            dataset = CocoDetection(cfg.data_root if cfg.dataset == "coco" else builtin_coco(), split,
                                    label_mode=cfg.label_mode, image_dir=cfg.train_images if train else cfg.val_images,
                                    annotation_file=cfg.train_annotations if train else cfg.val_annotations, **common)
        if not dataset.coco.anns:
            purpose = "train on" if train else "evaluate against"
            raise DataError(f"{dataset.annotation_file}: no annotations to {purpose}; training needs an instances "
                            "file with boxes (a test split without them is for tools/eval_det.py)")
        return dataset

    @staticmethod
    def dataset_ids(dataset) -> list[int | None]:
        """COCO category id of each label (None: background or unused)."""
        return [dataset.label_to_category.get(label) for label in range(dataset.num_classes)]

    @staticmethod
    def data_location(dataset) -> str:
        return f"{dataset.image_dir} with {dataset.annotation_file}"

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
    def evaluate(model: nn.Module, dataset, cfg: TrainConfig, env: Distributed, output: Path | None = None) -> dict:
        """COCO box AP of ``model`` on ``dataset`` (its first ``cfg.eval_limit`` images), shared out over the
        processes; the metrics on every process."""
        from ..detection.evaluate import evaluate_model

        metrics = evaluate_model(model, dataset, env.device, cfg.batch_size, cfg.eval_limit, cfg.workers,
                                 cfg.scorer, output, env)
        if metrics is not None:
            print(metrics.summary)
        return env.broadcast(metrics.stats if metrics is not None else None)

    @staticmethod
    def pictures(model: nn.Module, dataset, device) -> list[np.ndarray]:
        """The first validation images with the model's detections scoring 0.3 or more drawn on them."""
        from ..visualize import draw_detections

        def draw(image: Tensor):
            detections = model([image.to(device)])[0]
            photo = (image * 255).round().byte().permute(1, 2, 0).numpy()
            return draw_detections(photo, **{k: v.cpu() for k, v in detections.items()},
                                   class_names=dataset.class_names)
        return first_pictures(model, dataset, draw)


class SegmentationTask(Task):
    """LR-ASPP on Cityscapes (or a Cityscapes-layout folder), on image and mask folders of your own classes, on Pascal
    VOC, or on the built-in sets of each."""

    name = "segmentation"
    main_metric = "mIoU"
    mask_keys = ("train_images", "train_masks", "val_images", "val_masks", "classes")  # what dataset: masks reads
    datasets_help = {"cityscapes": "the folder with leftImg8bit/ and gtFine/",
                     "masks": ", ".join(mask_keys[:-1]) + f" and {mask_keys[-1]}",
                     "voc": "the VOC2012 or VOC2007 folder with JPEGImages/, SegmentationClass/, "
                            "ImageSets/Segmentation/",
                     "builtin": "", "builtin_masks": "", "builtin_voc": ""}
    policies = {"default": True, "none": False}
    outputs = ("metrics.txt", "metrics.json", "confusion.png")
    tool = "tools/train_seg.py"
    eval_tool = "tools/eval_seg.py"

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """The Task's checks, and the keys of ``dataset: masks``: all of them there, none of them elsewhere."""
        super().check(cfg)
        given = [key for key in cls.mask_keys if getattr(cfg, key) is not None]
        if cfg.dataset != "masks" and given:
            raise ConfigError(f"{', '.join(given)}: read by dataset: masks only, but dataset is {cfg.dataset}; set "
                              "dataset: masks or remove them")
        missing = [key for key in cls.mask_keys if key not in given]
        if cfg.dataset == "masks" and missing:
            raise ConfigError(f"dataset: masks needs {cls.datasets_help['masks']}; missing: {', '.join(missing)}")
        if cfg.dataset == "masks" and cfg.data_root:
            raise ConfigError(f"data_root is {cfg.data_root} but dataset: masks reads {cls.datasets_help['masks']}; "
                              "remove data_root")

    @staticmethod
    def explicit_paths(cfg: TrainConfig) -> bool:
        return cfg.dataset == "masks"

    @staticmethod
    def dataset(cfg: TrainConfig, train: bool):
        from ..segmentation.builtin import builtin_cityscapes, builtin_masks
        from ..segmentation.cityscapes import Cityscapes
        from ..segmentation.masks import MaskDataset
        from ..segmentation.transforms import SegTrainTransform

        augment = train and SegmentationTask.policies[cfg.augment]
        transform = SegTrainTransform(crop_size=cfg.crop_size) if augment else None
        if cfg.dataset in ("cityscapes", "builtin"):
            root = cfg.data_root if cfg.dataset == "cityscapes" else builtin_cityscapes()
            return Cityscapes(root, cfg.train_split if train else cfg.val_split, transform=transform)
        if cfg.dataset in ("voc", "builtin_voc"):
            from ..voc import builtin_voc

            root = cfg.data_root if cfg.dataset == "voc" else builtin_voc()
            return MaskDataset.from_voc(root, cfg.train_split if train else cfg.val_split, transform)
        split = "train" if train else "val"
        keys = (f"{split}_images", f"{split}_masks")
        if cfg.dataset == "builtin_masks":
            root = builtin_masks()
            return MaskDataset.from_folders(root / "images" / split, root / "masks" / split, root / "classes.txt",
                                            transform, keys)
        return MaskDataset.from_folders(*(getattr(cfg, key) for key in keys), cfg.classes, transform, keys)

    @staticmethod
    def dataset_ids(dataset) -> list[int]:
        """The value of each class in the dataset's label files (Cityscapes: its label ids)."""
        return dataset.dataset_ids

    @staticmethod
    def data_location(dataset) -> str:
        return dataset.location

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
        model.forward_batch(batch[0].to(device))

    @staticmethod
    def evaluate(model: nn.Module, dataset, cfg: TrainConfig, env: Distributed, output: Path | None = None) -> dict:
        """IoU of ``model`` on ``dataset`` per class (under the dataset's class names) and its mean, the category mean
        where the dataset groups its classes (Cityscapes), shared out over the processes; the metrics on every one."""
        from ..segmentation.evaluate import evaluate_model

        metrics = evaluate_model(model, dataset, env.device, limit=cfg.eval_limit, output=output, workers=cfg.workers,
                                 env=env)
        if env.main:
            print(metrics.table())
        categories = {"category_mIoU": metrics.category_miou} if metrics.category_iou else {}
        return {"mIoU": metrics.miou, **categories, "pixel_accuracy": metrics.pixel_accuracy}

    @staticmethod
    def pictures(model: nn.Module, dataset, device) -> list[np.ndarray]:
        """The first validation images with the predicted classes overlaid in their colours (:func:`class_palette`)."""
        from ..visualize import class_palette, overlay_mask

        palette = class_palette(dataset.class_names)

        def draw(image: Tensor):
            mask = model.forward_batch(image[None].to(device))[0][0].argmax(0).cpu().numpy()
            return overlay_mask(image.permute(1, 2, 0).numpy(), mask, palette)
        return first_pictures(model, dataset, draw)


TASKS = {"detection": DetectionTask, "segmentation": SegmentationTask}


def get_task(name: str) -> type[Task]:
    check_choice("task", name, TASKS)
    return TASKS[name]


def validation_images(cfg: TrainConfig) -> list[Path]:
    """The image files of a config's validation set (the built-in one is written on first use)."""
    return get_task(cfg.task).dataset(cfg, train=False).image_paths()
