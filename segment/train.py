"""Train the Mask R-CNN: `python -m segment.train [segment=r18_fpn] [data=synthetic] [schedule=demo] [key=value ...]`.

Several GPUs (or CPU processes): `torchrun --nproc_per_node=N -m segment.train ...`; batch_size is per process
and the learning rate follows the images per iteration over all processes (see segment/optim.py).
Writes output_dir/{last.pt, model_final.pt, metrics.jsonl, config.yaml}; `resume=true` continues from last.pt
(same schedule, batch size, seed, amp), `overwrite=true` removes those files of an earlier run once the new run's
model and data are built. A run holds output_dir/.lock while it runs: a second training into the same folder stops
at once. A sweep (`-m seed=0,1 ...`) trains job N into output_dir/N, every job even when some are refused (the sweep
then exits 2 naming them: common/sweep.py). A schedule with reference_images_per_iter (paper_1x) scales its
iteration counts to the images per iteration (effective_schedule).
Every setting is checked before anything is built: a bad one is one "error: ..." line and exit status 2, and a
refused run leaves no folder of its own making. A stop signal (Ctrl-C, SIGTERM, SIGHUP) is one "error: ..." line
naming what is left (last.pt's iteration and the resume command; or, a run stopped before its first checkpoint
removing its files, that the same command starts over) and exit status 128 + its number; one that comes once
model_final.pt is in place is a note, and the run counts as done. In a sweep one between two jobs stops it before
the next, and one after the last job is a note.
"""
from __future__ import annotations

import os
import sys

from common.signals import exit_status, leaving, on_stop_signals, stop_until  # light: what follows them is not


if __name__ == "__main__":  # `python -m segment.train`; modules importing this one keep their handlers
    # a stop signal while Hydra and our modules load and Hydra composes the config (in a sweep, makes output_dir and
    # its multirun.yaml): one line, not a traceback from inside an import, nor (SIGTERM, SIGHUP) a silent end
    on_stop_signals(leaving(b"error: interrupted before training began: nothing trained\n"))

import fcntl
import itertools
import math
import signal
import tempfile
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from common.errors import UserError, one_line
from common.hydra_cli import exit_on_bad_overrides, hydra_readable, multirun
from common.outputs import AtomicOutput, HeldStopSignals, leftover_temp_files
from common.settings import check_settings, flag, number, whole
from common.sweep import completed, failed, in_sweep, leave, pending_stop, stop_later
from segment.checkpoint import _shown, load_checkpoint, project_relative, segment_group_hint, weights_misfit
from segment.config import ARCHITECTURE_KEYS, SegmenterConfig, real_class_names
from segment.data import build_dataset, check_data_settings, collate, data_flag
from segment.distributed import DistInfo, barrier, broadcast_flag, cleanup, init_distributed
from segment.engine import FINAL, LAST, METRICS, Trainer, TrainSettings, TrainingError, seed_everything
from segment.errors import CheckpointError, ConfigError
from segment.loader import BatchStream
from segment.model import MaskRCNN, build_model
from segment.optim import WarmupMultiStepLR, build_optimizer, scaled_lr

# keys of the shared `segment` group that are no architecture setting: the weights to start from
_WEIGHTS_KEYS = ("checkpoint",)
CONFIG = "config.yaml"
LOCK = ".lock"  # flock-ed by rank 0 for the whole run (holding its pid); not a run file: resume and overwrite ignore it
# the layers with a row per class (background included): fine-tuning on other classes starts them fresh
CLASS_LAYERS = tuple(f"roi_heads.{layer}.{kind}" for kind in ("weight", "bias") for layer in (
    "box_predictor.cls_score", "box_predictor.bbox_pred", "mask_predictor.mask_fcn_logits"))
RUN_FILES = (LAST, FINAL, METRICS, CONFIG)  # what a run writes into output_dir (and overwrite=true removes)
# conf/train.yaml's own settings and groups, and the schedule group's settings: anything else (a `+segment_evry=2`
# typo) is refused, not trained without
# settings whose values are file names, spelt as the user's files are (hydra_readable quotes them for Hydra)
PATH_KEYS = ("data.root", "data.train.images", "data.train.annotations", "data.val.images", "data.val.annotations",
             "output_dir", "segment.checkpoint")
TRAIN_KEYS = ("output_dir", "resume", "overwrite", "batch_size", "num_workers", "amp", "clip_grad_norm",
              "checkpoint_every", "log_every", "eval_every", "eval_batch_size", "seed", "device", "cpu_threads",
              "dist_timeout_min")
TRAIN_GROUPS = ("segment", "data", "schedule")  # each checked by its own reader
SCHEDULE_KEYS = ("reference_images_per_iter", "base_lr", "momentum", "weight_decay", "norm_weight_decay",
                 "bias_weight_decay", "max_iters", "steps", "gamma", "warmup_iters", "warmup_factor")


# ---- settings, checked before anything is built ----

def _sizes(cfg: DictConfig, key: str, *, nullable: bool = False) -> None:
    """An image side in pixels (>= 1), or a list of them (one picked per image)."""
    value = OmegaConf.select(cfg, key)
    if value is None and nullable:
        return
    sizes = list(value) if isinstance(value, (ListConfig, list)) else [value]
    if not sizes or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        raise ConfigError(f"{key} must be a whole number of pixels >= 1 or a list of them"
                          f"{' or null' if nullable else ''}, got {value!r}")


def checked_train_settings(cfg: DictConfig) -> TrainSettings:
    """Every setting's type and range, so that a bad value is one line before any work, not a traceback from
    torch minutes later; -> the loop's settings."""
    get = partial(OmegaConf.select, cfg)
    check_settings([key for key in cfg if key not in (*TRAIN_GROUPS, "hydra")], TRAIN_KEYS, "top-level")
    check_settings(cfg.schedule, SCHEDULE_KEYS, "schedule")
    whole(get("data.num_workers"), "data.num_workers", 0, nullable=True)  # first: num_workers is ${data.num_workers}
    for key, low in (("batch_size", 1), ("eval_batch_size", 1), ("log_every", 1), ("num_workers", 0),
                     ("checkpoint_every", -math.inf), ("eval_every", -math.inf), ("seed", -math.inf),
                     ("schedule.max_iters", 1), ("schedule.warmup_iters", 0)):
        whole(get(key), key, low)
    whole(get("schedule.reference_images_per_iter"), "schedule.reference_images_per_iter", 1, nullable=True)
    number(get("dist_timeout_min"), "dist_timeout_min", 0, low_open=True)
    whole(get("cpu_threads"), "cpu_threads", 1, nullable=True)
    for step in range(len(get("schedule.steps") or [])):
        whole(get(f"schedule.steps.{step}"), f"schedule.steps.{step}", 0)
    for key in ("schedule.base_lr", "schedule.gamma"):
        number(get(key), key, 0, low_open=True)
    number(get("schedule.warmup_factor"), "schedule.warmup_factor", 0, 1, low_open=True)
    for key in ("schedule.momentum", "schedule.weight_decay"):
        number(get(key), key, 0)
    for key in ("schedule.norm_weight_decay", "schedule.bias_weight_decay"):
        number(get(key), key, 0, nullable=True)
    number(get("clip_grad_norm"), "clip_grad_norm", nullable=True)
    number(get("data.hflip_prob"), "data.hflip_prob", 0, 1)
    _sizes(cfg, "data.resize.min_size", nullable=True)
    whole(get("data.resize.max_size"), "data.resize.max_size", 1, nullable=True)  # one cap, never a list
    check_data_settings(cfg.data)
    for key in ("resume", "overwrite"):
        flag(get(key), key)
    # the segment settings (segment.min_size, max_size... in SegmenterConfig's checks) too, before any data is made
    _check_from_scratch(*segmenter_config(cfg.segment, None))
    return TrainSettings(
        output_dir=Path(cfg.output_dir), max_iters=int(cfg.schedule.max_iters), amp=str(cfg.amp),
        clip_grad_norm=float(cfg.clip_grad_norm or 0), log_every=int(cfg.log_every),
        checkpoint_every=int(cfg.checkpoint_every), eval_every=int(cfg.eval_every),
    )


def effective_schedule(schedule: Any, images_per_iteration: int) -> dict[str, Any]:
    """The schedule's iteration counts for this run's images per iteration (over all processes): max_iters, steps,
    warmup_iters, and the factor they were scaled by. A schedule quoted for `reference_images_per_iter` images
    (paper_1x: the paper's 16) keeps its epochs at any batch, its counts times reference / images per iteration,
    rounded (the linear scaling rule of Goyal et al. 2017 for the iterations as well as the lr; Detectron2's
    REFERENCE_WORLD_SIZE): 2 images per iteration train 8x the iterations at 1/8 the lr, not 1/8 of the recipe.
    Null keeps the counts as written (tiny, demo: made for their own batch). checkpoint_every and eval_every are
    this run's own iterations, never scaled: how much a crash loses, how often a curve gets a point."""
    reference = schedule.get("reference_images_per_iter")
    factor = Fraction(int(reference), images_per_iteration) if reference else Fraction(1)

    def scaled(iterations: Any) -> int:
        return round(int(iterations) * factor)

    return {"max_iters": max(1, scaled(schedule.max_iters)), "steps": [scaled(step) for step in schedule.steps],
            "warmup_iters": scaled(schedule.warmup_iters), "factor": factor}


def describe_schedule(schedule: Any, images_per_iteration: int) -> str:
    """The start-up banner's line: the iteration counts this run follows, and where they came from."""
    run = effective_schedule(schedule, images_per_iteration)
    warmup = f"warm-up {run['warmup_iters']}" if run["warmup_iters"] else "no warm-up"
    steps = ", ".join(str(step) for step in run["steps"])
    decay = f"lr x{float(schedule.gamma):g} at iterations {steps}" if steps else "no lr steps"
    line = f"schedule: {run['max_iters']} iterations, {warmup}, {decay}"
    reference = schedule.get("reference_images_per_iter")
    if reference and run["factor"] != 1:
        line += (f" (schedule.reference_images_per_iter={reference}: its counts x{run['factor']} for "
                 f"{images_per_iteration} images/iter, the same epochs)")
    return line


def check_writable_folder(path: Path) -> None:
    """Writes (and removes) a file in output_dir, or in the nearest folder above it that exists, making nothing: a
    folder that cannot hold the run fails now, in one line, not at the first checkpoint."""
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir={path} is a file, not a folder" if existing == path else
                          f"output_dir={path} cannot be made: {existing} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test."):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir={path} cannot be written to ({e.strerror or e})") from None


def make_output_dir(path: Path, made: list[Path]) -> None:
    """Makes output_dir once it is known to be writable, putting the folders made for it into `made`, deepest first:
    a run that ends without writing into them removes them again (remove_empty_folders)."""
    check_writable_folder(path)
    made[:0] = itertools.takewhile(lambda folder: not folder.exists(), (path, *path.parents))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # made meanwhile as a file, or taken away from under us
        raise ConfigError(f"output_dir={path} cannot be made ({e.strerror or e})") from None


def remove_empty_folders(made: list[Path]) -> None:
    """The folders this run made, deepest first, as long as each is empty: a refused or stopped run leaves none."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # holds the run's files (or the user's): it stays, and so do the folders above it
            break
    made.clear()


def segmenter_config(segment_cfg: Any, class_names: list[str] | None,
                     start: SegmenterConfig | None = None) -> tuple[SegmenterConfig, str | None]:
    """The `segment` group -> (architecture config with the dataset's classes, optional initial-weights path).
    The model learns the classes of the data it is trained on: a num_classes or class_names given that differ are
    named in a note (they were replaced without a word), and build_trainer records the data's in config.yaml.
    A null bn_eps is the starting weights' (`start`): r50_fpn.yaml leaves it to the file, 0 for torchvision's COCO
    weights, which run wrong with any other."""
    values = (OmegaConf.to_container(segment_cfg, resolve=True) if isinstance(segment_cfg, DictConfig)
              else dict(segment_cfg))
    init_weights = values.get("checkpoint")
    values = {k: v for k, v in values.items() if k not in _WEIGHTS_KEYS}
    if class_names:
        data_classes = {"num_classes": len(class_names) + 1, "class_names": ["__background__", *class_names]}
        ignored = [f"segment.{key}={_shown(values[key])} (the data's: {_shown(value)})"
                   for key, value in data_classes.items() if values.get(key) is not None and values[key] != value]
        if ignored and _is_rank0():
            print(f"note: the model learns the classes of its training data: {'; '.join(ignored)} ignored")
        values.update(data_classes)
    if start is not None and values.get("bn_eps") is None:
        values["bn_eps"] = start.bn_eps
    return SegmenterConfig.from_dict(values), init_weights


def _check_from_scratch(config: SegmenterConfig, init_weights: str | None) -> None:
    """From scratch every stage must train, with GroupNorm or trainable BN ("Rethinking ImageNet Pre-training"):
    frozen stages keep their random weights, and a frozen BN never normalizes (its statistics start at 0 and 1)."""
    if not init_weights and (config.norm == "frozen_bn" or config.trainable_layers < 5):
        raise ConfigError(f"segment.norm={config.norm} with segment.trainable_layers={config.trainable_layers} "
                          "keeps random weights frozen: from scratch use segment.norm=gn (or bn) and "
                          "segment.trainable_layers=5, or start from weights with segment.checkpoint=PATH")


def load_start(init_weights: str | None) -> MaskRCNN | None:
    """The starting weights (segment.checkpoint: ours or a torchvision file), found as the render finds them."""
    return load_checkpoint(project_relative(init_weights)) if init_weights else None


def build_segmenter(config: SegmenterConfig, start: MaskRCNN | None, name: str | None = None) -> MaskRCNN:
    """A new model, with `start`'s weights where given (fine-tuning). Their shapes must fit `config`, except the
    layers with a row per class, which start fresh when the data has other classes (COCO weights fine-tuned on
    one's own classes, as in torchvision's fine-tuning tutorial)."""
    model = build_model(config)
    if start is None:
        return model
    own, weights = model.state_dict(), start.state_dict()
    fresh = [k for k in CLASS_LAYERS if k in weights and k in own and weights[k].shape != own[k].shape]
    weights.update({k: own[k] for k in fresh})
    try:
        model.load_state_dict(weights)
    except RuntimeError:  # shape / key mismatch: torch's message is a line per key
        raise CheckpointError(f"segment.checkpoint={name} does not fit segment config: "
                              f"{weights_misfit(own, weights, shown=1)}: {_fitting_config(start.config, config)}"
                              ) from None
    if fresh:
        print(f"note: segment.checkpoint={name} has {len(real_class_names(start.config.class_names))} classes, the "
              f"data {len(real_class_names(config.class_names))}: its class score, box and mask layers start fresh")
    return model


def _fitting_config(trained: SegmenterConfig, config: SegmenterConfig) -> str:
    """What to add to the command to fine-tune weights made with `trained`'s architecture. Another backbone: its
    segment group (as the render says for a bare torchvision file), whose widths come with it; else the architecture
    settings that differ (the classes start fresh anyway, the BatchNorm eps changes no shape)."""
    if trained.backbone != config.backbone:
        return f"it holds a {trained.backbone} backbone, not {config.backbone}: {segment_group_hint(trained.backbone)}"
    differ = [f"segment.{key}={_shown(getattr(trained, key)).replace(' ', '')}" for key in ARCHITECTURE_KEYS
              if key not in ("num_classes", "class_names", "bn_eps") and getattr(trained, key) != getattr(config, key)]
    if not differ:  # the same settings: weights of a model changed since, say
        return "it was made for another model"
    return f"add {' '.join(differ)} to the command (the settings it was made with)"


def _evaluator(dataset, batch_size: int):
    from segment.evaluate import evaluate, ground_truth

    ground_truth(dataset, len(dataset))  # a malformed validation annotation fails now, not at the first evaluation
    return lambda model: evaluate(model, dataset, batch_size=batch_size, progress=False)


def _batch_sampler_factory(cfg: DictConfig, dataset) -> partial:
    """Aspect-ratio grouped batches (data.aspect_grouping) or plain ones; full batches only, so every process
    runs the same number of steps per epoch."""
    from torch.utils.data import BatchSampler

    from segment.data.sampler import GroupedBatchSampler, aspect_ratio_groups

    if data_flag(cfg.data, "aspect_grouping", True):
        return partial(GroupedBatchSampler, group_ids=aspect_ratio_groups(dataset), batch_size=int(cfg.batch_size))
    return partial(BatchSampler, batch_size=int(cfg.batch_size), drop_last=True)


def build_trainer(cfg: DictConfig, info: DistInfo, settings: TrainSettings) -> Trainer:
    """Everything the loop needs, built from the composed config (model, data stream, optimizer, schedule)."""
    seed_everything(int(cfg.seed) + info.rank)
    if not info.is_main:
        barrier(info)  # rank 0 generates missing synthetic data first; the others then read it
    train_set = build_dataset(cfg.data, "train")
    if info.is_main:
        barrier(info)
    start = load_start(cfg.segment.get("checkpoint"))
    config, init_weights = segmenter_config(cfg.segment, getattr(train_set, "class_names", None),
                                            start.config if start is not None else None)
    with open_dict(cfg.segment):  # config.yaml records the classes trained, not the ones the data replaced
        cfg.segment.num_classes, cfg.segment.class_names = config.num_classes, list(config.class_names)
    model = build_segmenter(config, start, init_weights).to(info.device)

    schedule = cfg.schedule
    images_per_iteration = int(cfg.batch_size) * info.world_size
    run = effective_schedule(schedule, images_per_iteration)
    settings = replace(settings, max_iters=run["max_iters"])
    optimizer = build_optimizer(
        model, scaled_lr(float(schedule.base_lr), images_per_iteration), float(schedule.momentum),
        float(schedule.weight_decay), schedule.get("norm_weight_decay"), schedule.get("bias_weight_decay"),
        grad_scaled=settings.amp == "fp16",
    )
    scheduler = WarmupMultiStepLR(optimizer, run["steps"], float(schedule.gamma), run["warmup_iters"],
                                  float(schedule.warmup_factor))
    stream = BatchStream(
        train_set, _batch_sampler_factory(cfg, train_set), collate,
        seed=int(cfg.seed), rank=info.rank, world_size=info.world_size, num_workers=int(cfg.num_workers),
        pin_memory=info.device.type == "cuda",
    )
    evaluator = None
    if int(cfg.eval_every) > 0 and info.is_main:
        evaluator = _evaluator(build_dataset(cfg.data, "val"), int(cfg.eval_batch_size))
    return Trainer(model, optimizer, scheduler, stream, settings, info, evaluator=evaluator,
                   run_config=OmegaConf.to_container(cfg, resolve=True), images_per_iteration=images_per_iteration)


def _check_output_dir(cfg: DictConfig) -> Path | None:
    """-> the checkpoint to resume from, if any; refuses to mix a new run into an old run's folder. Any file a run
    writes counts, not only last.pt: that comes at the first checkpoint, and config.yaml or metrics.jsonl may be a
    stopped run's, or the user's own."""
    out = Path(cfg.output_dir)
    last = out / LAST
    if cfg.resume:
        return last if last.is_file() else None
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not cfg.overwrite:
        raise TrainingError(f"{out} already holds a run ({', '.join(found)}); pass resume=true to continue it, "
                            "overwrite=true to start over, or another output_dir")
    return None


_held_locks: set[int] = set()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): the lock stays the training's alone, released when it ends, not
    when its last worker does."""
    for fd in _held_locks:
        os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_output_dir(out: Path) -> int | None:
    """-> the open descriptor of output_dir/.lock, exclusively flock-ed: a second training into the same folder
    would mix its metrics and checkpoints into this one's. The kernel releases the lock when the process dies
    however it ends, so a lock file that a killed run left is no obstacle. None where the file system has no locks
    (said in a note: the run goes on unguarded)."""
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise TrainingError(f"output_dir={out} is in use by another training (pid {holder or '?'})") from None
        except OSError as e:
            os.close(fd)
            print(f"note: cannot lock {path} ({e.strerror or e}): nothing stops a second training into {out}")
            return None
        # a run that ends removes the file while it still holds it: a lock taken on the removed file guards nothing
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for the message of a run refused meanwhile
    _held_locks.add(fd)
    return fd


def unlock_output_dir(out: Path, fd: int) -> None:
    """Removed before it is released, so that a run that opened this file meanwhile finds it gone and makes anew."""
    try:
        (out / LOCK).unlink(missing_ok=True)
    finally:
        _held_locks.discard(fd)
        os.close(fd)


def _settle_output_dir(cfg: DictConfig, info: DistInfo, made: list[Path]) -> tuple[int | None, Path | None]:
    """Rank 0 makes output_dir (the folders it made into `made`) and takes it (lock, then the earlier run's files)
    for the whole run -> (its lock, the checkpoint to resume from); every rank stops with it when it refuses."""
    out = Path(cfg.output_dir)
    lock = resume_from = error = None
    if info.is_main:
        try:
            make_output_dir(out, made)
            lock = lock_output_dir(out)
            resume_from = _check_output_dir(cfg)
        except UserError as e:
            error = e
    if not broadcast_flag(error is None, info):
        if lock is not None:
            unlock_output_dir(out, lock)
        raise error if error is not None else TrainingError(f"rank 0 refused output_dir={out}")
    resumes = broadcast_flag(resume_from is not None, info)  # the others read the same last.pt
    return lock, resume_from if info.is_main or not resumes else out / LAST


def _remove_previous_run(out: Path) -> None:
    """A run starting from scratch removes what an earlier run wrote there (and the temporary files of its atomic
    writes) before it writes anything: a later resume=true would otherwise continue the old run's checkpoint, and
    its metrics would mix with the new ones."""
    for name in RUN_FILES:
        for path in (out / name, *leftover_temp_files(out / name)):
            path.unlink(missing_ok=True)


@dataclass
class TrainingRun:
    """How far a run has got, for what a stop signal leaves behind and says (`main`): `train` fills it in."""
    trainer: Trainer | None = None
    # output_dir cleared of an earlier run's files (a run from scratch): the run files there now are this run's
    cleared: bool = False

    @property
    def saved_iteration(self) -> int | None:
        """The iteration of the last.pt in output_dir that this run wrote or resumed from."""
        return None if self.trainer is None else self.trainer.saved_iteration

    @property
    def finished(self) -> bool:
        return self.trainer is not None and self.trainer.finished


def train(cfg: DictConfig, run: TrainingRun | None = None) -> Path:
    """Runs (or resumes) a training, recording its progress in `run`; returns the path of model_final.pt. Stopped
    before its first checkpoint, a run from scratch removes the files it wrote: the same command starts over."""
    run = run if run is not None else TrainingRun()
    settings = checked_train_settings(cfg)
    info = init_distributed(str(cfg.device), float(cfg.dist_timeout_min))
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    out = Path(cfg.output_dir)
    lock = None
    made: list[Path] = []
    try:
        lock, resume_from = _settle_output_dir(cfg, info, made)
        run.trainer = trainer = build_trainer(cfg, info, settings)
        if resume_from is not None:
            trainer.resume(resume_from)
        elif info.is_main:  # only now: starting weights and data that fail to load leave the earlier run as it was
            with HeldStopSignals():  # what a stop signal says of output_dir depends on whether this happened
                _remove_previous_run(out)
                run.cleared = True
        if info.is_main:  # the run is settled: its config and banner say what it will do
            with AtomicOutput(out / CONFIG, overwrite=True) as temp:  # a resume reads it: never half a file
                OmegaConf.save(cfg, temp, resolve=True)
            print(f"training {trainer.model.config.backbone}/{trainer.model.config.norm} on {info.device} "
                  f"x{info.world_size}: {trainer.images_per_iteration} images/iter, "
                  f"base lr {trainer.scheduler.base_lrs[0]:.4g}, {trainer.settings.max_iters} iterations -> {out}")
            print(describe_schedule(cfg.schedule, trainer.images_per_iteration))
            if resume_from is not None:
                print(f"resumed from {resume_from} at iteration {trainer.iteration}, "
                      f"lr {trainer.optimizer.param_groups[0]['lr']:.4g}")
            elif cfg.resume:
                print(f"resume=true but no {LAST} in {out} yet: starting from scratch")
        trainer.fit()
        return out / FINAL
    except KeyboardInterrupt:
        if run.cleared and run.saved_iteration is None:
            # a later command would refuse a folder holding its config.yaml and metrics.jsonl, and could resume
            # nothing from them
            with HeldStopSignals():
                _remove_previous_run(out)
        raise
    finally:
        if lock is not None:
            unlock_output_dir(out, lock)
        remove_empty_folders(made)
        cleanup(info)


def _is_rank0() -> bool:
    """From torchrun's environment: also where no process group was (or could be) joined."""
    return int(os.environ.get("RANK", "0")) == 0


def _report(line: str) -> None:
    """A message for the user, once: under torchrun every process meets the same error or Ctrl-C."""
    if _is_rank0():
        print(line, file=sys.stderr)


def _fail(error: UserError) -> NoReturn:
    _report(f"error: {one_line(error)}")
    sys.exit(2)


def _check_sweep_output_dir(argv: list[str]) -> None:
    """A sweep's output_dir is Hydra's sweep folder (conf/train.yaml), made by Hydra, with its multirun.yaml, before
    `main` runs: a folder it cannot make (a file's path, a read-only place) would be Hydra's traceback, so an
    output_dir given on the command line is checked first, without making it (not for Hydra's --help, --cfg and the
    like, which run nothing). Swept itself it would be no one folder (Hydra's basic sweeper runs every combination,
    each job in a numbered folder of its own anyway): refused, as is a sweep under torchrun. A single run makes
    output_dir itself, in `train`."""
    if not multirun(argv) or set(argv) & {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i",
                                          "--shell-completion", "-sc"}:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each job made and destroyed its process group: the second
        # job's broke on the first's (a gloo "Connection reset by peer" traceback, the other ranks hung)
        _fail(ConfigError("a sweep (-m) runs in one process: under torchrun give each setting a command of its own"))
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    except OverrideParseException:
        return  # Hydra says what is wrong with it
    given = [o for o in overrides if o.key_or_group == "output_dir" and not o.is_delete()]
    if given and given[-1].is_sweep_override():
        _fail(ConfigError("output_dir cannot be swept: a sweep trains job N into output_dir/N, give one output_dir"))
    if given and isinstance(given[-1].value(), str) and "${" not in given[-1].value():
        try:
            check_writable_folder(Path(given[-1].value()))
        except ConfigError as error:
            _fail(error)


def interrupted_message(run: TrainingRun, out: Path, sweep_dir: str | None = None, job: int = 0) -> str:
    """What a stopped run leaves in output_dir `out`, and how to go on from there. In a sweep (`sweep_dir`: the
    sweep's output_dir, of which `out` is job `job`'s folder) that is the sweep command: one given `out` itself would
    train into out/N."""
    resume, start_over = f"`resume=true output_dir={out}`", "the same command starts over"
    whose = by = rest = ""
    if sweep_dir is not None:
        resume = f"the same sweep command with resume=true (output_dir={sweep_dir})"
        whose, by, start_over = f"sweep job {job}'s ", f" by sweep job {job}", f"{resume} starts it over"
        rest = f"; {resume} continues the sweep"
    if run.saved_iteration is not None:
        return f"interrupted; {whose}last.pt at iteration {run.saved_iteration}: {resume} continues from it"
    if not any((out / name).exists() for name in RUN_FILES):
        return f"interrupted; no checkpoint was written{by}: {start_over}"
    return f"interrupted before {whose}training began: {out} is as it was{rest}"  # an earlier run's files, untouched


def _stop_unless_finished(run: TrainingRun, late: list[int]) -> None:
    """Ctrl-C, SIGTERM (a scheduler's preemption) and SIGHUP (the terminal closed) stop the run as Ctrl-C does, clean-
    ups included, until its model_final.pt is in place: one that comes then stops nothing, its number goes into
    `late`. An ignored one (nohup) stays ignored."""
    on_stop_signals(stop_until(lambda: run.finished, late))


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run, late = TrainingRun(), []
    _stop_unless_finished(run, late)  # in place of the start-up's handler (a sweep's: stop_later): neither stops it
    sweep_dir, job = None, 0
    if in_sweep():  # each job a run of its own: one shared folder would refuse every job after the first
        if (signum := pending_stop()) is not None:  # it came as this job started
            leave(signum, in_job=False)
        sweep_dir, job = str(cfg.output_dir), HydraConfig.get().job.num
        cfg.output_dir = str(Path(cfg.output_dir) / str(job))
    try:
        final = train(cfg, run)
    except UserError as error:
        if sweep_dir is None:
            _fail(error)
        failed(one_line(error))  # the other jobs still run; the sweep exits 2 at its end
        return
    except KeyboardInterrupt as interrupt:
        _report(f"error: {interrupted_message(run, Path(cfg.output_dir), sweep_dir, job)}")
        sys.exit(exit_status(interrupt))
    finally:
        if sweep_dir is not None:  # until the next job's training: the jobs so far are done, their files complete
            on_stop_signals(stop_later)
    if _is_rank0():
        print(f"wrote {final}")
    if sweep_dir is not None:
        completed(final)
        if late:  # the sweep stops before its next job, if there is one
            stop_later(late[0], None)
    elif late:  # it changes nothing
        _report(f"note: {signal.Signals(late[0]).name} came once the training was complete: {final} is kept")


if __name__ == "__main__":
    sys.argv[1:] = hydra_readable(sys.argv[1:], PATH_KEYS)
    exit_on_bad_overrides(Path(__file__).parent.parent / "conf", "train", sys.argv[1:])
    _check_sweep_output_dir(sys.argv[1:])
    main()
