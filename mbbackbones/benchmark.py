"""Side-by-side latency of our backbones and their torchvision / timm counterparts, in one run."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import timm
import torch
import torchvision
from torch import nn

from . import MODELS
from .profile import count_madds, count_params

# our name -> the reference build of the same architecture (equal params, checked by tests)
COUNTERPARTS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "mbv3_large": ("torchvision mobilenet_v3_large", lambda: torchvision.models.mobilenet_v3_large()),
    "mbv3_large_reduced": ("torchvision mobilenet_v3_large(reduced_tail)",
                           lambda: torchvision.models.mobilenet_v3_large(reduced_tail=True)),
    "mbv3_large_075": ("timm mobilenetv3_large_075", lambda: timm.create_model("mobilenetv3_large_075")),
    "mbv3_small": ("torchvision mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small()),
    "mbv3_small_reduced": ("torchvision mobilenet_v3_small(reduced_tail)",
                           lambda: torchvision.models.mobilenet_v3_small(reduced_tail=True)),
    "mbv3_small_075": ("timm mobilenetv3_small_075", lambda: timm.create_model("mobilenetv3_small_075")),
    "mbv2_100": ("torchvision mobilenet_v2", lambda: torchvision.models.mobilenet_v2()),
    "mbv2_050": ("torchvision mobilenet_v2(0.5)", lambda: torchvision.models.mobilenet_v2(width_mult=0.5)),
    "mbv2_035": ("torchvision mobilenet_v2(0.35)", lambda: torchvision.models.mobilenet_v2(width_mult=0.35)),
    "mbv1_100": ("timm mobilenetv1_100", lambda: timm.create_model("mobilenetv1_100")),
}
# features_only rows: our model kwargs -> torchvision's equivalent feature extractor
FEATURE_ROWS = {
    "mbv3_large_reduced": ("torchvision mobilenet_v3_large(reduced_tail).features",
                           lambda: torchvision.models.mobilenet_v3_large(reduced_tail=True).features),
    "mbv3_large": ("timm mobilenetv3_large_100 features_only",
                   lambda: timm.create_model("mobilenetv3_large_100", features_only=True)),
}


def _time_ms(model: nn.Module, image: torch.Tensor) -> float:
    start = time.perf_counter()
    model(image)
    return (time.perf_counter() - start) * 1e3


@torch.inference_mode()
def latencies_ms(models: list[nn.Module], image: torch.Tensor, repeats: int, warmup: int = 5) -> list[tuple]:
    """(median, min) ms of one forward for each model, timed in alternation so drift hits all alike."""
    for _ in range(warmup):
        for model in models:
            model(image)
    times = [[_time_ms(model, image) for model in models] for _ in range(repeats)]
    return [(statistics.median(column), min(column)) for column in zip(*times)]


def compare(name: str, ours: nn.Module, reference_name: str, reference: nn.Module, image: torch.Tensor,
            repeats: int) -> dict:
    """One row: sizes of ours, and both latencies on the same input."""
    ours, reference = ours.eval(), reference.eval()
    mine, theirs = latencies_ms([ours, reference], image, repeats)
    return dict(model=name, reference=reference_name, batch=image.shape[0], size=image.shape[-1],
                params=count_params(ours), madds_m=round(count_madds(ours, image[:1]) / 1e6, 1),
                ms_median=round(mine[0], 2), ms_min=round(mine[1], 2), reference_ms_median=round(theirs[0], 2),
                reference_ms_min=round(theirs[1], 2), ratio=round(mine[0] / theirs[0], 3))


def run(names=None, batches=(1, 8), size: int = 224, repeats: int = 20) -> dict:
    """Classification rows for ``names`` (default: all with a counterpart) and the feature rows."""
    names = names or [entry.name for entry in MODELS if entry.name in COUNTERPARTS]
    rows = []
    for batch in batches:
        image = torch.randn(batch, 3, size, size)
        for name in names:
            reference_name, build = COUNTERPARTS[name]
            ours = timm.create_model(name)
            rows.append(dict(task="classify", **compare(name, ours, reference_name, build(), image, repeats)))
        for name, (reference_name, build) in FEATURE_ROWS.items():
            if name in names:
                ours = timm.create_model(name, features_only=True)
                rows.append(dict(task="features", **compare(name, ours, reference_name, build(), image, repeats)))
    machine = dict(threads=torch.get_num_threads(), torch=torch.__version__, cpu=platform.processor() or
                   platform.machine(), date=time.strftime("%Y-%m-%d"))
    return dict(machine=machine, rows=rows)


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [f"{machine['date']}, {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}", "",
             "| task | model | batch | params | MAdds | ms (median / min) | reference "
             "| ref ms (median / min) | ratio |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {r['task']} | {r['model']} | {r['batch']} | {r['params']:,} | {r['madds_m']}M | "
              f"{r['ms_median']} / {r['ms_min']} | {r['reference']} | {r['reference_ms_median']} / "
              f"{r['reference_ms_min']} | {r['ratio']}x |" for r in result["rows"]]
    return "\n".join(lines)
