"""One way from what a user names to a model that runs: a registered name (its published weights), a model, a
training run folder, a weights file or an exported file all resolve to a :class:`Loaded` through :func:`load`,
which the Predictor, the exporter and the evaluation and inference tools share."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mbbackbones.choices import ArgumentError

from . import registry
from .devices import resolve_device

RUN_CHECKPOINTS = ("best.pt", "last.pt")  # a run folder's weights, in order of preference


@dataclass
class Loaded:
    """A task model ready to run: the PyTorch ``model`` in eval mode (or, for an exported file, its ``runtime``),
    its metadata (``meta``: ``model.meta``, or the file's) and, for a training run, the run's config."""

    meta: dict
    model: nn.Module | None = None
    runtime: object | None = None  # a heads.deploy.runtimes.Runtime
    config: object | None = None  # a heads.training.config.TrainConfig
    source: str = ""

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def class_names(self) -> list[str]:
        return self.meta["categories"]

    @property
    def model_cls(self) -> type:
        """The task model class whose hooks (resize, post-processing) read this metadata."""
        return registry.TASK_MODELS[self.task]


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported file (a suffix of :data:`heads.deploy.export.FORMATS`, in any case)."""
    from .deploy.export import FORMATS

    return Path(path).suffix.lower() in FORMATS.values()


def run_checkpoint(folder: Path) -> Path:
    """A run folder's ``best.pt``, else its ``last.pt``."""
    path = next((folder / file for file in RUN_CHECKPOINTS if (folder / file).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no {' or '.join(RUN_CHECKPOINTS)} in the run folder {folder}")
    return path


def load(source, name: str | None = None, device: str | torch.device = "auto", *, threads: int | None = None,
         runtime_options: dict | None = None, **kwargs) -> Loaded:
    """What ``source`` names, ready to run.

    Args:
        source: a model instance (with ``meta``: built by ``heads.create_model``), a registered name (its published
            weights), a training run folder (its ``best.pt``, else ``last.pt``), a weights file (a run's checkpoint;
            a plain state dict with ``name``), or an exported file (``.onnx``, OpenVINO ``.xml``, ExecuTorch
            ``.pte``, ``.tflite``: its runtime, on the CPU).
        name: the registered model a plain state dict belongs to.
        device: where a PyTorch model runs (:func:`heads.devices.resolve_device`).
        threads, runtime_options: for an exported file's runtime.
        kwargs: :func:`heads.create_model` arguments for a weights file (``num_classes``, constructor arguments).
    """
    if (threads or runtime_options) and not (isinstance(source, (str, os.PathLike)) and is_exported(source)):
        raise ArgumentError(f"threads and runtime options ({', '.join(runtime_options or {})}) are for exported "
                            "files; this is a PyTorch model")
    if isinstance(source, Loaded):
        return source
    if isinstance(source, nn.Module):
        if not hasattr(source, "meta"):
            raise ArgumentError(f"{type(source).__name__} carries no metadata: build it with heads.create_model")
        return Loaded(source.meta, source.eval().to(resolve_device(device)), source=type(source).__name__)
    if isinstance(source, str) and source in registry.ENTRIES and not Path(source).exists():
        model = registry.create_model(source, pretrained=True).eval().to(resolve_device(device))
        return Loaded(model.meta, model, source=source)
    path = Path(source)
    if path.is_dir():
        path = run_checkpoint(path)
    if is_exported(path):
        from .deploy import runtimes

        runtime = runtimes.load(path, threads=threads, **(runtime_options or {}))
        return Loaded(runtime.metadata, runtime=runtime, source=str(path))
    if not path.exists() and isinstance(source, str) and not path.suffix and os.sep not in source:
        raise ArgumentError(f"{source!r} is neither a registered model ({', '.join(registry.ENTRIES)}) nor a file or "
                            "run folder")
    model, checkpoint = registry.load_checkpoint(path, name, **kwargs)
    config = None
    if isinstance(checkpoint.get("config"), dict):
        from .training.config import make_config

        config = make_config(checkpoint["config"], str(path))
    return Loaded(model.meta, model.eval().to(resolve_device(device)), config=config, source=str(path))
