"""The entry points of training: :func:`train` (Python), :func:`configure` and :func:`run_training` (the tools'
command lines), apart from the loop they start (:mod:`heads.training.engine`)."""
from __future__ import annotations

import os
from pathlib import Path

from .config import TrainConfig, load_config, make_config, read_yaml, resume_changes, to_dict
from .engine import CHECKPOINT, CONFIG, Trainer, run_folder
from .run import Run, RunError
from .tasks import get_task


def train(config: str | os.PathLike | dict | TrainConfig, resume: str | os.PathLike | None = None,
          **overrides) -> Run:
    """Train with the same engine as ``tools/train_*.py`` and return the run (its folder, metrics, checkpoints).

    ``config``: a YAML file, a mapping of :class:`TrainConfig` keys, or a ``TrainConfig``; ``overrides`` replace
    its keys (``heads.train("configs/x.yaml", epochs=3, data_root="/data/coco")``). The task's recipe (detection
    or segmentation defaults) fills in the rest. ``resume``: a run folder or checkpoint to continue, or ``"auto"``
    (the output folder's last checkpoint when there is one); the run's own config then fills in the rest, and only
    its resumable keys may change (:func:`configure`).
    """
    if isinstance(config, (TrainConfig, dict)):
        values, path = to_dict(config) if isinstance(config, TrainConfig) else dict(config), None
    else:
        values, path = {}, config
    values.update(overrides)
    return run_training(*configure(path, values, resume))


def configure(path: str | os.PathLike | None, overrides: list[str] | dict | None,
              resume: str | os.PathLike | None = None, **defaults) -> tuple[TrainConfig, str | os.PathLike | None]:
    """The config to train and the run to resume (None: start a new one).

    A new run's config is ``defaults`` < the YAML file ``path`` < ``overrides`` (:func:`load_config`). A resumed
    run's starts from the run's own ``config.yaml`` in place of the defaults, and the file and overrides may change
    only its resumable keys (they are printed); a change to any other is refused, naming each (see
    :func:`resume_changes`). ``resume="auto"``: the output folder's run, when it has a checkpoint.
    """
    if resume is None or resume == "auto":
        cfg = load_config(path, overrides, **defaults)
        if resume is None or not (Path(cfg.output) / CHECKPOINT).is_file():
            return cfg, None
        resume = cfg.output
    folder = run_folder(resume)
    if not (folder / CONFIG).is_file():
        raise RunError(f"cannot resume {folder}: its {CONFIG} is missing (the run's config, written at its start)")
    stored = make_config(read_yaml(folder / CONFIG), str(folder / CONFIG))
    cfg = load_config(path, overrides, **{**defaults, **to_dict(stored)})
    changes = resume_changes(stored, cfg, folder)
    if changes and int(os.environ.get("RANK", 0)) == 0:
        print(f"resuming {folder} with {', '.join(changes)}")
    return cfg, resume


def run_training(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> Run:
    """Train ``cfg``, or continue the run ``resume`` (its folder or checkpoint) with it, print where everything
    went, and return the run. ``cfg`` is taken as it is: :func:`configure` makes the one a resumed run may take."""
    trainer = Trainer(cfg, get_task(cfg.task), resume=resume)
    metrics = trainer.fit()
    if trainer.env.main:
        print(trainer.summary())
    return Run(trainer.output, metrics, trainer.step)

