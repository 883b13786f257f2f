"""A `python -m segment.train -m ...` sweep runs every job when some are refused, then exits 2 naming them, and a
stop signal once its last job's training is complete is a note (common/sweep.py, as the render's sweeps)."""
from __future__ import annotations

import pytest

from segment.engine import FINAL
from tests.test_segment_train_signals import run_stopped


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_refused_sweep_job_does_not_stop_the_others(tmp_path):
    """Job 0's batch_size=0 ended the whole sweep (exit 2): job 1 never ran."""
    sweep = tmp_path / "sweep"
    done = run_stopped("", ["-m", "batch_size=0,1", f"output_dir={sweep}", f"data.root={tmp_path / 'data'}",
                            "schedule.max_iters=1"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert errors(done.stderr) == ["error: job 0 (batch_size=0): batch_size must be a whole number >= 1, got 0",
                                   "error: 1 sweep job(s) failed: job 0 (batch_size=0)"], done.stderr[-3000:]
    assert f"wrote {sweep / '1' / FINAL}" in done.stdout
    assert sorted(p.name for p in sweep.iterdir()) == ["1", "multirun.yaml"]  # the refused job made no folder


AFTER_THE_LAST_JOB = """
    import hydra.core.utils as hydra_utils
    run_job, calls = hydra_utils.run_job, []
    def run_then_stop(*args, **kwargs):
        calls.append(1)
        done = run_job(*args, **kwargs)
        if len(calls) == 2:
            stop()
        return done
    hydra_utils.run_job = run_then_stop
    """
# the signal the commit of job 1's model_final.pt holds back: it comes once the training is complete
AT_THE_LAST_MODEL_FINAL = """
    import common.outputs as outputs
    from hydra.core.hydra_config import HydraConfig
    place = outputs.AtomicOutput._place
    def place_then_stop(self):
        place(self)
        if self.target.name == "model_final.pt" and HydraConfig.get().job.num == 1:
            stop()
    outputs.AtomicOutput._place = place_then_stop
    """


@pytest.mark.parametrize("patch", [AFTER_THE_LAST_JOB, AT_THE_LAST_MODEL_FINAL], ids=["tear_down", "model_final"])
def test_a_signal_once_the_last_job_is_complete_is_a_note(tmp_path, patch):
    """It said "error: interrupted between two sweep jobs: the later ones not run" (there were none) and exited
    143 beside two complete trainings."""
    sweep = tmp_path / "sweep"
    done = run_stopped(patch, ["-m", "seed=0,1", f"output_dir={sweep}", f"data.root={tmp_path / 'data'}",
                               "schedule.max_iters=1"], "SIGTERM")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and errors(done.stderr) == [], done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "note: SIGTERM came once every sweep job had run: it stopped nothing"
    assert all((sweep / job / FINAL).is_file() for job in ("0", "1"))


def test_a_sweep_under_torchrun_is_refused_up_front(tmp_path, monkeypatch):
    """Each job made and destroyed its process group: under torchrun the second job's broke on the first's (a gloo
    "Connection reset by peer" traceback on one rank, the others hung until torchrun killed them)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = run_stopped("", ["-m", "seed=0,1", f"output_dir={tmp_path / 'sweep'}"])
    assert done.returncode == 2 and errors(done.stderr) == [
        "error: a sweep (-m) runs in one process: under torchrun give each setting a command of its own"], done.stderr
    assert not (tmp_path / "sweep").exists()
