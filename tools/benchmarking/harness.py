"""Side-by-side latency of our models and their torchvision / timm counterparts, timed in alternation in one run.

A :class:`Workload` is one piece of work (same input, same result) done by a reference and by one or
more variants of ours; :func:`measure` times all of them in alternation, so load from other processes
hits each alike and the ratios stay meaningful on a shared machine.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from functools import partial
from typing import Callable, Iterable, Iterator, NamedTuple

import timm
import torch
import torchvision
from torch import nn

from mbbackbones import ENTRIES, MODELS
from mbbackbones.profile import count_madds, count_params
from mbbackbones.registry import Reference

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
    **{f"mbv4_{variant}": (f"timm mobilenetv4_{variant}", lambda variant=variant: timm.create_model(
        f"mobilenetv4_{variant}")) for variant in ("conv_small", "conv_medium", "conv_large", "hybrid_medium",
                                                    "hybrid_large")},
}
# features_only rows: our model kwargs -> torchvision's equivalent feature extractor
FEATURE_ROWS = {
    "mbv3_large_reduced": ("torchvision mobilenet_v3_large(reduced_tail).features",
                           lambda: torchvision.models.mobilenet_v3_large(reduced_tail=True).features),
    "mbv3_large": ("timm mobilenetv3_large_100 features_only",
                   lambda: timm.create_model("mobilenetv3_large_100", features_only=True)),
}
EAGER_TARGET = 1.0  # PyTorch eager: ours at most as slow as the reference
OUTSIDE_TARGET = 0.10  # a Predictor: at most this share of its time outside the model (runtime) call


class Contender(NamedTuple):
    """One variant of ours on a workload: a call doing the work, the model's size and the speed target."""

    model: str
    call: Callable[[], object]
    params: int
    madds_m: float | None  # per image
    variant: str = "eager"
    target: float | None = None  # the ratio to the reference to stay under


class Workload(NamedTuple):
    """The same work done by a reference and each contender, timed in alternation."""

    task: str
    input: str
    batch: int
    reference: str
    reference_call: Callable[[], object]
    contenders: tuple[Contender, ...]
    published: Reference | None = None  # numbers published for the same configuration
    training: bool = False  # otherwise timed under inference mode
    warmup: int = 5


def _compiled(model: nn.Module) -> nn.Module:
    model.compile()  # compiles on the first call, i.e. during the warm-up
    return model


# our optional variants: name -> what turns a copy of the model into it
VARIANTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "channels_last": lambda model: model.to(memory_format=torch.channels_last),
    "compiled": _compiled,
}


def model_variants(model: nn.Module, extra: Iterable[str] = ()) -> dict[str, nn.Module]:
    """``{"eager": model}`` and a copy of it made into each ``extra`` variant (see :data:`VARIANTS`)."""
    return {"eager": model, **{name: VARIANTS[name](copy.deepcopy(model)) for name in extra}}


def contenders(name: str, model: nn.Module, inputs, extra: Iterable[str] = (),
               target: float | None = EAGER_TARGET) -> tuple[Contender, ...]:
    """``model(inputs)`` in eval mode for each of :func:`model_variants` (the target binds eager only).

    MAdds are counted on ``inputs[:1]`` (one image).
    """
    model = model.eval()
    size = dict(params=count_params(model), madds_m=round(count_madds(model, inputs[:1]) / 1e6, 1))
    return tuple(Contender(name, partial(variant, inputs), variant=label, target=target if label == "eager" else None,
                           **size) for label, variant in model_variants(model, extra).items())


def published(entries, name: str) -> Reference | None:
    """The first paper reference of a registered model of ``entries`` (mbbackbones' or heads'), else its first."""
    references = entries[name].references
    return next((r for r in references if "paper" in r.source), references[0] if references else None)


def backbone_workloads(names: Iterable[str] | None = None, batches=(1, 8), size: int = 224,
                       extra: Iterable[str] = (), warmup: int = 5,
                       tasks=("classify", "features")) -> Iterator[Workload]:
    """Classification rows for ``names`` (default: all with a counterpart), then the feature rows."""
    names = list(names or [entry.name for entry in MODELS if entry.name in COUNTERPARTS])
    for batch in batches:
        image = torch.randn(batch, 3, size, size)
        common = dict(input=f"{size}x{size}", batch=batch, warmup=warmup)
        for name in names if "classify" in tasks else ():
            reference_name, build = COUNTERPARTS[name]
            yield Workload("classify", reference=reference_name, reference_call=partial(build().eval(), image),
                           contenders=contenders(name, timm.create_model(name), image, extra),
                           published=published(ENTRIES, name), **common)
        for name, (reference_name, build) in FEATURE_ROWS.items():
            if name in names and "features" in tasks:
                ours = timm.create_model(name, features_only=True)
                yield Workload("features", reference=reference_name, reference_call=partial(build().eval(), image),
                               contenders=contenders(name, ours, image, extra), **common)


def _time_ms(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def latencies_ms(calls: list[Callable[[], object]], repeats: int, warmup: int = 5,
                 budget_s: float = float("inf")) -> list[tuple[float, float]]:
    """(median, min) ms of each call, timed in alternation so drift hits all alike.

    Stops after ``budget_s`` seconds of timed rounds once three rounds are done.
    """
    for _ in range(warmup):
        for call in calls:
            call()
    times, start = [], time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        times.append([_time_ms(call) for call in calls])
    return [(statistics.median(column), min(column)) for column in zip(*times)]


def outside_share(call: Callable[[], object], repeats: int = 5) -> float | None:
    """The median share of a ``heads.Predictor`` call's time spent outside its model (or runtime) call, from its
    results' timings (decoding, resizing, mapping the results back); None for a call that returns no such results."""
    shares = []
    for _ in range(repeats):
        results = call()
        if not isinstance(results, list) or not all(getattr(result, "timings", None) for result in results):
            return None
        shares += [1 - result.timings.model_ms / result.timings.total_ms for result in results]
    return statistics.median(shares)


def measure(workload: Workload, repeats: int, budget_s: float = float("inf")) -> list[dict]:
    """One row per contender: its size, its latency and the reference's, their ratio, and for a Predictor the share
    of its time outside the model call."""
    calls = [workload.reference_call, *(c.call for c in workload.contenders)]
    with torch.inference_mode(not workload.training):
        (reference_median, reference_min), *ours = latencies_ms(calls, repeats, workload.warmup, budget_s)
        outside = [None if workload.training else outside_share(c.call) for c in workload.contenders]
    rows = []
    for contender, (median, low), share in zip(workload.contenders, ours, outside):
        row = dict(task=workload.task, model=contender.model, variant=contender.variant, input=workload.input,
                   batch=workload.batch, params=contender.params, madds_m=contender.madds_m,
                   published=workload.published._asdict() if workload.published else None,
                   ms_median=round(median, 2), ms_min=round(low, 2), reference=workload.reference,
                   reference_ms_median=round(reference_median, 2), reference_ms_min=round(reference_min, 2),
                   ratio=round(median / reference_median, 3), ratio_min=round(low / reference_min, 3),
                   target=contender.target)
        if workload.training:
            row.update(images_per_s=round(workload.batch * 1e3 / median, 2),
                       reference_images_per_s=round(workload.batch * 1e3 / reference_median, 2))
        elif contender.madds_m:  # two flops per multiply-add, over the whole call (pre- and post-processing too)
            row["gflops"] = round(2 * contender.madds_m * 1e6 * workload.batch / (median / 1e3) / 1e9, 1)
        if share is not None:
            row["outside"] = round(share, 3)
        rows.append(row)
    return rows


def sgemm_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The best float32 matrix-multiply rate of this machine with torch's threads: the practical compute ceiling."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_time_ms(lambda: a @ b) for _ in range(repeats))
    return round(2 * size**3 / (best / 1e3) / 1e9, 1)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    return dict(threads=torch.get_num_threads(), torch=torch.__version__, cpu=cpu_name(),
                load_average=os.getloadavg()[0], date=time.strftime("%Y-%m-%d"), sgemm_gflops=sgemm_peak_gflops())


def run(workloads: Iterable[Workload], repeats: int = 20, budget_s: float = float("inf")) -> dict:
    """Time each workload as it is built (one set of models in memory at a time)."""
    info = machine()  # the load average before we add to it
    return dict(machine=info, rows=[row for workload in workloads for row in measure(workload, repeats, budget_s)])


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value / 1e6:.2f}M" if unit == "params" else f"{value:g}{unit}"


def _ratio(row: dict) -> str:
    text = f"{row['ratio']}x / {row['ratio_min']}x"
    if row["target"] is not None:
        text += f" ({'meets' if row['ratio'] <= row['target'] else 'misses'} ≤ {row['target']}x)"
    return text


def _outside(row: dict) -> str:
    if "outside" not in row:
        return "—"
    verdict = "meets" if row["outside"] <= OUTSIDE_TARGET else "misses"
    return f"{100 * row['outside']:.1f}% ({verdict} ≤ {100 * OUTSIDE_TARGET:.0f}%)"


def markdown(result: dict) -> str:
    """One table per task; published numbers cite their sources below the table."""
    info = result["machine"]
    peak = info["sgemm_gflops"]
    lines = [f"{info['date']}, {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
             f"load average {info['load_average']:.2f} at start, sgemm peak {peak} GFLOP/s"]
    for task in dict.fromkeys(row["task"] for row in result["rows"]):
        rows = [row for row in result["rows"] if row["task"] == task]
        sources = list(dict.fromkeys(row["published"]["source"] for row in rows if row["published"]))
        training = "images_per_s" in rows[0]
        header = ["model", "variant", "input", "batch", "params", "MAdds", "published params / MAdds (metric)",
                  "ms (median / min)", "reference", "ref ms (median / min)", "ratio (median / min)"]
        header += ["img/s (ours / ref)"] if training else ["GFLOP/s (% of sgemm peak)"]
        outside = any("outside" in row for row in rows)
        header += ["outside the model call"] * outside
        lines += ["", f"### {task}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join("---" if h in ("model", "variant", "input", "reference") else "---:" for h in header)
                  + "|"]
        for row in rows:
            published = row["published"]
            cited = (f"{_number(published['params'], 'params')} / {_number(published['madds_m'], 'M')} "
                     f"({_number(published['metric'])}) [{sources.index(published['source']) + 1}]"
                     ) if published else "—"
            cells = [row["model"], row["variant"], row["input"], row["batch"], f"{row['params']:,}",
                     _number(row["madds_m"], "M"), cited, f"{row['ms_median']} / {row['ms_min']}", row["reference"],
                     f"{row['reference_ms_median']} / {row['reference_ms_min']}", _ratio(row)]
            if training:
                cells.append(f"{row['images_per_s']} / {row['reference_images_per_s']}")
            else:
                cells.append(f"{row['gflops']} ({100 * row['gflops'] / peak:.0f}%)" if row.get("gflops") else "—")
            if outside:
                cells.append(_outside(row))
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines += [""] * bool(sources) + [f"[{i}] {source}" for i, source in enumerate(sources, 1)]
    return "\n".join(lines)
