"""A run's log: ``log.jsonl`` records and the loss / metric plot drawn from them."""
from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write


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
