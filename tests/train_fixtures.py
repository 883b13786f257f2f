"""Tiny training set-ups shared by the training tests: a synthetic COCO split on disk, a small ResNet-18/GN
Mask R-CNN config, a Trainer built around them, and the CLI overrides that make `segment.train` just as small."""
from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch.utils.data import BatchSampler

from segment.config import SegmenterConfig
from segment.data.coco import CocoDetection
from segment.data.sampler import collate
from segment.data.synthetic import CLASS_NAMES, write_coco_split
from segment.data.transforms import build_transforms
from segment.engine import Trainer, TrainSettings, seed_everything
from segment.loader import BatchStream
from segment.model import build_model
from segment.optim import WarmupMultiStepLR, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(
    backbone="resnet18", norm="gn", trainable_layers=5, min_size=64, max_size=64, fpn_channels=32,
    representation_size=64, mask_head_channels=32, mask_head_layers=1, anchor_sizes=[16, 32, 64, 128, 256],
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64, box_batch_size_per_image=64,
)
# the same model and a 64-px synthetic data set, as command-line overrides of conf/train.yaml
CLI_OVERRIDES = [f"segment.{k}={v}".replace(" ", "") for k, v in TINY_MODEL.items()] + [
    "data.generate_if_missing.n_train=4", "data.generate_if_missing.n_val=2", "data.generate_if_missing.size=64",
    "data.num_workers=0", "log_every=1", "cpu_threads=1",
]


def synthetic_split(root: Path, n_images: int = 4, size: int = 64, hflip_prob: float = 0.0) -> CocoDetection:
    """The train split under `root` (written on first use); hflip_prob > 0 flips images at random, as training does."""
    annotations = root / "annotations" / "instances_train.json"
    if not annotations.is_file():
        write_coco_split(root, "train", n_images, size=size, seed=0, progress=False)
    return CocoDetection(root / "train", annotations, transforms=build_transforms(True, hflip_prob=hflip_prob))



@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A module's tiny synthetic train split (synthetic_split), made once."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic_split(root)
    return root

def tiny_config(**overrides) -> SegmenterConfig:
    names = ["__background__", *CLASS_NAMES]
    return SegmenterConfig(**{**TINY_MODEL, "num_classes": len(names), "class_names": names, **overrides})


def make_trainer(dataset, output_dir: Path, max_iters: int, *, lr: float = 0.01, batch_size: int = 2,
                 seed: int = 0, steps=(), warmup_iters: int = 0, config: SegmenterConfig | None = None,
                 num_workers: int = 0, **settings) -> Trainer:
    seed_everything(seed)
    model = build_model(config or tiny_config())
    optimizer = build_optimizer(model, lr, grad_scaled=settings.get("amp") == "fp16")  # as segment.train builds it
    scheduler = WarmupMultiStepLR(optimizer, list(steps), warmup_iters=warmup_iters, warmup_factor=0.1)
    stream = BatchStream(dataset, partial(BatchSampler, batch_size=batch_size, drop_last=True), collate, seed=seed,
                         num_workers=num_workers)
    settings = {"log_every": 1, "checkpoint_every": 0, **settings}
    # what segment.train records of the run (conf/train.yaml's keys), for resume's checks
    run_config = {"seed": seed, "batch_size": batch_size, "amp": settings.get("amp", "none"), "schedule": {
        "base_lr": lr, "steps": list(steps), "warmup_iters": warmup_iters, "max_iters": max_iters}}
    return Trainer(model, optimizer, scheduler, stream, TrainSettings(output_dir, max_iters, **settings),
                   images_per_iteration=batch_size, run_config=run_config)


def train_config(output_dir: Path, data_root: Path, *overrides: str) -> DictConfig:
    """conf/train.yaml composed as `python -m segment.train` would, with the tiny model and data, for calling
    `segment.train.train` in-process (no interpreter start-up, unlike `run_module`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[
            "schedule=tiny", "device=cpu", f"output_dir={output_dir}", f"data.root={data_root}", *CLI_OVERRIDES,
            *overrides])


def run_module(args: list[str], timeout: float = 300, env: dict[str, str] | None = None,
               **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS` from the project root, warnings off unless `env` (added to the environment) says otherwise."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def one_thread():
    """One intra-op thread (a test module's `pytestmark = pytest.mark.usefixtures("one_thread")`, with this fixture
    imported): on a shared 2-core machine two threads are often ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
