"""Training engine: the paper's schedule, loss going down, exact resume, mask overfitting, AMP, the Hydra CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes

from segment.data.synthetic import load_backgrounds, load_textures, random_scene
from segment.engine import LAST, TrainingError, seed_everything
from segment.errors import ConfigError
from segment.model import build_model
from segment.optim import WarmupMultiStepLR, build_optimizer, scaled_lr
from tests.train_fixtures import CLI_OVERRIDES, make_trainer, run_module, synthetic_split, tiny_config, weights


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads are often ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("synthetic"))


def test_schedule_warmup_steps_and_linear_scaling():
    assert scaled_lr(0.02, 16) == pytest.approx(0.02) and scaled_lr(0.02, 4) == pytest.approx(0.005)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    sched = WarmupMultiStepLR(opt, [6, 8], gamma=0.1, warmup_iters=4, warmup_factor=0.001)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = [0.02 * (0.001 * (1 - i / 4) + i / 4) for i in range(4)]
    assert lrs == pytest.approx(warm + [0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002])
    with pytest.raises(ConfigError):
        WarmupMultiStepLR(opt, [8, 6])


def test_optimizer_leaves_frozen_stages_out_and_decays_like_the_paper():
    model = build_model(tiny_config(trainable_layers=3))
    opt = build_optimizer(model, 0.02)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [n for n, p in model.named_parameters() if id(p) not in in_opt]
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"))
                          for n in frozen)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4]  # every trainable weight decays alike
    split = build_optimizer(model, 0.02, norm_weight_decay=0.0)
    norm_group = next(g for g in split.param_groups if g["weight_decay"] == 0.0)
    gn_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.GroupNorm) for p in m.parameters()
                 if p.requires_grad}
    assert {id(p) for p in norm_group["params"]} == gn_params
    assert split.param_groups[0]["momentum"] == 0.9


def test_loss_decreases_on_two_images(dataset, tmp_path):
    two = torch.utils.data.Subset(dataset, [0, 1])
    history = make_trainer(two, tmp_path, 30, lr=0.01, clip_grad_norm=10.0).fit()
    losses = [h["loss"] for h in history if h["type"] == "train"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def test_resume_continues_exactly(dataset, tmp_path):
    """6 iterations straight == 3 iterations, stop, resume for 3 (mid-epoch stop, warm-up and a decay step
    on both sides of it): same weights, same logged losses."""
    kwargs = dict(lr=0.01, steps=[4], warmup_iters=2, clip_grad_norm=10.0)
    straight = make_trainer(dataset, tmp_path / "straight", 6, **kwargs)
    expected = straight.fit()
    first = make_trainer(dataset, tmp_path / "split", 3, **kwargs)
    first.fit()
    assert first.stream.state_dict() == {"epoch": 1, "batch_in_epoch": 1}  # 2 batches per epoch
    second = make_trainer(dataset, tmp_path / "split", 6, **kwargs)
    seed_everything(123)  # resume must restore every RNG, whatever state the process is in
    second.resume(tmp_path / "split" / LAST)
    assert second.iteration == 3
    resumed = second.fit()
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in expected[3:]], rel=1e-5)
    assert [h["lr"] for h in resumed] == pytest.approx([h["lr"] for h in expected[3:]])
    torch.testing.assert_close(weights(second.model), weights(straight.model), rtol=1e-5, atol=1e-6)
    lines = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_another_architecture(dataset, tmp_path):
    make_trainer(dataset, tmp_path, 1).fit()
    other = make_trainer(dataset, tmp_path, 2, config=tiny_config(fpn_channels=64))
    with pytest.raises(TrainingError, match="fpn_channels"):
        other.resume(tmp_path / LAST)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_stay_finite(dataset, tmp_path, amp):
    trainer = make_trainer(dataset, tmp_path, 2, amp=amp, clip_grad_norm=5.0)
    history = trainer.fit()
    assert all(math.isfinite(h["loss"]) for h in history)
    assert trainer.scaler.is_enabled() == (amp == "fp16")


class TwoScenes(torch.utils.data.Dataset):
    """Two 96-px synthetic scenes with 2-3 large objects each (exact masks from segment.data.synthetic)."""

    def __init__(self, size: int = 96) -> None:
        textures, backgrounds = load_textures(0), load_backgrounds()
        rng = np.random.default_rng(3)
        self.items = []
        while len(self.items) < 2:
            image, objects, masks = random_scene(rng, size, size, textures, backgrounds, max_objects=3,
                                                 size_range=(0.25, 0.4))
            if len(objects) < 2:
                continue
            masks = torch.from_numpy(masks).to(torch.uint8)
            boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel indices -> box edges
            labels = torch.tensor([o.label for o in objects])
            self.items.append((torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                               {"boxes": boxes, "labels": labels, "masks": masks}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image, target = self.items[index]
        return image.float() / 255, target


def test_overfits_two_images_to_accurate_masks(tmp_path):
    scenes = TwoScenes()
    config = tiny_config(min_size=96, max_size=96, fpn_channels=64, representation_size=128, mask_head_channels=64,
                         mask_head_layers=2, rpn_pre_nms_top_n_train=300, score_threshold=0.3)
    trainer = make_trainer(scenes, tmp_path, 200, lr=0.01, warmup_iters=20, steps=[160], config=config,
                           clip_grad_norm=10.0, log_every=50)
    trainer.fit()
    predictions = trainer.model.eval().predict([(scenes[i][0] * 255).round().byte() for i in range(2)])
    ious = []
    for prediction, (_, target) in zip(predictions, scenes.items):
        for gt_mask, label in zip(target["masks"].bool(), target["labels"]):
            same_class = prediction.masks[prediction.labels == label] > 0.5
            inter = (same_class & gt_mask).flatten(1).sum(1)
            union = (same_class | gt_mask).flatten(1).sum(1)
            ious.append(float((inter / union).max()) if len(same_class) else 0.0)
    assert min(ious) > 0.8, ious


def test_cli_trains_writes_and_resumes(tmp_path):
    out = tmp_path / "run"
    common = ["-m", "segment.train", "schedule=tiny", f"output_dir={out}", f"data.root={tmp_path / 'data'}",
              "eval_every=2", *CLI_OVERRIDES]
    done = run_module(common)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"last.pt", "model_final.pt", "metrics.jsonl", "config.yaml"} <= {p.name for p in out.iterdir()}
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["type"], e["iter"]) for e in entries] == [("train", 1), ("train", 2), ("eval", 2)]
    assert {"lr", "loss", "loss_mask", "images_per_s", "time"} <= set(entries[0]) and "segm_AP" in entries[2]

    from segment.checkpoint import load_checkpoint  # the render app's loader reads both files
    model = load_checkpoint(out / "model_final.pt")
    assert model.class_names[1:] == ["circle", "square", "triangle", "star", "ring"]
    torch.testing.assert_close(weights(model), weights(load_checkpoint(out / "last.pt")))

    again = run_module(common)  # a second run must not silently mix into the first one's folder
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "resume=true" in again.stderr

    resumed = run_module([*common, "resume=true", "schedule.max_iters=3"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in entries if e["type"] == "train"] == [1, 2, 3]
