"""Training engine: the paper's schedule, loss going down, exact resume, mask overfitting, AMP, the Hydra CLI."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from bisect import bisect_right
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler
from torchvision.ops import masks_to_boxes

from common.errors import UserError
from segment.data import DatasetError, collate
from segment.data.synthetic import load_backgrounds, load_textures, random_scene
from segment.engine import LAST, TrainingError, seed_everything
from segment.errors import ConfigError
from segment.loader import BatchStream
from segment.model import build_model
from segment.optim import WarmupMultiStepLR, build_optimizer, scaled_lr
from segment.train import train
from tests.helpers_process import interruptible_popen
from tests.train_fixtures import (  # noqa: F401
    CLI_OVERRIDES, ROOT, TINY_MODEL, make_trainer, one_thread, run_module, synthetic_split, tiny_config, train_config,
    weights,
)


pytestmark = pytest.mark.usefixtures("one_thread")


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
    # a milestone inside the warm-up decays it too (Detectron2's closed form: the two factors multiply)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    sched = WarmupMultiStepLR(opt, [2, 6], gamma=0.1, warmup_iters=4, warmup_factor=0.001)
    for it in range(8):
        warmup = 0.001 * (1 - it / 4) + it / 4 if it < 4 else 1.0
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.1 ** bisect_right([2, 6], it) * warmup), it
        opt.step()
        sched.step()
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
    """fp16's first step overflows at the GradScaler's 65536 and is skipped: torch's fused SGD kept the momentum
    buffers it had made uninitialised for that step, and the next step made weights NaN (while the loss was finite)."""
    trainer = make_trainer(dataset, tmp_path, 2, amp=amp, clip_grad_norm=5.0)
    history = trainer.fit()
    assert all(math.isfinite(h["loss"]) for h in history)
    assert all(p.isfinite().all() for p in trainer.model.parameters())
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


def test_starting_weights_at_a_relative_path_are_found_from_any_directory(tmp_path, monkeypatch):
    """conf/segment/demo.yaml's checkpoint is project-relative, as the render reads it: segment.train run from
    another directory said 'checkpoint file not found: models/demo_segmenter.pt'."""
    import segment.checkpoint
    from segment.checkpoint import save_checkpoint
    from segment.train import build_segmenter, load_start, segmenter_config

    project = tmp_path / "project"
    config, _ = segmenter_config(TINY_MODEL | {"num_classes": 6}, None)
    start = build_model(config)
    save_checkpoint(start, project / "models" / "start.pt")
    monkeypatch.setattr(segment.checkpoint, "PROJECT_ROOT", project)
    monkeypatch.chdir(tmp_path)
    built = build_segmenter(config, load_start("models/start.pt"))
    torch.testing.assert_close(weights(built), weights(start))


def test_fine_tuning_on_other_classes_keeps_the_starting_bn_eps_and_starts_the_class_layers_fresh(tmp_path, capsys):
    """COCO weights (91 classes, BatchNorm eps 0) fine-tuned on 5 classes, with r50_fpn.yaml's bn_eps null: the
    model was built with eps 1e-5 (the weights run wrong with it) and the class layers were a shape mismatch."""
    from segment.checkpoint import save_checkpoint
    from segment.train import CLASS_LAYERS, build_segmenter, load_start, segmenter_config

    coco, _ = segmenter_config(TINY_MODEL | {"norm": "bn", "num_classes": 91, "bn_eps": 0.0}, None)
    start = build_model(coco)
    save_checkpoint(start, tmp_path / "coco.pt")
    group = TINY_MODEL | {"norm": "bn", "bn_eps": None, "checkpoint": str(tmp_path / "coco.pt")}
    loaded = load_start(group["checkpoint"])
    config, name = segmenter_config(group, ["circle", "square", "triangle", "star", "ring"], loaded.config)
    model = build_segmenter(config, loaded, name)
    assert config.bn_eps == 0.0 and config.num_classes == 6
    ours, theirs = weights(model), weights(start)
    assert all(ours[k].shape[0] in (6, 6 * 4) for k in CLASS_LAYERS)
    torch.testing.assert_close({k: v for k, v in ours.items() if k not in CLASS_LAYERS},
                               {k: v for k, v in theirs.items() if k not in CLASS_LAYERS})
    assert "has 80 classes, the data 5: its class score, box and mask layers start fresh" in capsys.readouterr().out


@pytest.mark.parametrize("made_with, said", [
    (dict(backbone="resnet50"), r"unexpected backbone\.body\.layer1\.0\.conv3\.weight \.\.\. \(\d+\); shape mismatch "
     r"backbone\.body\.layer1\.0\.conv1\.weight \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\) \.\.\. \(\d+\): it holds a "
     r"resnet50 backbone, not resnet18: add segment=r50_fpn to the command \(or the segment config it was trained "
     r"with\)$"),
    (dict(fpn_channels=16, anchor_ratios=[1.0]),
     r"shape mismatch \S+ \(16, \d+, 1, 1\) vs model \(32, \d+, 1, 1\) \.\.\. \(\d+\): add segment\.fpn_channels=16 "
     r"segment\.anchor_ratios=\[1\.0\] to the command \(the settings it was made with\)$"),
])
def test_starting_weights_of_another_architecture_say_which_config_fits(tmp_path, made_with, said):
    """A torchvision R50 file fine-tuned under the default segment=r18_fpn: torch's first mismatch cut at 160
    characters ("... the shape in current model is torch.S"), with a tab, and no word on what would fit."""
    from segment.checkpoint import save_checkpoint
    from segment.errors import CheckpointError
    from segment.train import build_segmenter, load_start, segmenter_config

    path = str(tmp_path / "start.pt")
    made, _ = segmenter_config(TINY_MODEL | {"num_classes": 6} | made_with, None)
    save_checkpoint(build_model(made), path)
    start = load_start(path)
    config, _ = segmenter_config(TINY_MODEL | {"checkpoint": path}, None, start.config)
    with pytest.raises(CheckpointError) as error:
        build_segmenter(config, start, path)
    message = str(error.value)
    assert message.startswith(f"segment.checkpoint={path} does not fit segment config: ") and "\n" not in message
    assert "\t" not in message and re.search(said, message), message


def test_training_takes_names_and_records_the_classes_of_its_data(tmp_path, capsys):
    """segment.num_classes=3 with three class_names trained the data's 6 classes without a word, and config.yaml
    said num_classes: 3 for the 6-class model (r18_fpn.yaml's defaults: 91 and null)."""
    from omegaconf import OmegaConf

    from segment.checkpoint import load_checkpoint

    names = ["__background__", "circle", "square", "triangle", "star", "ring"]
    given = ("segment.num_classes=3", "segment.class_names=[__background__,a,b]")
    for run, overrides in (("given", given), ("default", ())):
        final = train(train_config(tmp_path / run, tmp_path / "data", *overrides))
        assert load_checkpoint(final).config.class_names == names
        recorded = OmegaConf.load(tmp_path / run / "config.yaml").segment
        assert (recorded.num_classes, list(recorded.class_names)) == (6, names)
        notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
        assert notes == ([] if run == "default" else [
            "note: the model learns the classes of its training data: segment.num_classes=3 (the data's: 6); "
            "segment.class_names=[__background__, a, b] (the data's: [__background__, circle, square, triangle, "
            "star, ring]) ignored"])


def test_dataset_error_in_a_worker_keeps_its_message(tmp_path):
    """torch re-raises a worker's exception as "Caught DatasetError in DataLoader worker process N." with the
    worker's traceback; the training loop must still get the one line the dataset said."""
    dataset = synthetic_split(tmp_path)
    missing = dataset.image_path(1)
    missing.unlink()
    stream = BatchStream(dataset, partial(BatchSampler, batch_size=4, drop_last=True), collate, num_workers=2)
    with pytest.raises(DatasetError) as caught:
        next(stream)
    assert str(caught.value) == f"image file not found: {missing}"


BAD_SETTINGS = [
    ("batch_size=0", "batch_size"), ("batch_size=-2", "batch_size"), ("batch_size=abc", "batch_size"),
    ("schedule.base_lr=-1", "schedule.base_lr"), ("data.hflip_prob=2", "data.hflip_prob"),
    ("data.resize.min_size=0", "data.resize.min_size"), ("data.resize.min_size=[64,0]", "data.resize.min_size"),
    ("segment.min_size=0", "segment.min_size"), ("data.num_workers=-1", "data.num_workers"),
    ("cpu_threads=-1", "cpu_threads"), ("eval_batch_size=0", "eval_batch_size"),
    ("schedule.max_iters=0", "schedule.max_iters"), ("amp=fp8", "amp"),
    ("data.hflip_prob=null", "data.hflip_prob"),  # was float(None) once the data was built
    # from scratch, random weights that never train and a norm that never normalizes
    ("segment.norm=frozen_bn", "segment.norm=frozen_bn"), ("segment.trainable_layers=3", "trainable_layers=3"),
    # the synthetic generator's settings: int('abc') was a traceback once output_dir was taken, 64.9 was cut to 64,
    # 1.5 refused as "(got 4, 1, 6)", naming no setting, and a negative seed was numpy's error
    ("data.generate_if_missing.n_train=abc", "data.generate_if_missing.n_train must be a whole number >= 0"),
    ("data.generate_if_missing.n_val=-1", "data.generate_if_missing.n_val"),
    ("data.generate_if_missing.size=64.9", "data.generate_if_missing.size must be a whole number >= 32"),
    ("data.generate_if_missing.size=1.5", "data.generate_if_missing.size"),
    ("data.generate_if_missing.size=16", "data.generate_if_missing.size"),
    ("data.generate_if_missing.seed=-1", "data.generate_if_missing.seed"),
    ("+data.generate_if_missing.count=5", "unknown data.generate_if_missing setting"),
    ("data.generate_if_missing=abc", "data.generate_if_missing must be null or hold"),
    ("data.resize.max_size=[100,200]", "data.resize.max_size"),  # one cap: a TypeError once training had begun
    ("data.aspect_grouping=no", "data.aspect_grouping"), ("data.drop_empty=maybe", "data.drop_empty"),  # were on
    ("data.category_ids=abc", "data.category_ids must be null or a list"),  # was read as the ids 'a', 'b', 'c'
    # keys no reader knows trained as if they were not there
    ("+segment_evry=2", "unknown top-level setting.s. segment_evry; known: output_dir"),
    ("+schedule.foo=1", "unknown schedule setting.s. foo"), ("+data.foo=1", "unknown data setting.s. foo"),
    ("+data.resize.foo=1", "unknown data.resize setting.s. foo"), ("+data.val.foo=1", "unknown data.val setting"),
]


@pytest.mark.parametrize("override, key", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, override, key):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=key) as caught:
        train(train_config(out, tmp_path / "data", override))
    assert "\n" not in str(caught.value)
    assert not out.exists() and not (tmp_path / "data").exists()  # nothing built, generated or written


def _unwritable_folders(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    folders = [a_file, a_file / "run", Path("/proc/self/run")]
    if os.geteuid() != 0:  # root writes into a read-only folder all the same
        folders.append(read_only)
    return folders


def test_unwritable_output_dir_is_refused_before_anything_runs(tmp_path):
    for out in _unwritable_folders(tmp_path):
        with pytest.raises(ConfigError, match="output_dir"):
            train(train_config(out, tmp_path / "data"))
    assert not (tmp_path / "data").exists()


def test_cli_reports_worker_and_output_errors_in_one_line(tmp_path):
    """Hydra makes output_dir before the app runs, and the data error comes from a DataLoader worker process:
    both still end in one "error: ..." line and exit status 2."""
    common = ["-m", "segment.train", "schedule=tiny", *CLI_OVERRIDES]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    done = run_module([*common, f"output_dir={a_file}", f"data.root={tmp_path / 'data'}"])
    assert done.returncode == 2 and done.stderr.startswith("error: output_dir"), done.stderr[-2000:]
    assert done.stderr.count("\n") == 1

    broken = synthetic_split(tmp_path / "data").image_path(1)  # a missing one is found before any worker starts
    broken.write_bytes(b"not a png")
    done = run_module([*common, f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                       "data.num_workers=2", "batch_size=4"])
    assert done.returncode == 2 and done.stderr.startswith(f"error: cannot decode image {broken} ("), done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("flag", [["--help"], ["--cfg", "job"]])
def test_cli_help_and_cfg_make_no_output_dir(tmp_path, flag):
    done = run_module(["-m", "segment.train", f"output_dir={tmp_path / 'run'}", *flag])
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "run").exists()


class WorkerPids(torch.utils.data.Dataset):
    """Each sample says which process loaded it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return torch.zeros(1), {"pid": os.getpid()}


def test_sigterm_from_outside_stops_a_worker_like_ctrl_c():
    """`kill -TERM -PGID` reaches the workers too: a worker killed by it made the main process raise "DataLoader
    worker ... is killed by signal" in place of its own interrupt. A worker must end quietly instead."""
    stream = BatchStream(WorkerPids(), partial(BatchSampler, batch_size=2, drop_last=True), collate, num_workers=2)
    worker = next(stream)[1][0]["pid"]
    subprocess.run(["kill", "-TERM", str(worker)], check=True)  # not from its parent, as a scheduler's signal
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}/stat").is_file() and Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the worker ignored SIGTERM"
        time.sleep(0.05)
    time.sleep(0.5)  # torch's SIGCHLD handler raises here if the worker died of the signal
    del stream


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_to_the_process_group_is_a_clean_interrupt(tmp_path, signum, status):
    """SIGHUP (the terminal closed) reaches the workers too: they died of it, and so did the training. The exit
    status is the signal's (SIGTERM was 130, Ctrl-C's)."""
    command = [sys.executable, "-m", "segment.train", "schedule=tiny", "schedule.max_iters=1000", *CLI_OVERRIDES,
               f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "data.num_workers=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    process = interruptible_popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        started = any(line.startswith("iter 3/") for line in process.stdout)  # stops reading there
        assert started, process.communicate(timeout=60)[1][-2000:]
        os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == status and "killed by signal" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")


def test_a_malformed_validation_annotation_fails_before_training(tmp_path):
    """It failed at the first evaluation, after the training up to it."""
    import json

    from segment.data import DatasetError

    data = tmp_path / "data"
    synthetic_split(data)
    train(train_config(tmp_path / "first", data, "eval_every=2"))  # generates the val split too
    annotations = data / "annotations" / "instances_val.json"
    coco = json.loads(annotations.read_text())
    coco["annotations"][0]["segmentation"] = [["a", "b", "c", "d", "e", "f"]]
    annotations.write_text(json.dumps(coco))
    with pytest.raises(DatasetError):
        train(train_config(tmp_path / "run", data, "eval_every=100"))
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("batch_size, factor", [(2, 8), (16, 1)])
def test_paper_schedule_scales_its_iterations_with_the_images_per_iteration(tmp_path, batch_size, factor):
    """paper_1x scaled only the lr with the batch: at 2 images per iteration it trained 1/8 of the paper's
    schedule (160k iterations of 2 images) while its yaml called it the paper's recipe."""
    from segment.distributed import DistInfo
    from segment.train import build_trainer, checked_train_settings

    cfg = train_config(tmp_path / "run", tmp_path / "data", "schedule=paper_1x", f"batch_size={batch_size}",
                       f"data.generate_if_missing.n_train={batch_size}")
    trainer = build_trainer(cfg, DistInfo(), checked_train_settings(cfg))
    assert trainer.settings.max_iters == 160000 * factor
    assert trainer.scheduler.milestones == [120000 * factor, 160000 * factor]
    assert trainer.scheduler.warmup_iters == 1000 * factor
    assert trainer.scheduler.base_lrs[0] == pytest.approx(0.02 * batch_size / 16)


def test_schedule_scaling_rounds_and_leaves_unreferenced_schedules_alone():
    from fractions import Fraction

    from omegaconf import OmegaConf

    from segment.train import describe_schedule, effective_schedule

    paper = OmegaConf.create({"reference_images_per_iter": 16, "max_iters": 160000, "steps": [120000, 160000],
                              "warmup_iters": 1000, "gamma": 0.1})
    assert effective_schedule(paper, 3) == {"max_iters": 853333, "steps": [640000, 853333], "warmup_iters": 5333,
                                            "factor": Fraction(16, 3)}
    assert effective_schedule(paper, 32)["steps"] == [60000, 80000]
    # fractions of .5 and more round up (426666.67), not down as int() would
    assert effective_schedule(paper, 6) == {"max_iters": 426667, "steps": [320000, 426667], "warmup_iters": 2667,
                                            "factor": Fraction(8, 3)}
    assert describe_schedule(paper, 2) == (
        "schedule: 1280000 iterations, warm-up 8000, lr x0.1 at iterations 960000, 1280000 "
        "(schedule.reference_images_per_iter=16: its counts x8 for 2 images/iter, the same epochs)")
    demo = OmegaConf.merge(paper, {"reference_images_per_iter": None})
    assert effective_schedule(demo, 2)["steps"] == [120000, 160000]


def test_scaled_schedule_trains_resumes_and_says_so(tmp_path, capsys):
    """tiny's 2 iterations quoted for 4 images per iteration: 4 iterations of 2 images, and a resume to 3 of its
    iterations continues to 6."""
    scaled = ("schedule.reference_images_per_iter=4", "schedule.steps=[1]", "schedule.warmup_iters=1",
              "schedule.warmup_factor=0.5")
    train(train_config(tmp_path / "run", tmp_path / "data", *scaled))
    out = capsys.readouterr().out
    assert "schedule: 4 iterations, warm-up 2, lr x0.1 at iterations 2 (schedule.reference" in out
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in metrics] == [1, 2, 3, 4]
    assert [m["lr"] for m in metrics] == pytest.approx([0.0025 * 0.5, 0.0025 * 0.75, 0.00025, 0.00025])
    train(train_config(tmp_path / "run", tmp_path / "data", *scaled, "resume=true", "schedule.max_iters=3"))
    assert "resumed from" in capsys.readouterr().out
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_checkpoint_whose_scheduler_ran_other_iteration_counts(dataset, tmp_path):
    """A paper_1x checkpoint from before its counts were scaled records the same schedule settings: its scheduler's
    milestones (loaded over this run's) are what tell."""
    make_trainer(dataset, tmp_path, 1, steps=[4]).fit()
    checkpoint = torch.load(tmp_path / LAST, weights_only=True)
    checkpoint["training_state"]["scheduler"]["milestones"] = [1]
    torch.save(checkpoint, tmp_path / LAST)
    with pytest.raises(TrainingError, match=r"lr schedule's milestones \[1\] -> \[4\]"):
        make_trainer(dataset, tmp_path, 3, steps=[4]).resume(tmp_path / LAST)


def test_process_group_timeout_outlasts_an_evaluation(tmp_path, monkeypatch):
    """The other ranks wait at a barrier while rank 0 evaluates: torch's default 30 minutes is shorter than a COCO
    val evaluation can take."""
    import segment.train

    timeouts = []

    def init_distributed(device, timeout_minutes=30.0):
        timeouts.append(timeout_minutes)
        raise KeyboardInterrupt  # nothing further is needed

    monkeypatch.setattr(segment.train, "init_distributed", init_distributed)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(tmp_path / "run", tmp_path / "data"))
    with pytest.raises(KeyboardInterrupt):
        train(train_config(tmp_path / "run", tmp_path / "data", "dist_timeout_min=600"))
    assert timeouts == [180.0, 600.0]
    with pytest.raises(UserError, match="dist_timeout_min must be a finite number > 0"):
        train(train_config(tmp_path / "run", tmp_path / "data", "dist_timeout_min=0"))


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_a_user_error_is_reported_by_rank_0_alone(monkeypatch, capsys, rank, shown):
    """Under torchrun every process met the same error (or Ctrl-C) and printed its own `error: ...` line."""
    from segment.train import _fail

    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exited:
        _fail(ConfigError("batch_size must be a whole number >= 1, got 0"))
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("error: batch_size must be a whole number >= 1, got 0\n" if shown else "")


def test_resume_note_counts_one_process_in_the_singular(dataset, tmp_path, capsys):
    """"written by 1 processes, now 2"."""
    from segment.distributed import DistInfo

    make_trainer(dataset, tmp_path, 1, batch_size=2).fit()
    two = make_trainer(dataset, tmp_path, 2, batch_size=1)  # 1 x 2 images per iteration, as 2 processes x 1
    two.info = DistInfo(world_size=2)
    capsys.readouterr()
    two.resume(tmp_path / LAST)
    assert "written by 1 process, now 2: " in capsys.readouterr().out


class _Linear(torch.nn.Module):
    """loss = 3 * sum(w): every element's gradient is 3 at any w, so each SGD step's size is the lr times 3."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, images, targets):
        return {"loss_a": (self.w * 3.0).sum()}


def _linear_trainer(tmp_path, amp="none", clip_grad_norm=0.0, warmup_iters=0):
    from segment.engine import Trainer, TrainSettings

    model = _Linear()
    opt = build_optimizer(model, 1.0, momentum=0.0, weight_decay=0.0)
    sched = WarmupMultiStepLR(opt, [2], gamma=0.5, warmup_iters=warmup_iters, warmup_factor=0.1)
    return model, Trainer(model, opt, sched, None, TrainSettings(tmp_path, 4, amp=amp, clip_grad_norm=clip_grad_norm))


def test_each_step_uses_the_lr_it_logs(tmp_path):
    # fit logs the lr read before train_step: the optimizer must step with it before the scheduler moves on
    model, trainer = _linear_trainer(tmp_path, warmup_iters=2)
    logged, steps = [], []
    for _ in range(4):
        logged.append(trainer.optimizer.param_groups[0]["lr"])
        before = model.w.detach().clone()
        trainer.train_step([], [])
        steps.append((before - model.w.detach()) / 3.0)
    # warm-up 0.1 -> 1 over two iterations, then halved at the milestone 2
    assert logged == pytest.approx([0.1, 0.55, 0.5, 0.5])
    for lr, step in zip(logged, steps):
        assert step.tolist() == pytest.approx([lr] * 4)


def test_fp16_clipping_bounds_the_unscaled_gradient(tmp_path):
    # clipping the scaled gradients (65536 x) would shrink the update by the scale instead of to the clip norm
    model, trainer = _linear_trainer(tmp_path, amp="fp16", clip_grad_norm=1.0)
    assert trainer.scaler.is_enabled()
    before = model.w.detach().clone()
    trainer.train_step([], [])
    reference = torch.nn.Parameter(before.clone())
    reference.grad = torch.full((4,), 3.0)
    torch.nn.utils.clip_grad_norm_([reference], 1.0)
    assert (before - model.w.detach()).tolist() == pytest.approx(reference.grad.tolist(), rel=1e-3)
    assert float((before - model.w.detach()).norm()) == pytest.approx(1.0, rel=1e-3)


def test_a_diverging_run_stops_with_a_training_error_and_no_final_model(dataset, tmp_path):
    trainer = make_trainer(dataset, tmp_path, 2, lr=1e9)
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.fit()
    assert not (tmp_path / "model_final.pt").exists()


@pytest.mark.parametrize("corrupted_by, what", [(3, "loss"), (4, "weights")])
def test_a_run_diverging_between_logging_windows_keeps_its_good_checkpoint(dataset, tmp_path, corrupted_by, what):
    """checkpoint_every=2, log_every=6: only a logged loss was checked, so the checkpoint at iteration 4 wrote the
    NaN weights of a run diverged after 2 over the good last.pt. Weights gone NaN by iteration `corrupted_by` (3: the
    next step's loss is NaN; 4: only the weights are, that step's loss was finite) stop it before that checkpoint."""
    trainer = make_trainer(dataset, tmp_path, 6, log_every=6, checkpoint_every=2)
    step = trainer.train_step

    def diverging(*batch):
        losses = step(*batch)
        if trainer.iteration + 1 == corrupted_by:  # fit counts this step once it returns
            with torch.no_grad():
                trainer.parameters[-1].fill_(math.nan)
        return losses

    trainer.train_step = diverging
    with pytest.raises(TrainingError, match=f"the {what} became non-finite by iteration 4") as error:
        trainer.fit()
    assert f"{tmp_path / LAST} (iteration 2) is kept" in str(error.value)
    saved = torch.load(tmp_path / LAST, weights_only=True)
    assert saved["iteration"] == 2 and all(v.isfinite().all() for v in saved["model"].values())
    assert not (tmp_path / "model_final.pt").exists()


def test_a_logging_window_reports_its_mean_loss_and_all_its_images(dataset, tmp_path):
    each = [h for h in make_trainer(dataset, tmp_path / "each", 3, seed=5, log_every=1).fit() if h["type"] == "train"]
    window = [h for h in make_trainer(dataset, tmp_path / "window", 3, seed=5, log_every=3).fit()
              if h["type"] == "train"]
    assert len(each) == 3 and len(window) == 1
    for key in ("loss", *(k for k in window[0] if k.startswith("loss_"))):
        assert window[0][key] == pytest.approx(np.mean([h[key] for h in each]), rel=1e-5), key
    # the first window starts with the run: its seconds are the run's time so far, over 3 iterations of 2 images
    assert window[0]["images_per_s"] == pytest.approx(3 * 2 / window[0]["time"], rel=1e-2)
