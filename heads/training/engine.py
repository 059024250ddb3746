"""The training loop shared by detection and segmentation: DDP, AMP, EMA, exact resume, run folders, logs and
plots.

A task (``heads.training.tasks``) supplies the model, datasets, collate function, loss and evaluation; the
engine owns everything else. Runs under ``torchrun`` unchanged (one process per device); its entry points are in
``heads.training.launch``.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from mbbackbones.checkpoint import CheckpointError, load_file

from ..data import sample_seed, unwrap_worker_errors
from ..files import atomic_write, mount_point, no_space_left
from .config import ConfigError, TrainConfig, to_dict
from .distributed import Distributed, unwrap
from .logs import LOG, PLOT, RunLog
from .run import RunError, claim, lock_for_resume
from .sampler import StepSampler

CHECKPOINT = "last.pt"
BEST = "best.pt"
CONFIG = "config.yaml"


def run_folder(resume: str | os.PathLike) -> Path:
    """The folder of the run that ``resume`` (its folder or a checkpoint in it) names."""
    folder = Path(resume)
    if folder.is_file():
        return folder.parent
    if not (folder / CHECKPOINT).is_file():
        raise RunError(f"nothing to resume in {folder}: no {CHECKPOINT}")
    return folder


def _tensor_bytes(value) -> int:
    """The bytes of the tensors in ``value`` (nested dicts, lists and tuples): about what ``torch.save`` writes."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(map(_tensor_bytes, value.values()))
    return sum(map(_tensor_bytes, value)) if isinstance(value, (list, tuple)) else 0


def _model_name(config: dict) -> str:
    """The model a config trains: its registered name and constructor arguments."""
    return f"{config['model']} {config['model_kwargs']}"


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


def build_optimizer(model: nn.Module, cfg: TrainConfig, world: int) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW at ``cfg.lr`` scaled linearly from ``cfg.lr_batch`` to the global batch, with torch's
    fused kernels (one step for all parameters) on CPUs and GPUs."""
    lr = cfg.lr * cfg.global_batch * world / cfg.lr_batch
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].device.type in ("cpu", "cuda")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)


class Trainer:
    """Train ``task`` with ``cfg`` into a run folder; ``fit()`` returns the last evaluation metrics.

    Everything that can fail on bad input (config, data, model, weights, the checkpoint to resume) is checked
    before the run folder is touched. A new run takes ``cfg.output``, or the next free ``<output>-N`` when that
    holds another run; ``resume`` (a checkpoint or run folder) continues that run in its own folder. The folder is
    locked while the run lives. ``callback(trainer)`` runs after every optimizer step (tests use it to stop a run).
    """

    def __init__(self, cfg: TrainConfig, task, resume: str | os.PathLike | None = None,
                 callback: Callable | None = None):
        self.cfg, self.task, self.callback = cfg, task, callback
        task.check(cfg)
        self.env = Distributed(cfg.device)
        self.train_set, self.val_set = task.datasets(cfg)
        torch.manual_seed(cfg.seed)  # the same initial weights in every process and run
        model = task.model(cfg, self.train_set).to(self.env.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.env.world > 1:
            if self.env.device.type != "cuda":
                raise ConfigError("sync_bn needs CUDA (SyncBatchNorm does not run on CPU); set sync_bn: false")
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
        self.step, self.metrics, self.best = 0, {}, None
        self.saved_step = None  # the step of the last checkpoint written or resumed from
        self.output, self.lock = self._folder(resume)
        self.log = None
        try:
            if resume:
                self.load(Path(resume) if Path(resume).is_file() else self.output / CHECKPOINT)
            elif self.env.main:
                with atomic_write(self.output / CONFIG, "w") as file:
                    yaml.safe_dump(to_dict(cfg), file, sort_keys=False)
            if self.env.main:
                self.log = RunLog(self.output, task.main_metric, cfg.tensorboard, self.step if resume else None)
        except BaseException:
            self.close()
            raise

    def _folder(self, resume):
        """The run folder (a new one claimed by rank 0 and told to the others, or the one to resume) and its lock."""
        lock = None
        if resume:
            folder = run_folder(resume)
            if self.env.main:
                lock = lock_for_resume(folder)
        elif self.env.main:
            folder, lock = claim(Path(self.cfg.output))
            if folder != Path(self.cfg.output):
                print(f"{self.cfg.output} holds another run: this run writes {folder}")
        else:
            folder = None
        return Path(self.env.broadcast(str(folder))), lock

    # -- checkpoints ---------------------------------------------------------------------------
    def meta(self) -> dict:
        """The model's metadata, with the metrics of the last evaluation and where its recipe is."""
        meta = dict(unwrap(self.model).meta, recipe=str(self.output / CONFIG))
        if self.metrics:
            meta["metrics"] = {f"{self.cfg.dataset}/{self.cfg.val_split}": self.metrics}
        return meta

    def state(self) -> dict:
        state = {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                 "steps_per_epoch": self.sampler.steps_per_epoch, "metrics": self.metrics, "best": self.best,
                 "config": to_dict(self.cfg), "class_names": list(self.train_set.class_names), "meta": self.meta()}
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def _write(self, name: str, state: dict) -> None:
        """``state`` into the run folder's ``name``, which stays as it was when that fails: a full disk or another
        reason to be unable to write is one line (a ``RunError``)."""
        path = self.output / name
        try:
            with atomic_write(path) as file:
                torch.save(state, file)
        except (OSError, RuntimeError) as error:
            size = _tensor_bytes(state)
            if name == CHECKPOINT and self.saved_step is not None:
                kept = f"the previous {name} (step {self.saved_step}) is intact"
            else:
                kept = f"the previous {name} is intact" if path.is_file() else f"no {name} was written"
            if no_space_left(error, self.output, size):
                free = shutil.disk_usage(self.output).free
                raise RunError(f"no space left on {mount_point(self.output)} (the disk of {self.output}): could not "
                               f"write {path} ({free / 2**20:.1f} MiB free, about {size / 2**20:.1f} MiB needed); "
                               f"{kept}: free some space, then resume") from None
            if isinstance(error, RuntimeError):
                raise  # a bug in what is written, not the disk
            raise RunError(f"could not write {path}: {error.strerror or error}; {kept}") from None

    def save(self) -> None:
        self._stop_unless_finite()
        if self.env.main:
            self._write(CHECKPOINT, self.state())
            self.saved_step = self.step

    def _stop_unless_finite(self) -> None:
        """A ``FloatingPointError`` when an update has overflowed the weights (or the EMA's): they are then neither
        saved nor evaluated, and the last checkpoint stays as it is. Every process checks its own (equal) copy."""
        models = {"": unwrap(self.model), "EMA ": self.ema.module if self.ema is not None else None}
        broken = [f"{prefix}{name}" for prefix, model in models.items() if model is not None
                  for name, value in model.state_dict().items()
                  if value.is_floating_point() and not value.isfinite().all()]
        if not broken:
            return
        kept = (f"{self.output / CHECKPOINT} is kept from step {self.saved_step}" if self.saved_step is not None
                else f"no {CHECKPOINT} was written")
        raise FloatingPointError(f"the weights are not finite after step {self.step} ({len(broken)} tensors, the "
                                 f"first {broken[0]}): {kept}; lower lr or set grad_clip, and start a new run")

    def save_best(self, model: nn.Module) -> None:
        """``best.pt``: the evaluated weights (the EMA's when there is one) and the metadata, to load or predict."""
        self._write(BEST, {"model": model.state_dict(), "meta": self.meta(), "step": self.step,
                           "config": to_dict(self.cfg)})

    def load(self, path: Path) -> None:
        try:
            state = load_file(path)
            trained = _model_name(state["config"])
            if trained != _model_name(to_dict(self.cfg)):
                raise CheckpointError(f"it holds a {trained}, this run trains {_model_name(to_dict(self.cfg))}")
            if state["steps_per_epoch"] != self.sampler.steps_per_epoch:
                raise CheckpointError(f"it has {state['steps_per_epoch']} steps per epoch, this run "
                                      f"{self.sampler.steps_per_epoch}: keep batch_size, accumulate and the process "
                                      "count")
            if self.ema is not None and "model_ema" not in state:
                raise CheckpointError("it was trained without EMA; resume with ema: false")
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["model_ema"])
        except (KeyError, RuntimeError, CheckpointError) as error:  # a file of another run, model or version
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"cannot resume from {path}: {reason}") from None
        self.step, self.metrics, self.best = state["step"], state["metrics"], state.get("best")
        self.saved_step = self.step

    # -- training ------------------------------------------------------------------------------
    def train_step(self, batches) -> dict[str, float]:
        self.model.train()
        torch.manual_seed(sample_seed(self.cfg.seed, self.step, self.env.rank))  # dropout etc.: resumable
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or not isinstance(self.model, nn.parallel.DistributedDataParallel)
            with (nullcontext() if sync else self.model.no_sync()), self.autocast:
                losses = self.task.losses(self.model, batch, self.env.device)
                loss = sum(losses.values())
            self.scaler.scale(loss / len(batches)).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / len(batches)
        # one all-reduce for the logged means and the count of processes whose loss is not finite
        values = torch.stack([*totals.values(), (~torch.isfinite(sum(totals.values()))).float()])
        values = self.env.sum(values.double())
        *means, nonfinite = (values / torch.tensor([self.env.world] * len(totals) + [1.0], dtype=values.dtype,
                                                   device=values.device)).tolist()
        if nonfinite and not self.scaler.is_enabled():  # the scaler skips float16 overflows itself
            detail = ", ".join(f"{name} {value:.4g}" for name, value in zip(totals, means))
            raise FloatingPointError(f"step {self.step}: the loss is not finite in {int(nonfinite)} of "
                                     f"{self.env.world} process(es) ({detail}); lower lr, set grad_clip or turn "
                                     "amp off")
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
        record = dict(zip(totals, means))
        record["loss"] = sum(means)
        return record

    def micro_batches(self, epoch: int, start: int, stop: int) -> Iterator[list]:
        self.sampler.set_epoch(epoch, start, stop)
        group = []
        for batch in unwrap_worker_errors(self.loader):
            group.append(batch)
            if len(group) == self.cfg.accumulate:
                yield group
                group = []

    def fit(self) -> dict:
        steps = self.sampler.steps_per_epoch
        try:
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, steps)
                stop = min(steps, self.total_steps - epoch * steps)
                bar = tqdm(self.micro_batches(epoch, start, stop), total=stop, initial=start,
                           desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not self.env.main, dynamic_ncols=True)
                for batches in bar:
                    began = time.perf_counter()
                    losses = self.train_step(batches)
                    if self.env.main and (self.step % self.cfg.log_every == 0 or self.step == 1):
                        self.log.train({"step": self.step, "epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0],
                                        "seconds": round(time.perf_counter() - began, 4), **losses})
                    bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                    if self.step % self.cfg.checkpoint_every == 0:
                        self.save()
                    if self.callback:
                        self.callback(self)
                bar.close()
                epoch_done = self.step % steps == 0
                if self.step >= self.total_steps or (epoch_done and self.cfg.eval_every and
                                                     (epoch + 1) % self.cfg.eval_every == 0):
                    self.evaluate(epoch + 1)
                self.save()
        finally:
            self.close()
        return self.metrics

    def evaluate(self, epoch: int) -> dict:
        """Evaluate the EMA (if any) or the model, every process on its share of the validation set; log and plot
        the metrics, draw a few predictions, and keep ``best.pt`` when the main metric improves."""
        self._stop_unless_finite()
        model = self.ema.module if self.ema is not None else unwrap(self.model)
        if self.cfg.bn_recalibrate:  # on every process (SyncBatchNorm layers talk to each other), same batches
            self.sampler.set_epoch(epoch - 1)  # whether or not the run was resumed
            recalibrate_bn(model, self.loader, self.task, self.env.device, self.cfg.bn_recalibrate)
        if self.env.main:
            print(f"evaluation after epoch {epoch}/{self.cfg.epochs} (step {self.step}):")
        self.metrics = self.task.evaluate(model, self.val_set, self.cfg, self.env,
                                          self.output if self.env.main else None)
        if self.env.main:
            pictures = self.task.pictures(model, self.val_set, self.env.device) if self.log.writer else []
            self.log.evaluation(self.step, epoch, self.metrics, pictures)
            score = self.task.score(self.metrics)
            if score is None:
                print(f"{self.task.main_metric}: no ground truth in the evaluated images; {BEST} is not updated")
            elif self.best is None or score > self.best:
                self.best = score
                self.save_best(model)
        self.env.barrier()
        return self.metrics

    def close(self) -> None:
        """Flush the logs and release the run folder."""
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()

    def summary(self) -> str:
        """Where everything went, and the final score."""
        score = self.task.score(self.metrics)
        if score is not None:
            score = f"{score:.4f}"
        elif self.task.main_metric in self.metrics:
            score = "no ground truth"
        best = "none" if self.best is None else f"{self.best:.4f}"
        curves = f"{self.output / PLOT}, {self.output / LOG}"
        if self.log is not None and self.log.writer is not None:
            curves += f", TensorBoard (tensorboard --logdir {self.output})"
        return "\n".join([
            f"done: {self.step} steps; {self.task.main_metric} = {score or 'not evaluated'} (best {best})",
            f"  run folder  {self.output}",
            f"  weights     {self.output / BEST} (best), {self.output / CHECKPOINT} (last, to resume)",
            f"  curves      {curves}",
            f"  evaluation  {', '.join(str(self.output / name) for name in self.task.outputs)}",
            f"  data        {self.task.data_location(self.train_set)}"])


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, task, device, batches: int) -> None:
    """Re-estimate BatchNorm running statistics for the current weights (cumulative average); frozen layers' stay."""
    model.train()  # frozen BatchNorm stays in eval mode (TaskModel.train)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    for i, batch in enumerate(unwrap_worker_errors(loader)):
        if i == batches:
            break
        task.forward_images(model, batch, device)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
