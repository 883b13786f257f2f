"""segment.train's output folder: an earlier run kept until the new one is sure to start, no folder left by a
refused run, and a sweep (-m) whose jobs each train into a folder of their own."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from common.errors import UserError
from segment.train import CONFIG, RUN_FILES, train
from tests.train_fixtures import CLI_OVERRIDES, ROOT, data_root, one_thread, train_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    """`python -m segment.train` with the tiny model and data, run in `cwd` (where Hydra's own folders would land)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "segment.train", *args, "schedule=tiny", *CLI_OVERRIDES], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides, message", [
    (["segment.checkpoint=/nonexistent.pt"], "checkpoint file not found"),
    (["data.generate_if_missing=null", "data.train.annotations=/nonexistent.json"], "annotation file not found"),
], ids=["starting_weights", "data"])
def test_overwrite_keeps_the_earlier_run_when_the_new_one_cannot_start(data_root, tmp_path, overrides, message):
    """overwrite=true removed the earlier run's files first, then failed to load its starting weights or data: the
    old run was gone and no new one came."""
    train(train_config(tmp_path, data_root))
    before = {name: (tmp_path / name).read_bytes() for name in RUN_FILES}
    with pytest.raises(UserError, match=message):
        train(train_config(tmp_path, data_root, "overwrite=true", *overrides))
    assert {name: (tmp_path / name).read_bytes() for name in RUN_FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(RUN_FILES)  # no lock, no temp file left either


def test_a_run_refused_once_its_folder_is_made_leaves_no_folder(data_root, tmp_path):
    """The folders made for output_dir stayed, empty, after a refusal that comes only once it is taken."""
    with pytest.raises(UserError, match="checkpoint file not found"):
        train(train_config(tmp_path / "new" / "run", data_root, "segment.checkpoint=/nonexistent.pt"))
    assert list(tmp_path.iterdir()) == []


def test_cli_refusing_a_setting_makes_no_folder(data_root, tmp_path):
    """Hydra's run folder was output_dir, made (with its missing parents) before any setting was checked."""
    (tmp_path / "cwd").mkdir()
    done = _train_cli([f"output_dir={tmp_path / 'new' / 'run'}", f"data.root={data_root}", "batch_size=0"],
                      tmp_path / "cwd")
    assert done.returncode == 2 and done.stderr == "error: batch_size must be a whole number >= 1, got 0\n", done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"] and not list((tmp_path / "cwd").iterdir())


def test_a_sweep_trains_each_job_into_a_folder_of_its_own(data_root, tmp_path):
    """Every job of `-m seed=0,1 output_dir=D` trained into D: the second found the first's run there and stopped
    the sweep, and Hydra left empty multirun/<date>/<time>/<job> folders in the working folder."""
    cwd, out = tmp_path / "cwd", tmp_path / "sweep"
    cwd.mkdir()
    done = _train_cli(["-m", "seed=0,1", f"output_dir={out}", f"data.root={data_root}"], cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    for job in (0, 1):
        assert set(RUN_FILES) <= {p.name for p in (out / str(job)).iterdir()}
        config = yaml.safe_load((out / str(job) / CONFIG).read_text())
        assert (config["seed"], config["output_dir"]) == (job, str(out / str(job)))
    assert not list(cwd.iterdir())  # no multirun/ nor outputs/ folder where it ran

    resumed = _train_cli(["-m", "seed=0,1", f"output_dir={out}", f"data.root={data_root}", "resume=true",
                          "schedule.max_iters=3"], cwd)
    assert resumed.returncode == 0 and resumed.stdout.count("resumed from") == 2, resumed.stderr[-2000:]


@pytest.mark.parametrize("output_dir, message", [
    # Hydra makes a sweep's output_dir (its sweep folder) before any job runs: checked first, without making it
    ("{tmp}/a_file/run", r"error: output_dir=\S+/a_file/run cannot be \S+.*\n"),
    # no one folder for Hydra's sweep: every combination of its values with the others' ran, each job in a
    # numbered folder anyway, and Hydra's sweep folder was the default output_dir's
    ("{tmp}/a,{tmp}/b", r"error: output_dir cannot be swept: a sweep trains job N into output_dir/N, .*\n"),
], ids=["unwritable", "swept"])
def test_a_sweep_with_an_output_dir_hydra_cannot_use_is_refused_in_one_line(tmp_path, output_dir, message):
    (tmp_path / "a_file").write_text("not a folder")
    done = _train_cli(["-m", "seed=0,1", f"output_dir={output_dir.format(tmp=tmp_path)}",
                       f"data.root={tmp_path / 'data'}"], tmp_path)
    assert done.returncode == 2 and re.fullmatch(message, done.stderr), done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_the_schedule_settings_reach_the_optimizer_scheduler_stream_and_loop(data_root, tmp_path):
    import torch

    from segment.distributed import DistInfo
    from segment.train import build_trainer, checked_train_settings

    cfg = train_config(tmp_path / "run", data_root, "schedule.gamma=0.5", "schedule.momentum=0.5",
                       "schedule.norm_weight_decay=0", "schedule.bias_weight_decay=0.001", "schedule.steps=[1]",
                       "clip_grad_norm=3", "seed=7")
    trainer = build_trainer(cfg, DistInfo(), checked_train_settings(cfg))
    assert trainer.settings.clip_grad_norm == 3.0
    assert trainer.stream.seed == 7
    assert trainer.scheduler.gamma == 0.5 and trainer.scheduler.milestones == [1]
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 0.001]
    assert all(g["momentum"] == 0.5 and not g["nesterov"] for g in groups)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    norms = {n for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    norm_names, bias_names = ({names[id(p)] for p in g["params"]} for g in groups[1:])
    assert norm_names and all(n.rpartition(".")[0] in norms for n in norm_names)
    assert bias_names and all(n.endswith(".bias") and n.rpartition(".")[0] not in norms for n in bias_names)
    assert all(n.endswith(".bias") or n.rpartition(".")[0] in norms for n in norm_names | bias_names)
    # one step by hand: plain (not Nesterov) momentum's first step is lr * (grad + decay * weight)
    lr = groups[0]["lr"]
    expected = {}
    for group in groups:
        for p in group["params"]:
            p.grad = torch.full_like(p, 0.25)
            expected[id(p)] = p.detach() - lr * (p.grad + group["weight_decay"] * p.detach())
    trainer.optimizer.step()
    for group in groups:
        for p in group["params"]:
            torch.testing.assert_close(p.detach(), expected[id(p)], rtol=0, atol=1e-6)
