"""One training engine for detection and segmentation: DDP, AMP, EMA, exact resume, logs and plots.

A task (``heads.tasks``) supplies the model, datasets, collate function, loss and evaluation; the
engine owns everything else. Runs under ``torchrun`` unchanged (one process per device).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from mbbackbones.choices import check_choice

from ..data import sample_seed, unwrap_worker_errors
from ..files import atomic_write
from .config import TrainConfig, to_dict
from .logs import plot_log, read_log
from .sampler import StepSampler

CHECKPOINT = "last.pt"
OPTIMIZERS = ("sgd", "adam", "adamw")


def lr_factor(step: int, total: int, warmup: int, warmup_factor: float, kind: str) -> float:
    """Linear warm-up from ``warmup_factor``, then cosine / poly(0.9) decay to 0 or constant."""
    if step < warmup:
        return warmup_factor + (1 - warmup_factor) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "poly":
        return (1 - progress) ** 0.9
    return 1.0


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return dict(zip(values, (tensor / self.world).tolist()))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def build_optimizer(model: nn.Module, cfg: TrainConfig, world: int) -> torch.optim.Optimizer:
    check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    lr = cfg.lr * cfg.global_batch * world / cfg.lr_batch
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Trainer:
    """Train ``task`` with ``cfg``; ``fit()`` returns the last evaluation metrics.

    ``callback(trainer)`` runs after every optimizer step (tests use it to stop a run mid-epoch).
    """

    def __init__(self, cfg: TrainConfig, task, resume: str | None = None, callback: Callable | None = None):
        self.cfg, self.task, self.callback = cfg, task, callback
        self.env = Distributed(cfg.device)
        self.output = Path(cfg.output)
        if self.env.main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.train_set, self.val_set = task.datasets(cfg)
        torch.manual_seed(cfg.seed)  # the same initial weights in every process and run
        model = task.model(cfg, self.train_set).to(self.env.device)
        if cfg.sync_bn and self.env.world > 1:
            if self.env.device.type != "cuda":
                raise ValueError("sync_bn needs CUDA (SyncBatchNorm does not run on CPU); set sync_bn: false")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
        self.model = nn.parallel.DistributedDataParallel(model) if self.env.world > 1 else model
        self.sampler = StepSampler(len(self.train_set), cfg.batch_size, cfg.accumulate, self.env.world,
                                   self.env.rank, cfg.seed)
        self.loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=self.sampler,
                                                  num_workers=cfg.workers, collate_fn=task.collate)
        self.optimizer = build_optimizer(model, cfg, self.env.world)
        steps = self.sampler.steps_per_epoch
        self.total_steps = min(cfg.epochs * steps, cfg.max_steps or math.inf)
        warmup = min(cfg.warmup_steps, steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, self.total_steps, warmup, cfg.warmup_factor, cfg.scheduler))
        cuda_amp = cfg.amp and self.env.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda_amp)
        self.autocast = (torch.autocast(self.env.device.type, dtype=torch.float16 if cuda_amp else torch.bfloat16)
                         if cfg.amp else nullcontext())
        self.step, self.metrics = 0, {}
        if resume:
            self.load(resume)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        state = {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                 "steps_per_epoch": self.sampler.steps_per_epoch,
                 "metrics": self.metrics, "config": to_dict(self.cfg), "class_names": list(self.train_set.class_names)}
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def save(self) -> None:
        if self.env.main:
            with atomic_write(self.output / CHECKPOINT) as file:
                torch.save(self.state(), file)

    def load(self, path: str) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist")
        try:
            state = torch.load(path, map_location=self.env.device, weights_only=True)
            if state["steps_per_epoch"] != self.sampler.steps_per_epoch:
                raise ValueError(f"it has {state['steps_per_epoch']} steps per epoch, this run "
                                 f"{self.sampler.steps_per_epoch}: keep batch_size, accumulate and the process count")
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                if "model_ema" not in state:
                    raise ValueError("it was trained without EMA; resume with ema: false")
                self.ema.module.load_state_dict(state["model_ema"])
        except (RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"cannot resume from {path}: {reason}") from None
        self.step, self.metrics = state["step"], state["metrics"]
        log = self.output / "log.jsonl"
        if self.env.main and log.is_file():  # forget what the interrupted run logged after its checkpoint
            log.write_text("".join(json.dumps(r) + "\n" for r in read_log(log) if r["step"] <= self.step))

    # -- logging -------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.env.main:
            with open(self.output / "log.jsonl", "a") as file:
                file.write(json.dumps(record) + "\n")

    # -- training ------------------------------------------------------------------------------
    def train_step(self, batches) -> dict[str, float]:
        self.model.train()
        torch.manual_seed(sample_seed(self.cfg.seed, self.step, self.env.rank))  # dropout etc.: resumable
        totals: dict[str, float] = {}
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or not isinstance(self.model, nn.parallel.DistributedDataParallel)
            with (nullcontext() if sync else self.model.no_sync()), self.autocast:
                losses = self.task.losses(self.model, batch, self.env.device)
                loss = sum(losses.values())
            if not torch.isfinite(loss) and not self.scaler.is_enabled():  # the scaler skips float16 overflows
                raise FloatingPointError(f"step {self.step}: loss is {loss.item()} ({losses}); lower lr or disable amp")
            self.scaler.scale(loss / len(batches)).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() / len(batches)
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(unwrap(self.model), step=self.step)
        totals["loss"] = sum(totals.values())
        return self.env.mean(totals)

    def micro_batches(self, epoch: int, start: int) -> Iterator[list]:
        self.sampler.set_epoch(epoch, start)
        group = []
        for batch in unwrap_worker_errors(self.loader):
            group.append(batch)
            if len(group) == self.cfg.accumulate:
                yield group
                group = []

    def fit(self) -> dict:
        steps = self.sampler.steps_per_epoch
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, steps)
            bar = tqdm(self.micro_batches(epoch, start), total=min(steps, self.total_steps - epoch * steps),
                       initial=start, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not self.env.main,
                       dynamic_ncols=True)
            for batches in bar:
                began = time.perf_counter()
                losses = self.train_step(batches)
                if self.step % self.cfg.log_every == 0 or self.step == 1:
                    self.log({"step": self.step, "epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0],
                              "seconds": round(time.perf_counter() - began, 4), **losses})
                bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.step % self.cfg.checkpoint_every == 0:
                    self.save()
                if self.callback:
                    self.callback(self)
                if self.step >= self.total_steps:
                    break
            bar.close()
            epoch_done = self.step % steps == 0
            if self.step >= self.total_steps or (epoch_done and self.cfg.eval_every and
                                                 (epoch + 1) % self.cfg.eval_every == 0):
                self.evaluate(epoch + 1)
            self.save()
        return self.metrics

    def evaluate(self, epoch: int) -> dict:
        """Evaluate the EMA (if any) or the model on rank 0, log it and redraw the plot."""
        model = self.ema.module if self.ema is not None else unwrap(self.model)
        if self.cfg.bn_recalibrate:  # on every process (SyncBatchNorm layers talk to each other), same batches
            self.sampler.set_epoch(epoch - 1)  # whether or not the run was resumed
            recalibrate_bn(model, self.loader, self.task, self.env.device, self.cfg.bn_recalibrate)
        if self.env.main:
            self.metrics = self.task.evaluate(model, self.val_set, self.cfg, self.env.device, self.output)
            self.log({"step": self.step, "epoch": epoch, "eval": self.metrics})
            plot_log(self.output / "log.jsonl", self.output / "plot.png", self.task.main_metric)
        self.env.barrier()
        return self.metrics


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, task, device, batches: int) -> None:
    """Re-estimate BatchNorm running statistics for the current weights (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, batch in enumerate(unwrap_worker_errors(loader)):
        if i == batches:
            break
        task.forward_images(model, batch, device)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
