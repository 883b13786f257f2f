"""Stopping and resuming a training: exact with DataLoader workers, metrics.jsonl without repeats, checkpoints that
survive a failing evaluation, refused resumes that change nothing, overwrite=true that leaves no old run behind."""
from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler

from common.outputs import AtomicOutput, leftover_temp_files
from segment.engine import FINAL, LAST, METRICS, TrainingError
from segment.loader import BatchStream
from segment.train import train
from tests.train_fixtures import data_root, make_trainer, one_thread, synthetic_split, train_config  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_thread")


def _iterations(output_dir) -> list[int]:
    return [json.loads(line)["iter"] for line in (output_dir / METRICS).read_text().splitlines()]


def _losses(history) -> list[float]:
    return [h["loss"] for h in history if h["type"] == "train"]


def test_resume_is_exact_with_dataloader_workers(data_root, tmp_path):
    """Random flips drawn in two worker processes: 6 iterations straight == 2, stop, resume for 4 (3 epochs of 2
    batches), to the bit."""
    flipped = synthetic_split(data_root, hflip_prob=0.5)
    kwargs = dict(lr=0.01, num_workers=2, clip_grad_norm=10.0)
    expected = _losses(make_trainer(flipped, tmp_path / "straight", 6, **kwargs).fit())
    make_trainer(flipped, tmp_path / "split", 2, **kwargs).fit()
    second = make_trainer(flipped, tmp_path / "split", 6, **kwargs)
    second.resume(tmp_path / "split" / LAST)
    assert _losses(second.fit()) == expected[2:]


def test_resume_cuts_metrics_back_to_the_checkpoint(data_root, tmp_path):
    """Interrupted after iteration 6 with last.pt from iteration 4: the resumed run logs 5 and 6 again, once."""
    first = make_trainer(synthetic_split(data_root), tmp_path, 8, checkpoint_every=4)
    step = first.train_step

    def interrupted_after_six(*batch):
        if first.iteration == 6:
            raise KeyboardInterrupt
        return step(*batch)

    first.train_step = interrupted_after_six
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert _iterations(tmp_path) == [1, 2, 3, 4, 5, 6]
    second = make_trainer(synthetic_split(data_root), tmp_path, 8, checkpoint_every=4)
    second.resume(tmp_path / LAST)
    second.fit()
    assert _iterations(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_checkpoint_is_saved_before_a_failing_evaluation(data_root, tmp_path):
    trainer = make_trainer(synthetic_split(data_root), tmp_path, 6, eval_every=4, checkpoint_every=4)

    def broken_evaluator(model):
        raise RuntimeError("evaluation failed")

    trainer.evaluator = broken_evaluator
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.fit()
    assert torch.load(tmp_path / LAST, weights_only=True)["training_state"]["iteration"] == 4


@pytest.mark.parametrize("change", [dict(lr=0.02), dict(batch_size=1), dict(steps=[5]), dict(seed=1),
                                    dict(amp="fp16")])
def test_resume_refuses_another_schedule_or_batch_size(data_root, tmp_path, change):
    """The checkpoint's optimizer and scheduler carry the learning rate and its schedule: a resume that asks for
    others would run with the old ones while its config said otherwise. The seed picks the data order and the
    augmentation, which the checkpoint's data position continues. amp=fp16's grad scaler has no state in a
    checkpoint of amp=none to load (a traceback: "The source state dict is empty")."""
    make_trainer(synthetic_split(data_root), tmp_path, 1).fit()
    longer = make_trainer(synthetic_split(data_root), tmp_path, 3)
    longer.resume(tmp_path / LAST)  # only the number of iterations may change
    other = make_trainer(synthetic_split(data_root), tmp_path, 3, **change)
    key = {"lr": "schedule.base_lr", "batch_size": "batch_size", "steps": "schedule.steps",
           "seed": "seed 0 -> 1", "amp": "amp none -> fp16"}[next(iter(change))]
    with pytest.raises(TrainingError, match=key):
        other.resume(tmp_path / LAST)


def test_resume_compares_images_per_iteration_over_all_processes(data_root, tmp_path):
    """A run of 2 processes x 2 images resumed by 1 process x 2 kept the learning rate scaled for 4 images per
    iteration; 1 x 4 is the same run's batch."""
    make_trainer(synthetic_split(data_root), tmp_path, 1, batch_size=2).fit()
    checkpoint = torch.load(tmp_path / LAST, weights_only=True)
    checkpoint["training_state"]["world_size"] = 2  # as segment.train under torchrun --nproc_per_node=2 saves it
    torch.save(checkpoint, tmp_path / LAST)
    with pytest.raises(TrainingError, match=r"images per iteration \(batch_size x processes\) 4 -> 2"):
        make_trainer(synthetic_split(data_root), tmp_path, 3, batch_size=2).resume(tmp_path / LAST)
    make_trainer(synthetic_split(data_root), tmp_path, 3, batch_size=4).resume(tmp_path / LAST)


def test_resume_past_max_iters_is_refused_and_a_finished_run_left_alone(data_root, tmp_path, capsys):
    """A resume whose max_iters was at or below the checkpoint's iteration rewrote model_final.pt without
    training; one below it now says so, one at it leaves the finished run's files as they are."""
    make_trainer(synthetic_split(data_root), tmp_path, 3).fit()
    finished = {name: (tmp_path / name).stat().st_ino for name in (LAST, FINAL)}
    with pytest.raises(TrainingError, match="at iteration 3, past schedule.max_iters=2"):
        make_trainer(synthetic_split(data_root), tmp_path, 2).resume(tmp_path / LAST)
    again = make_trainer(synthetic_split(data_root), tmp_path, 3)
    again.resume(tmp_path / LAST)
    assert again.fit() == []
    assert {name: (tmp_path / name).stat().st_ino for name in (LAST, FINAL)} == finished
    assert "already trained for schedule.max_iters=3 iterations: nothing to do" in capsys.readouterr().out


def test_refused_resume_leaves_config_yaml_alone(data_root, tmp_path):
    train(train_config(tmp_path, data_root))
    written = (tmp_path / "config.yaml").read_text()
    with pytest.raises(TrainingError, match="fpn_channels"):
        train(train_config(tmp_path, data_root, "resume=true", "segment.fpn_channels=64"))
    assert (tmp_path / "config.yaml").read_text() == written


def test_overwrite_removes_the_previous_run_before_training(data_root, tmp_path, monkeypatch, capsys):
    """A new run that fails before its first checkpoint must not leave the old run for resume=true to continue,
    nor the temp file of a checkpoint save that a SIGKILL cut short."""
    train(train_config(tmp_path, data_root))
    AtomicOutput(tmp_path / LAST, overwrite=True).__enter__()  # killed mid-save: no __exit__ removes it
    assert leftover_temp_files(tmp_path / LAST)

    def failing_step(self, images, targets):
        raise RuntimeError("step failed")

    with monkeypatch.context() as patch:
        patch.setattr("segment.engine.Trainer.train_step", failing_step)
        with pytest.raises(RuntimeError, match="step failed"):
            train(train_config(tmp_path, data_root, "overwrite=true"))
    assert not {LAST, "model_final.pt", METRICS} & {p.name for p in tmp_path.iterdir()}
    assert not leftover_temp_files(tmp_path / LAST)
    capsys.readouterr()
    train(train_config(tmp_path, data_root, "resume=true"))
    assert "starting from scratch" in capsys.readouterr().out
    assert _iterations(tmp_path) == [1, 2]


def test_evaluating_during_training_leaves_its_random_sampling_alone(data_root, tmp_path):
    """The evaluation's DataLoader drew its base seed from the global torch RNG (with no workers too): every RPN and
    RoI sampling after an evaluation changed, so eval_every changed the training, and a resume from the checkpoint
    saved just before the evaluation went another way than the run it continued."""
    from segment.evaluate import evaluate

    dataset = synthetic_split(data_root)
    kwargs = dict(lr=0.01, clip_grad_norm=10.0)
    plain = _losses(make_trainer(dataset, tmp_path / "plain", 4, **kwargs).fit())

    def evaluated(output_dir, max_iters):
        trainer = make_trainer(dataset, output_dir, max_iters, eval_every=2, **kwargs)
        trainer.evaluator = lambda model: evaluate(model, dataset, batch_size=2, progress=False)
        return trainer

    straight = _losses(evaluated(tmp_path / "straight", 4).fit())
    evaluated(tmp_path / "split", 2).fit()  # last.pt at iteration 2, then the evaluation
    resumed = evaluated(tmp_path / "split", 4)
    resumed.resume(tmp_path / "split" / LAST)
    assert straight == plain and _losses(resumed.fit()) == straight[2:]


def test_trainer_evaluate_restores_every_rng(data_root, tmp_path):
    """Whatever an evaluator draws (torch, Python's random, numpy), training continues from the same RNG states."""
    import random

    import numpy as np

    trainer = make_trainer(synthetic_split(data_root), tmp_path, 1)

    def drawing_evaluator(model):
        torch.rand(3), random.random(), np.random.rand(2)
        return {"bbox_AP": 0.5}

    trainer.evaluator = drawing_evaluator
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    assert trainer.evaluate() == {"bbox_AP": 0.5}
    torch.testing.assert_close(torch.get_rng_state(), before[0], rtol=0, atol=0)
    assert random.getstate() == before[1] and (np.random.get_state()[1] == before[2]).all()


def test_rngs_kept_on_the_device_under_test(device):
    """What Trainer.evaluate wraps the evaluator in: on CUDA the device's RNG is kept too (`pytest --device cuda`:
    a CUDA evaluator's draws would shift the proposal and RoI sampling of the training steps after it)."""
    import random

    import numpy as np

    from segment.engine import _rng_kept

    def states():
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()[1].copy()

    before = states()
    with _rng_kept(device):
        torch.rand(3), torch.rand(3, device=device), random.random(), np.random.rand(2)
        assert not torch.equal(torch.get_rng_state(), before[0])
    after = states()
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    if device.type == "cuda":
        torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    assert after[2] == before[2] and (after[3] == before[3]).all()


def test_evaluate_draws_nothing_from_the_global_rng(data_root):
    from segment.evaluate import evaluate
    from segment.model import build_model
    from tests.train_fixtures import tiny_config

    model = build_model(tiny_config()).eval()
    before = torch.get_rng_state()
    evaluate(model, synthetic_split(data_root), batch_size=2, max_images=2, progress=False)
    torch.testing.assert_close(torch.get_rng_state(), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["config.yaml", METRICS, FINAL])
def test_a_folder_holding_any_run_file_is_not_replaced_without_overwrite(data_root, tmp_path, name):
    """Only last.pt counted as an earlier run, and it comes at the first checkpoint: a folder with the user's own
    config.yaml or metrics.jsonl, or a run stopped before its first checkpoint, was silently replaced."""
    (tmp_path / name).write_text("mine\n")
    with pytest.raises(TrainingError, match=rf"already holds a run \({name}\); pass resume=true.*overwrite=true"):
        train(train_config(tmp_path, data_root))
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_text() == "mine\n"


def test_a_second_training_into_the_same_output_dir_stops_while_the_first_runs(data_root, tmp_path, monkeypatch):
    """Two runs into one output_dir both went on: metrics.jsonl interleaved, model_final.pt the last writer's. A run
    holds output_dir/.lock (flock) from start to end; a second one, overwrite=true or not, stops at once."""
    import os

    from segment.engine import Trainer

    refusals = []
    step = Trainer.train_step

    def start_another_run_first(self, images, targets):
        if not refusals:
            refusals.append("tried")
            with pytest.raises(TrainingError, match=rf"^output_dir={tmp_path} is in use by another training "
                                                    rf"\(pid {os.getpid()}\)$"):
                train(train_config(tmp_path, data_root, "overwrite=true"))
        return step(self, images, targets)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", start_another_run_first)
        train(train_config(tmp_path, data_root))
    assert refusals and _iterations(tmp_path) == [1, 2]
    assert not (tmp_path / ".lock").exists()  # released and removed at the end
    (tmp_path / ".lock").write_text("4242\n")  # what a killed run leaves: the kernel released its lock
    train(train_config(tmp_path, data_root, "resume=true", "schedule.max_iters=3"))
    assert _iterations(tmp_path) == [1, 2, 3]


class _Draws(torch.utils.data.Dataset):
    """Each sample is its index and one draw from torch's global RNG: what a random flip or scale reads."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return index, torch.rand(1).item()


def _stream_batches(num_workers: int, count: int = 4) -> list[list[tuple[int, float]]]:
    stream = BatchStream(_Draws(), partial(BatchSampler, batch_size=2, drop_last=True), list, seed=5,
                         num_workers=num_workers)
    return [next(stream) for _ in range(count)]


def test_the_stream_shuffles_each_epoch_and_seeds_each_sample_apart():
    batches = _stream_batches(0)
    for epoch in range(2):  # two batches an epoch
        sampler = DistributedSampler(_Draws(), num_replicas=1, rank=0, shuffle=True, seed=5)
        sampler.set_epoch(epoch)
        assert [i for batch in batches[2 * epoch:2 * epoch + 2] for i, _ in batch] == list(sampler), epoch
    draws = [draw for batch in batches for _, draw in batch]
    assert len(set(draws)) == len(draws)  # no two places, in a batch or across epochs, draw alike
    # a worker's RNG is reseeded per sample as the main process's is: the same draws with or without workers
    assert _stream_batches(2) == batches
