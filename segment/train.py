"""Train the Mask R-CNN: `python -m segment.train [segment=r18_fpn] [data=synthetic] [schedule=demo] [key=value ...]`.

Several GPUs (or CPU processes): `torchrun --nproc_per_node=N -m segment.train ...`; batch_size is per process
and the learning rate follows the images per iteration over all processes (see segment/optim.py).
Writes output_dir/{last.pt, model_final.pt, metrics.jsonl, config.yaml}; `resume=true` continues from last.pt.
"""
from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from segment.checkpoint import load_checkpoint
from segment.config import SegmenterConfig
from segment.distributed import DistInfo, barrier, cleanup, init_distributed
from segment.engine import FINAL, LAST, METRICS, Trainer, TrainSettings, TrainingError, seed_everything
from segment.errors import CheckpointError, SegmentError
from segment.loader import BatchStream
from segment.model import MaskRCNN, build_model
from segment.optim import WarmupMultiStepLR, build_optimizer, scaled_lr

# keys of the shared `segment` group that belong to the render app, not to the architecture
_RENDER_KEYS = ("checkpoint", "device")


def segmenter_config(segment_cfg: Any, class_names: list[str] | None) -> tuple[SegmenterConfig, str | None]:
    """The `segment` group -> (architecture config with the dataset's classes, optional initial-weights path)."""
    values = OmegaConf.to_container(segment_cfg, resolve=True) if isinstance(segment_cfg, DictConfig) else dict(segment_cfg)
    init_weights = values.get("checkpoint")
    values = {k: v for k, v in values.items() if k not in _RENDER_KEYS}
    if class_names:  # the model predicts the classes of the data it is trained on
        values["num_classes"] = len(class_names) + 1
        values["class_names"] = ["__background__", *class_names]
    return SegmenterConfig.from_dict(values), init_weights


def build_segmenter(config: SegmenterConfig, init_weights: str | None) -> MaskRCNN:
    if not init_weights:
        return build_model(config)
    # starting weights (fine-tuning): their shapes must fit this config, the config itself comes from the yaml
    model = build_model(config)
    try:
        model.load_state_dict(load_checkpoint(init_weights).state_dict())
    except RuntimeError as e:  # shape / key mismatch
        raise CheckpointError(f"segment.checkpoint={init_weights} does not fit segment config: "
                              f"{str(e).strip().splitlines()[-1][:160]}") from None
    return model


def _evaluator(dataset, batch_size: int):
    from segment.evaluate import evaluate

    return lambda model: evaluate(model, dataset, batch_size=batch_size, progress=False)


def _batch_sampler_factory(cfg: DictConfig, dataset) -> partial:
    """Aspect-ratio grouped batches (data.aspect_grouping) or plain ones; full batches only, so every process
    runs the same number of steps per epoch."""
    from torch.utils.data import BatchSampler

    from segment.data.sampler import GroupedBatchSampler, aspect_ratio_groups

    if cfg.data.get("aspect_grouping", True):
        return partial(GroupedBatchSampler, group_ids=aspect_ratio_groups(dataset), batch_size=int(cfg.batch_size))
    return partial(BatchSampler, batch_size=int(cfg.batch_size), drop_last=True)


def build_trainer(cfg: DictConfig, info: DistInfo) -> Trainer:
    """Everything the loop needs, built from the composed config (model, data stream, optimizer, schedule)."""
    from segment.data import build_dataset, collate

    seed_everything(int(cfg.seed) + info.rank)
    if not info.is_main:
        barrier(info)  # rank 0 generates missing synthetic data first; the others then read it
    train_set = build_dataset(cfg.data, "train")
    if info.is_main:
        barrier(info)
    config, init_weights = segmenter_config(cfg.segment, getattr(train_set, "class_names", None))
    model = build_segmenter(config, init_weights).to(info.device)

    schedule = cfg.schedule
    images_per_iteration = int(cfg.batch_size) * info.world_size
    optimizer = build_optimizer(
        model, scaled_lr(float(schedule.base_lr), images_per_iteration), float(schedule.momentum),
        float(schedule.weight_decay), schedule.get("norm_weight_decay"), schedule.get("bias_weight_decay"),
    )
    scheduler = WarmupMultiStepLR(optimizer, list(schedule.steps), float(schedule.gamma),
                                  int(schedule.warmup_iters), float(schedule.warmup_factor))
    stream = BatchStream(
        train_set, _batch_sampler_factory(cfg, train_set), collate,
        seed=int(cfg.seed), rank=info.rank, world_size=info.world_size, num_workers=int(cfg.num_workers),
        pin_memory=info.device.type == "cuda",
    )
    evaluator = None
    if int(cfg.eval_every) > 0 and info.is_main:
        evaluator = _evaluator(build_dataset(cfg.data, "val"), int(cfg.eval_batch_size))
    settings = TrainSettings(
        output_dir=Path(cfg.output_dir), max_iters=int(schedule.max_iters), amp=str(cfg.amp),
        clip_grad_norm=float(cfg.clip_grad_norm or 0), log_every=int(cfg.log_every),
        checkpoint_every=int(cfg.checkpoint_every), eval_every=int(cfg.eval_every),
    )
    return Trainer(model, optimizer, scheduler, stream, settings, info, evaluator=evaluator,
                   run_config=OmegaConf.to_container(cfg, resolve=True), images_per_iteration=images_per_iteration)


def _check_output_dir(cfg: DictConfig) -> Path | None:
    """-> the checkpoint to resume from, if any; refuses to mix a new run into an old run's folder."""
    out = Path(cfg.output_dir)
    last = out / LAST
    if cfg.resume:
        return last if last.is_file() else None
    if last.is_file() and not cfg.overwrite:
        raise TrainingError(f"{out} already holds a run ({LAST}); pass resume=true to continue it, "
                            "overwrite=true to start over, or another output_dir")
    return None


def train(cfg: DictConfig) -> Path:
    """Runs (or resumes) a training; returns the path of model_final.pt."""
    info = init_distributed(str(cfg.device))
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    try:
        resume_from = _check_output_dir(cfg)
        trainer = build_trainer(cfg, info)
        if info.is_main:
            out = Path(cfg.output_dir)
            if not cfg.resume:
                (out / METRICS).unlink(missing_ok=True)
            OmegaConf.save(cfg, out / "config.yaml", resolve=True)
            print(f"training {trainer.model.config.backbone}/{trainer.model.config.norm} on {info.device} "
                  f"x{info.world_size}: {trainer.images_per_iteration} images/iter, "
                  f"base lr {trainer.scheduler.base_lrs[0]:.4g}, {trainer.settings.max_iters} iterations -> {out}")
        if resume_from is not None:
            trainer.resume(resume_from)
            if info.is_main:
                print(f"resumed from {resume_from} at iteration {trainer.iteration}, "
                      f"lr {trainer.optimizer.param_groups[0]['lr']:.4g}")
        elif cfg.resume and info.is_main:
            print(f"resume=true but no {LAST} in {cfg.output_dir} yet: starting from scratch")
        trainer.fit()
        return Path(cfg.output_dir) / FINAL
    finally:
        cleanup(info)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler's preemption) stops like Ctrl-C


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        final = train(cfg)
    except SegmentError as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"error: interrupted; `resume=true output_dir={cfg.output_dir}` continues from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {final}")


if __name__ == "__main__":
    main()
