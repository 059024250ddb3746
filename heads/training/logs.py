"""A run's records: ``log.jsonl``, TensorBoard event files and ``plot.png``, all written by one :class:`RunLog`."""
from __future__ import annotations

import json
import numbers
from pathlib import Path

import numpy as np

from ..files import atomic_write

LOG = "log.jsonl"
PLOT = "plot.png"


def read_log(log: Path) -> list[dict]:
    """The records of ``log.jsonl``, without a line that a killed process left half-written."""
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_log(log: Path, path: Path, metric: str) -> None:
    """Loss per step and the main evaluation metric per epoch, from ``log.jsonl``, as a PNG."""
    from matplotlib.figure import Figure

    records = read_log(log)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r and metric in r["eval"]]
    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="step", ylabel="training loss", yscale="log")
    right.plot([r["step"] for r in evals], [r["eval"][metric] for r in evals], marker="o")
    right.set(xlabel="step", ylabel=metric)
    figure.tight_layout()
    with atomic_write(path) as file:
        figure.savefig(file, format="png", dpi=100)


class RunLog:
    """Appends training and evaluation records to ``log.jsonl``, mirrors them as TensorBoard scalars (and pictures
    of predictions as images) and redraws ``plot.png``.

    ``resume_step`` continues a run: records logged after that step by the interrupted process are dropped, from
    the JSON log and (``purge_step``) from TensorBoard. Without the ``tensorboard`` package only the event files
    are missing, and one line says so.
    """

    def __init__(self, folder: Path, metric: str, tensorboard: bool = True, resume_step: int | None = None):
        self.folder, self.metric = Path(folder), metric
        self.path = self.folder / LOG
        if resume_step is not None and self.path.is_file():
            kept = [record for record in read_log(self.path) if record["step"] <= resume_step]
            with atomic_write(self.path, "w") as file:
                file.writelines(json.dumps(record) + "\n" for record in kept)
        self.writer = self._tensorboard(resume_step) if tensorboard else None

    def _tensorboard(self, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("TensorBoard event files are off: the tensorboard package is missing "
                  "(pip install 'mbbackbones[tensorboard]')")
            return None
        return SummaryWriter(str(self.folder), purge_step=resume_step)

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def train(self, record: dict) -> None:
        """A training record: ``step``, ``epoch``, ``lr``, losses, timings."""
        self._append(record)
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, numbers.Real):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def evaluation(self, step: int, epoch: int, metrics: dict, pictures: list[np.ndarray] = ()) -> None:
        """An evaluation: its metrics (logged, plotted) and RGB pictures of predictions (TensorBoard images)."""
        self._append({"step": step, "epoch": epoch, "eval": metrics})
        plot_log(self.path, self.folder / PLOT, self.metric)
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, numbers.Real):
                    self.writer.add_scalar(f"val/{key}", value, step)
            if len(pictures):
                self.writer.add_images("val/predictions", _same_size(pictures), step, dataformats="NHWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _same_size(pictures: list[np.ndarray]) -> np.ndarray:
    """Pictures padded with black to the largest height and width, stacked (TensorBoard takes one array)."""
    height, width = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
    batch = np.zeros((len(pictures), height, width, 3), dtype=np.uint8)
    for canvas, picture in zip(batch, pictures):
        canvas[:picture.shape[0], :picture.shape[1]] = picture
    return batch
