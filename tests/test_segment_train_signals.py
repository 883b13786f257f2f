"""segment.train stopped by a signal at each phase: what it leaves on disk, and that its one line says so truly.

The signal is sent at a phase boundary by a patched function (the real one, then os.kill), never by timing: in this
process for `train` itself, in a child for `python -m segment.train` (its handlers, Hydra's sweep)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common import outputs
from segment import engine
from segment.data import synthetic
from segment.engine import FINAL, LAST
from tests.helpers_process import run_interruptible, stop_after
from tests.train_fixtures import CLI_OVERRIDES, ROOT, one_thread, train_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")



def _stopped_training(cfg):
    """`train(cfg)` stopped by the SIGINT a patch sends -> what `main` would say of it."""
    from segment.train import TrainingRun, interrupted_message, train

    run = TrainingRun()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run)
    return interrupted_message(run, Path(cfg.output_dir))


def _at_iteration(iteration: int):
    return lambda trainer, *batch: trainer.iteration + 1 == iteration  # train_step runs before the count goes up


@pytest.mark.parametrize("earlier_run", [False, True], ids=["fresh", "overwrite"])
def test_stopped_before_the_first_checkpoint_a_run_leaves_nothing_and_says_so(tmp_path, monkeypatch, ctrl_c,
                                                                             earlier_run):
    """The message promised "`resume=true output_dir=...` continues from the last checkpoint" where there was none
    (and, with overwrite=true, the earlier run was already gone); the run's config.yaml and metrics.jsonl then made
    the same command refuse the folder."""
    from segment.train import train

    out, data = tmp_path / "run", tmp_path / "data"
    if earlier_run:
        train(train_config(out, data))
    overrides = ["schedule.max_iters=3", *(["overwrite=true"] if earlier_run else [])]
    with monkeypatch.context() as patches:
        stop_after(patches, engine.Trainer, "train_step", _at_iteration(1))
        message = _stopped_training(train_config(out, data, *overrides))
    assert message == "interrupted; no checkpoint was written: the same command starts over"
    assert not out.exists() or list(out.iterdir()) == []  # an earlier run's folder stays, emptied
    assert train(train_config(out, data, *overrides)) == out / FINAL


def test_a_signal_during_a_checkpoint_commit_names_that_checkpoint(tmp_path, monkeypatch, ctrl_c):
    """AtomicOutput holds a signal back until last.pt is in place: the message must count that checkpoint."""
    out = tmp_path / "run"
    cfg = train_config(out, tmp_path / "data", "schedule.max_iters=3", "checkpoint_every=1")
    stop_after(monkeypatch, outputs.AtomicOutput, "_place", lambda output: output.target.name == LAST)
    message = _stopped_training(cfg)
    assert message == f"interrupted; last.pt at iteration 1: `resume=true output_dir={out}` continues from it"
    assert torch.load(out / LAST, weights_only=True)["iteration"] == 1


def test_a_signal_during_data_generation_leaves_no_folder(tmp_path, monkeypatch, ctrl_c):
    """Stopped while the synthetic data was drawn: an empty annotations/ stayed in the new data folder."""
    cfg = train_config(tmp_path / "run", tmp_path / "new" / "data")
    stop_after(monkeypatch, synthetic, "random_scene")
    assert _stopped_training(cfg) == "interrupted; no checkpoint was written: the same command starts over"
    assert list(tmp_path.iterdir()) == []


# ---- `python -m segment.train` in a child ----

DRIVER = """
import os, runpy, signal, sys
def stop():
    os.kill(os.getpid(), signal.Signals[os.environ["STOP_SIGNAL"]])
exec(os.environ["PATCH"])
sys.argv = ["segment.train", *sys.argv[1:]]
runpy.run_module("segment.train", run_name="__main__", alter_sys=True)
"""


def run_stopped(patch: str, args: list[str], signame: str = "SIGINT") -> subprocess.CompletedProcess:
    """`python -m segment.train` with the tiny model and `args`, its stop signals at their defaults, `patch` run
    first (Python, calling `stop()` to send `signame` to the child at its phase)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
           "PATCH": textwrap.dedent(patch), "STOP_SIGNAL": signame}
    command = [sys.executable, "-c", DRIVER, *args, "schedule=tiny", "device=cpu", *CLI_OVERRIDES]  # -m first
    return run_interruptible(command, cwd=ROOT, env=env)


def _last_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def test_a_signal_once_model_final_is_in_place_is_late(tmp_path):
    """The signal the commit of model_final.pt held back stopped a finished run with exit 130 and "continues from
    the last checkpoint", which then had nothing to do: it is a note, and the run counts as done."""
    out = tmp_path / "run"
    done = run_stopped("""
        import common.outputs as outputs
        place = outputs.AtomicOutput._place
        def place_then_stop(self):
            place(self)
            if self.target.name == "model_final.pt":
                stop()
        outputs.AtomicOutput._place = place_then_stop
        """, [f"output_dir={out}", f"data.root={tmp_path / 'data'}"], "SIGTERM")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _last_line(done) == f"note: SIGTERM came once the training was complete: {out / FINAL} is kept"
    assert done.stdout.strip().splitlines()[-1] == f"wrote {out / FINAL}"
    assert (out / FINAL).is_file() and (out / LAST).is_file()


def test_a_sweep_job_stopped_names_the_sweep_and_its_resume_continues_it(tmp_path):
    """Job 1's message named its own folder (output_dir/1), which main had made of the sweep's: following it trained
    new runs into output_dir/1/0 and output_dir/1/1."""
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", f"output_dir={sweep}", f"data.root={tmp_path / 'data'}", "schedule.max_iters=2",
            "checkpoint_every=1"]
    done = run_stopped("""
        import common.outputs as outputs
        place = outputs.AtomicOutput._place
        def place_then_stop(self):
            place(self)
            from hydra.core.hydra_config import HydraConfig
            if self.target.name == "last.pt" and HydraConfig.get().job.num == 1:
                stop()
        outputs.AtomicOutput._place = place_then_stop
        """, args)
    assert done.returncode == 130
    assert _last_line(done) == (f"error: interrupted; sweep job 1's last.pt at iteration 1: the same sweep command "
                                f"with resume=true (output_dir={sweep}) continues from it")
    resumed = run_stopped("", [*args, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {sweep / '1' / LAST} at iteration 1" in resumed.stdout
    assert {p.name for p in (sweep / "1").iterdir()} == {"config.yaml", LAST, FINAL, "metrics.jsonl"}
    entries = [json.loads(line) for line in (sweep / "1" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["iter"] for entry in entries] == [1, 2]


BEFORE_A_JOB = """
    import hydra.core.utils as hydra_utils
    run_job, calls = hydra_utils.run_job, []
    def stop_before_a_job(*args, **kwargs):
        calls.append(1)
        if len(calls) == {job}:
            stop()
        return run_job(*args, **kwargs)
    hydra_utils.run_job = stop_before_a_job
    """
# after the sweep's callback has looked for a stop, before the job's own handlers are in place
AS_JOB_1_STARTS = """
    from common import sweep
    from hydra.core.hydra_config import HydraConfig
    on_job_start = sweep.SweepReport.on_job_start
    def start_then_stop(self, config, **kwargs):
        on_job_start(self, config, **kwargs)
        if HydraConfig.get().job.num == 1:
            stop()
    sweep.SweepReport.on_job_start = start_then_stop
    """


@pytest.mark.parametrize("patch, job", [(BEFORE_A_JOB.format(job=1), 0), (BEFORE_A_JOB.format(job=2), 1),
                                        (AS_JOB_1_STARTS, 1)], ids=["before_job_0", "between_jobs", "as_job_1_starts"])
def test_a_signal_outside_the_sweeps_jobs_is_one_line(tmp_path, patch, job):
    """Between two jobs the handler of the job before raised: a traceback ending in common.signals.Stopped and exit
    status 1; before the first job SIGTERM killed the sweep without a word. Then the line named no job complete, and
    the sweep's folder stopped before its first job stayed, holding only Hydra's multirun.yaml."""
    sweep = tmp_path / "sweep"
    done = run_stopped(patch, ["-m", "seed=0,1", f"output_dir={sweep}", f"data.root={tmp_path / 'data'}"], "SIGTERM")
    assert done.returncode == 143, done.stderr[-3000:]
    so_far = f"complete: job 0 (seed=0) -> {sweep / '0' / FINAL}" if job else "no output written"
    assert _last_line(done) == f"error: interrupted before sweep job {job} (seed={job}): the sweep stopped; {so_far}"
    if job:
        assert sorted(p.name for p in sweep.iterdir()) == ["0", "multirun.yaml"]
    else:
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGHUP", 129)])
def test_a_signal_while_the_modules_load_is_one_line(tmp_path, signame, status):
    """Ctrl-C while Hydra was imported printed a KeyboardInterrupt traceback; SIGHUP ended the run without a word."""
    done = run_stopped("""
        import sys
        class StopOnHydra:
            def find_spec(self, name, path=None, target=None):
                if name == "hydra":
                    sys.meta_path.remove(self)
                    stop()
        sys.meta_path.insert(0, StopOnHydra())
        """, [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}"], signame)
    assert done.returncode == status
    assert done.stderr.strip() == "error: interrupted before training began: nothing trained"
    assert list(tmp_path.iterdir()) == []
