"""The training loop: one optimizer step per batch, AMP and gradient clipping, DDP, logging, evaluation,
atomic checkpoints and exact resume.

`last.pt` is an ordinary segmenter checkpoint (segment.checkpoint format, so `load_checkpoint` and the render app
read it) with the full training state beside the weights: optimizer, scheduler, grad scaler, every process's RNG
states, the iteration and the data stream's position. Everything in it is tensors or plain Python values, so it
loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import inspect
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.outputs import AtomicOutput, HeldStopSignals
from segment.checkpoint import FORMAT, read_file, save_checkpoint
from segment.distributed import DistInfo, barrier, mean_over_processes
from segment.errors import CheckpointError, SegmentError
from segment.loader import BatchStream
from segment.model import MaskRCNN

LAST = "last.pt"
FINAL = "model_final.pt"
METRICS = "metrics.jsonl"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_KEYS = ("boxes", "labels", "masks")
HEADLINE_METRICS = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")  # printed; metrics.jsonl gets all
Evaluator = Callable[[MaskRCNN], dict[str, float]]


# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers (the old name: a FutureWarning from every
# process at every launch). The new one still copies rank 0's buffers once at the start, as it does the parameters:
# harmless, the processes build the same ones
_DDP_ARGUMENTS = inspect.signature(DistributedDataParallel).parameters
_SYNC_BUFFERS = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGUMENTS else "broadcast_buffers"


class TrainingError(SegmentError):
    """Training cannot go on (the loss diverged, a checkpoint does not belong to this run)."""


@dataclass
class TrainSettings:
    output_dir: Path
    max_iters: int
    amp: str = "none"                 # none | bf16 | fp16 (fp16 with a GradScaler)
    clip_grad_norm: float = 0.0       # <= 0: no clipping
    log_every: int = 20
    checkpoint_every: int = 1000      # <= 0: only at the end
    eval_every: int = 0               # <= 0: never (an evaluator is needed otherwise)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.amp not in ("none", *AMP_DTYPES):
            raise TrainingError(f"amp={self.amp!r} is not one of none, bf16, fp16")
        if self.max_iters < 1 or self.log_every < 1:
            raise TrainingError(f"max_iters and log_every must be >= 1, got {self.max_iters}, {self.log_every}")


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _due(iteration: int, every: int) -> bool:
    return every > 0 and iteration % every == 0


def _fixed_settings(run_config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The run settings a checkpoint's state holds, by dotted key: the optimizer's and scheduler's (learning rate,
    momentum, decay, warm-up, steps; the images per iteration over all processes the learning rate was scaled for)
    the data position's (the seed behind the data order and augmentation) and the grad scaler's (amp: only fp16 has
    one, so a checkpoint of another amp holds none to load). max_iters is not among them: running a stopped training
    further is what resume is for."""
    flat = {f"schedule.{key}": value for key, value in (run_config.get("schedule") or {}).items()}
    flat.pop("schedule.max_iters", None)
    for key in ("seed", "amp"):
        if key in run_config:
            flat[key] = run_config[key]
    if "batch_size" in run_config:
        flat["images per iteration (batch_size x processes)"] = run_config["batch_size"] * world_size
    return flat


def changed_run_settings(saved: dict[str, Any], saved_world_size: int, current: dict[str, Any],
                         world_size: int) -> list[str]:
    """Each `_fixed_settings` key that a resume would change (of those both runs record), as "key old -> new"."""
    before, after = _fixed_settings(saved, saved_world_size), _fixed_settings(current, world_size)
    return [f"{key} {before[key]} -> {after[key]}" for key in sorted(before.keys() & after.keys())
            if before[key] != after[key]]


def _drop_metrics_after(path: Path, iteration: int) -> None:
    """Cuts metrics.jsonl back to `iteration`: a run resumed from there logs the iterations after it again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the run was killed
            continue
        if isinstance(entry, dict) and entry.get("iter", 0) <= iteration:
            kept.append(line + "\n")
    with AtomicOutput(path, overwrite=True) as temp:
        temp.write_text("".join(kept), encoding="utf-8")


# ---- RNG state as tensors and plain values (weights_only-loadable) ----

def rng_state(device: torch.device) -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"], "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    """Every RNG the training draws from (torch's CPU and this device's, Python's, numpy's) as it was before."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains `model` (our MaskRCNN) for `settings.max_iters` iterations from the batches of `stream`.

    `stream` yields (images, targets) as the data package's collate makes them; only rank 0 writes files and
    prints. Call `resume(path)` before `fit()` to continue a run.
    """

    def __init__(
        self, model: MaskRCNN, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
        stream: BatchStream, settings: TrainSettings, info: DistInfo = DistInfo(), *,
        evaluator: Evaluator | None = None, run_config: dict | None = None, images_per_iteration: int | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stream = stream
        self.settings = settings
        self.info = info
        self.evaluator = evaluator
        self.run_config = run_config or {}
        self.device = info.device
        self.images_per_iteration = images_per_iteration
        # only a trainable BN's running statistics change while training; broadcasting constant buffers every step
        # costs a collective and, by writing into them, would remake the frozen BNs' scale and shift each step
        updated_buffers = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.network = (
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                    **{_SYNC_BUFFERS: updated_buffers})
            if info.distributed else model
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.amp == "fp16")
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.iteration = 0
        # what a stopped run has on disk, for its message: each set in one held block with the file's rename, so
        # that a stop signal the rename held back finds it set
        self.saved_iteration: int | None = None  # last.pt's (written by this run, or the one it resumed from)
        self.finished = False  # this process's outputs are complete (rank 0: model_final.pt is in place)
        self.loss_names: list[str] | None = None
        self.history: list[dict[str, Any]] = []  # what went to metrics.jsonl (rank 0), for callers and tests
        if info.is_main:
            settings.output_dir.mkdir(parents=True, exist_ok=True)

    # ---- one step ----

    def _to_device(self, batch: tuple[list[Tensor], list[dict]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        images, targets = batch
        non_blocking = self.device.type == "cuda"
        images = [image.to(self.device, non_blocking=non_blocking) for image in images]
        targets = [{k: t[k].to(self.device, non_blocking=non_blocking) for k in TARGET_KEYS} for t in targets]
        return images, targets

    def train_step(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """Forward, backward, optimizer and scheduler step; returns the detached losses (names, then total)
        without synchronising with the device."""
        dtype = AMP_DTYPES.get(self.settings.amp)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            losses = self.network(images, targets)
        if self.loss_names is None:
            self.loss_names = sorted(losses)
        total = sum(losses[name].float() for name in self.loss_names)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.settings.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return torch.stack([losses[name].detach().float() for name in self.loss_names] + [total.detach()])

    # ---- the loop ----

    def fit(self) -> list[dict[str, Any]]:
        s, main = self.settings, self.info.is_main
        if self.iteration >= s.max_iters and (s.output_dir / FINAL).is_file():
            if main:  # a finished run started again (a scheduler's retry): its files stay as they are
                print(f"{s.output_dir} is already trained for schedule.max_iters={s.max_iters} iterations: "
                      "nothing to do")
            self.finished = True
            return self.history
        start_iteration = self.iteration
        bar = tqdm(total=s.max_iters, initial=start_iteration, desc="train", dynamic_ncols=True,
                   disable=None if main else True, file=sys.stderr)
        self.model.train()
        started = window_start = time.perf_counter()
        window_sum: Tensor | None = None
        window_iters = 0
        try:
            while self.iteration < s.max_iters:
                lr = self.optimizer.param_groups[0]["lr"]
                values = self.train_step(*self._to_device(next(self.stream)))
                self.iteration += 1
                window_sum = values if window_sum is None else window_sum + values
                window_iters += 1
                bar.update(1)
                last = self.iteration == s.max_iters
                if _due(self.iteration, s.log_every) or last:
                    now = time.perf_counter()
                    entry = self._log(window_sum / window_iters, lr, window_iters, now - window_start, now - started)
                    bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
                    window_sum, window_iters, window_start = None, 0, time.perf_counter()
                paused = time.perf_counter()
                # saving first: an evaluation that fails must not take the checkpoint due with it
                if _due(self.iteration, s.checkpoint_every) or last:
                    self._check_finite(None if window_sum is None else window_sum / window_iters)
                    self.save(s.output_dir / LAST)
                if _due(self.iteration, s.eval_every) or (last and s.eval_every > 0):
                    self.evaluate()
                window_start += time.perf_counter() - paused  # evaluating and saving are not training throughput
        finally:
            bar.close()
        with HeldStopSignals():
            if main:
                save_checkpoint(self.model, s.output_dir / FINAL, extra={"iteration": self.iteration})
            self.finished = True
        return self.history

    def _log(self, mean_losses: Tensor, lr: float, iters: int, seconds: float, elapsed: float) -> dict[str, Any]:
        values = mean_over_processes(mean_losses, self.info).tolist()  # the one host sync per logging window
        self._check_losses(values)
        names = [*self.loss_names, "loss"]
        entry = {"type": "train", "iter": self.iteration, "epoch": self.stream.epoch, "lr": lr,
                 **dict(zip(names, values)), "time": round(elapsed, 3)}
        if self.images_per_iteration:
            entry["images_per_s"] = round(iters * self.images_per_iteration / max(seconds, 1e-9), 3)
        if self.info.is_main:
            losses = "  ".join(f"{n.removeprefix('loss_')} {v:.4f}" for n, v in zip(names[:-1], values))
            speed = f"  {entry['images_per_s']:.2f} img/s" if "images_per_s" in entry else ""
            tqdm.write(f"iter {self.iteration}/{self.settings.max_iters}  loss {values[-1]:.4f}  ({losses})"
                       f"  lr {lr:.2e}{speed}", file=sys.stdout)
            self._append_metrics(entry)
        return entry

    def _check_finite(self, mean_losses: Tensor | None) -> None:
        """Collective, before each checkpoint: the losses since the last logging window (None: none since) and the
        weights must be finite. `_log` alone checked the loss, so a checkpoint due between two logging windows wrote
        NaN weights over the last good last.pt. Every process decides on the same values, as in `_log`: none is left
        waiting in the next collective."""
        weights_finite = torch.stack([p.detach().isfinite().all() for p in self.parameters]).all()
        # the weights' verdict as a value that the mean over processes keeps non-finite: NaN when any is not
        weights = torch.where(weights_finite, 0.0, math.nan).reshape(1)
        values = mean_over_processes(weights if mean_losses is None else torch.cat([mean_losses, weights]),
                                     self.info).tolist()
        self._check_losses(values[:-1])
        if not math.isfinite(values[-1]):
            raise self._diverged(f"the weights became non-finite by iteration {self.iteration}")

    def _check_losses(self, values: list[float]) -> None:
        if not all(math.isfinite(v) for v in values):
            raise self._diverged(f"the loss became non-finite by iteration {self.iteration} ({values})")

    def _diverged(self, what: str) -> TrainingError:
        """The error that stops a diverged run, naming the last good checkpoint it leaves, if any."""
        last = self.settings.output_dir / LAST
        # a resume keeps the checkpoint's schedule (base_lr included): a lower lr starts a run from its weights
        kept = "" if self.saved_iteration is None else (
            f"; {last} (iteration {self.saved_iteration}) is kept: resume=true with clip_grad_norm continues it, or "
            f"segment.checkpoint={last} with a lower schedule.base_lr trains on from it into another output_dir")
        return TrainingError(f"{what}; lower the learning rate, lengthen warm-up or set clip_grad_norm{kept}")

    def evaluate(self) -> dict[str, float] | None:
        """Collective: rank 0 evaluates the bare model (with its evaluator) while the other processes wait."""
        metrics = None
        if self.info.is_main and self.evaluator is not None:
            self.model.eval()
            try:
                # an evaluator's draws (a DataLoader's seed, say) would shift the sampling of every later step: the
                # training would depend on eval_every, and a resume from the checkpoint saved just before an
                # evaluation would go another way than the run it continues
                with _rng_kept(self.device):
                    metrics = self.evaluator(self.model)
            finally:
                self.model.train()
            headline = [k for k in HEADLINE_METRICS if k in metrics] or list(metrics)
            summary = "  ".join(f"{k} {metrics[k]:.4f}" for k in headline if isinstance(metrics[k], (int, float)))
            tqdm.write(f"eval @ iter {self.iteration}: {summary}", file=sys.stdout)
            self._append_metrics({"type": "eval", "iter": self.iteration, **metrics})
        barrier(self.info)
        return metrics

    def _append_metrics(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        with open(self.settings.output_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    # ---- checkpoints ----

    def _all_rng_states(self) -> list[dict[str, Any]]:
        state = rng_state(self.device)
        if not self.info.distributed:
            return [state]
        gathered: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(gathered, state)  # every process's sampling must resume where it stopped
        return gathered

    def save(self, path: Path) -> None:
        """Collective (all processes call it); rank 0 writes the file atomically."""
        rng = self._all_rng_states()
        if not self.info.is_main:
            return
        training_state = {
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": rng,
            "world_size": self.info.world_size,
            "run_config": self.run_config,
        }
        with HeldStopSignals():
            save_checkpoint(self.model, path, extra={"iteration": self.iteration, "training_state": training_state})
            self.saved_iteration = self.iteration

    def resume(self, path: Path) -> None:
        """Restores weights, optimizer, scheduler, scaler, RNGs, iteration and data position from `last.pt`, once it
        is known to fit this run (architecture, schedule, batch size), and cuts metrics.jsonl back to its iteration."""
        checkpoint = read_file(path)
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or "training_state" not in checkpoint:
            raise CheckpointError(f"{path} is not a training checkpoint written by segment.train")
        if checkpoint["config"] != self.model.config.to_dict():
            changed = sorted(k for k, v in self.model.config.to_dict().items() if checkpoint["config"].get(k) != v)
            raise TrainingError(f"{path} was trained with other segment settings ({', '.join(changed)}); "
                                "resume with the same segment config or use another output_dir")
        state = checkpoint["training_state"]
        changed = changed_run_settings(state.get("run_config") or {}, int(state["world_size"]), self.run_config,
                                       self.info.world_size)
        # the counts the scheduler runs by, as scaled for the images per iteration: a checkpoint from before
        # schedule.reference_images_per_iter scaled them records the same schedule settings with other counts
        saved_scheduler = state.get("scheduler") or {}
        changed += [f"lr schedule's {key} {saved_scheduler[key]} -> {getattr(self.scheduler, key)}"
                    for key in ("milestones", "warmup_iters")
                    if key in saved_scheduler and hasattr(self.scheduler, key)
                    and saved_scheduler[key] != getattr(self.scheduler, key)]
        if changed:
            raise TrainingError(f"{path} was trained with other settings ({'; '.join(changed)}); its optimizer and "
                                "schedule would carry on as they were: resume with the same ones or use another "
                                "output_dir")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["stream"])
        self.iteration = int(state["iteration"])
        if self.iteration > self.settings.max_iters:
            raise TrainingError(f"{path} is at iteration {self.iteration}, past schedule.max_iters="
                                f"{self.settings.max_iters}: raise max_iters to train further, or use another "
                                "output_dir")
        self.saved_iteration = self.iteration
        if self.info.is_main:
            _drop_metrics_after(self.settings.output_dir / METRICS, self.iteration)
        if state["world_size"] == self.info.world_size:
            set_rng_state(state["rng"][self.info.rank], self.device)
        else:  # a different process count cannot replay the same sampling; keep going reproducibly anyway
            seed_everything(int(self.run_config.get("seed", 0)) + 1000 * self.iteration + self.info.rank)
            if self.info.is_main:
                tqdm.write(f"note: {path} was written by {_processes(int(state['world_size']))}, now "
                           f"{self.info.world_size}: the data order and sampling differ from an uninterrupted run",
                           file=sys.stdout)
