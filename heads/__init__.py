"""Task heads on mbbackbones: SSDLite detection and LR-ASPP segmentation, with their data, training and deployment.

The public API is what ``__all__`` lists; the sub-packages are internal and may change:

- ``heads.detection``: SSDLite, the COCO and VOC readers, the built-in COCO-format set, SSD augmentation, COCO and
  VOC metrics.
- ``heads.segmentation``: LR-ASPP, the masks (your classes) and Cityscapes readers, built-in sets, augmentation,
  inference, metrics.
- ``heads.training``: the config, the one engine shared by both tasks, the tasks' hooks, the sampler, logs.
- ``heads.deploy``: the predictor, BatchNorm folding, export and the runtimes of exported files.

Beside them: ``heads.task_model`` (the one interface of task models), ``heads.results`` (what a prediction
returns), ``heads.loading`` (a name, model, run folder, weights or exported file to a model that runs),
``heads.registry`` (task models by name), ``heads.backbone`` (the backbones under the heads) and ``heads.voc``
(Pascal VOC's layout, classes and palette, and the built-in VOC-layout set).

Names are imported on first use, so ``import heads`` loads neither the augmentation nor the plotting libraries.
"""
from __future__ import annotations

import importlib
from importlib.metadata import version

from .registry import ENTRIES, MODELS, create_model, list_models, list_weights

__version__ = version("mbbackbones")
_LAZY = {  # public name -> the module that defines it
    "Predictor": "heads.deploy.predictor",
    "Detections": "heads.results",
    "Segmentation": "heads.results",
    "load": "heads.loading",
    "fuse": "heads.deploy.predictor",
    "train": "heads.training.launch",
    "Run": "heads.training.run",
    "TrainConfig": "heads.training.config",
    "load_config": "heads.training.config",
    "ConfigError": "heads.training.config",
    "DataError": "heads.data",
    "SAMPLE_IMAGES": "heads.assets",
}
__all__ = ["ENTRIES", "MODELS", "create_model", "list_models", "list_weights", *_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'heads' has no attribute {name!r}")
