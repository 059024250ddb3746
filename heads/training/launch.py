"""The entry points of training: :func:`train` (Python) and :func:`run_training` (the tools' command lines), apart
from the loop they start (:mod:`heads.training.engine`)."""
from __future__ import annotations

import os
from pathlib import Path

from .config import TrainConfig, load_config, to_dict
from .engine import CHECKPOINT, Trainer
from .run import Run
from .tasks import get_task


def train(config: str | os.PathLike | dict | TrainConfig, resume: str | os.PathLike | None = None,
          **overrides) -> Run:
    """Train with the same engine as ``tools/train_*.py`` and return the run (its folder, metrics, checkpoints).

    ``config``: a YAML file, a mapping of :class:`TrainConfig` keys, or a ``TrainConfig``; ``overrides`` replace
    its keys (``heads.train("configs/x.yaml", epochs=3, data_root="/data/coco")``). The task's recipe (detection
    or segmentation defaults) fills in the rest. ``resume``: a run folder or checkpoint to continue, or ``"auto"``
    (the output folder's last checkpoint when there is one).
    """
    if isinstance(config, (TrainConfig, dict)):
        values, path = to_dict(config) if isinstance(config, TrainConfig) else dict(config), None
    else:
        values, path = {}, config
    values.update(overrides)
    return run_training(load_config(path, values), resume)


def run_training(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> Run:
    """Train ``cfg`` (``resume`` as in :func:`train`), print where everything went, and return the run."""
    if resume == "auto":
        resume = cfg.output if (Path(cfg.output) / CHECKPOINT).is_file() else None
    trainer = Trainer(cfg, get_task(cfg.task), resume=resume)
    metrics = trainer.fit()
    if trainer.env.main:
        print(trainer.summary())
    return Run(trainer.output, metrics, trainer.step)

