"""`python -m stylize.train -m ...` (a sweep): each job trains into a folder of its own, every job even when some
fail, and what a failure or a stop signal says is true of every job's output (common/sweep.py, as the render's and
segment.train's sweeps). Each signal is sent at a phase boundary by a patched function (the real one, then the
signal) in a child (tests/test_stylize_train.py's DRIVER)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.render_cli import cli_env
from tests import test_stylize_train as single_run
from tests.test_stylize_train import cli_args, run_stopped

files, torchvision_vgg = single_run.files, single_run.torchvision_vgg  # its fixtures: the tiny VGG, images and bank


def _sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylize.train", "-m", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _last_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def _errors(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if line.startswith("error: ")]


def test_each_job_writes_its_own_output(files, tmp_path):
    """Every job wrote the same `out`: the second refused the first's output ("pass overwrite=true"), and with
    overwrite=true replaced it. Job N writes out's file name into Hydra's folder for it, nothing else in the folder
    the sweep ran in."""
    done = _sweep(tmp_path, "lr=1e-3,1e-1", *cli_args(files, "styles/coffee.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    [sweep] = (tmp_path / "multirun").glob("*/*")   # multirun/<date>/<time>
    assert _files(tmp_path) == sorted(str(p.relative_to(tmp_path)) for p in (
        tmp_path / "multirun", sweep.parent, sweep, sweep / "0", sweep / "0" / "coffee.pt", sweep / "1",
        sweep / "1" / "coffee.pt", sweep / "multirun.yaml"))
    wrote = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {sweep / '0' / 'coffee.pt'}", f"wrote {sweep / '1' / 'coffee.pt'}"]
    params = [torch.load(sweep / job / "coffee.pt", weights_only=True)["params"] for job in ("0", "1")]
    assert any(not torch.equal(params[0][key], params[1][key]) for key in params[0])  # each its own lr's


def test_a_failing_job_does_not_stop_the_sweep(files, tmp_path):
    """Job 0's image_size=30 ended the whole sweep (exit 2): job 1 never ran."""
    sweep = tmp_path / "sweep"
    done = _sweep(tmp_path, *cli_args(files, "coffee.pt"), "image_size=30,32", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert _errors(done) == ["error: job 0 (image_size=30): image_size must be a multiple of 4, got 30",
                             "error: 1 sweep job(s) failed: job 0 (image_size=30)"], done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"wrote {sweep / '1' / 'coffee.pt'}"
    assert _files(sweep) == ["1", "1/coffee.pt", "multirun.yaml"]   # job 0's empty folder removed


def test_a_sweep_of_refused_jobs_leaves_no_folder(files, tmp_path):
    """Every job refused: the sweep folder stayed, holding only Hydra's multirun.yaml, and the folders above it."""
    done = _sweep(tmp_path, *cli_args(files, "coffee.pt"), "image_size=30,34")
    assert done.returncode == 2 and _errors(done)[-1] == "error: 2 sweep job(s) failed: job 0 (image_size=30); job 1 " \
        "(image_size=34)", done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_job_names_its_state_and_the_resumed_sweep_continues_it(files, tmp_path):
    """Job 1 stopped once its first resume state was in place; the same sweep command with resume=true keeps job 0's
    output as it is and continues job 1 from its state."""
    sweep = tmp_path / "sweep"
    args = ["lr=1e-3,1e-4", *cli_args(files, "coffee.pt", "steps=2", "checkpoint_every=1"),
            f"hydra.sweep.dir={sweep}"]
    stopped = run_stopped("""
        import common.outputs as outputs
        outputs.AtomicOutput._place = then_signal(
            outputs.AtomicOutput._place, signum,
            lambda output: output.target.parent.name == "1" and output.target.name.endswith(".resume.pt"))
        """, ["-m", *args], "SIGINT", tmp_path)
    assert stopped.returncode == 130
    state = sweep / "1" / "coffee.pt.resume.pt"
    assert _last_line(stopped) == (f"error: interrupted in sweep job 1: its state of step 1 of 2 is in {state}; the "
                                   f"same sweep command with resume=true hydra.sweep.dir={sweep} continues the sweep "
                                   "(its complete jobs kept)")
    assert _files(sweep) == ["0", "0/coffee.pt", "1", "1/coffee.pt.resume.pt", "multirun.yaml"]
    first = (sweep / "0" / "coffee.pt").read_bytes()

    resumed = _sweep(tmp_path, *args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"sweep job 0: {sweep / '0' / 'coffee.pt'} was complete already: kept" in resumed.stdout
    assert f"resumed from {state} at step 1" in resumed.stdout
    assert resumed.stdout.strip().splitlines()[-1] == f"wrote {sweep / '1' / 'coffee.pt'}"
    assert (sweep / "0" / "coffee.pt").read_bytes() == first
    assert _files(sweep) == ["0", "0/coffee.pt", "1", "1/coffee.pt", "multirun.yaml"]
    # resumed with other values, the complete jobs are refused, not kept as if they were trained with them
    other = _sweep(tmp_path, *[arg.replace("lr=1e-3,1e-4", "lr=5e-2,1e-4") for arg in args], "resume=true")
    assert other.returncode == 2
    assert _errors(other)[0].startswith(f"error: job 0 (lr=0.05): {sweep / '0' / 'coffee.pt'} was trained with other "
                                        "settings: lr=0.001 (now 0.05); pass overwrite=true to train it again")
    assert f"sweep job 1: {sweep / '1' / 'coffee.pt'} was complete already: kept" in other.stdout
    assert (sweep / "0" / "coffee.pt").read_bytes() == first


def _job_complete(number: int) -> dict[str, str]:
    """Patches that send `signum` once job `number` is complete: as its output is renamed into place (the signal held
    back until it is there), or once Hydra's run_job has returned from it."""
    return {
        "out_in_place": f"""
            import common.outputs as outputs
            outputs.AtomicOutput._place = then_signal(
                outputs.AtomicOutput._place, signum,
                lambda output: output.target.name == "coffee.pt" and output.target.parent.name == "{number}")
            """,
        "after_the_job": f"""
            import itertools
            import hydra.core.utils  # Hydra loads its launcher afresh, which takes run_job from here
            returned = itertools.count()  # Hydra passes run_job its settings by keyword: `then_signal` sees none
            hydra.core.utils.run_job = then_signal(hydra.core.utils.run_job, signum, lambda: next(returned) == {number})
            """,
    }


@pytest.mark.parametrize("when", _job_complete(0))
def test_a_stop_signal_between_two_jobs_stops_the_sweep_before_the_next(files, tmp_path, when):
    """Between two jobs stylize.train left with a line of its own ("no later job started"), not the other apps'
    sweeps' one naming the jobs complete and their outputs."""
    sweep = tmp_path / "sweep"
    done = run_stopped(_job_complete(0)[when], ["-m", "lr=0.001,0.0001", *cli_args(files, "coffee.pt"),
                                                f"hydra.sweep.dir={sweep}"], "SIGTERM", tmp_path)
    assert done.returncode == 143, done.stderr[-3000:]
    assert _last_line(done) == ("error: interrupted before sweep job 1 (lr=0.0001): the sweep stopped; complete: job "
                                f"0 (lr=0.001) -> {sweep / '0' / 'coffee.pt'}")
    assert _files(sweep) == ["0", "0/coffee.pt", "multirun.yaml"]   # job 1's empty folder removed


@pytest.mark.parametrize("when", _job_complete(1))
def test_a_stop_signal_once_the_last_job_is_complete_is_a_note(files, tmp_path, when):
    """It said "error: interrupted once sweep job 1 was complete: no later job started" (there was none) and exited
    143 beside two complete trainings."""
    sweep = tmp_path / "sweep"
    done = run_stopped(_job_complete(1)[when], ["-m", "lr=1e-3,1e-4", *cli_args(files, "coffee.pt"),
                                                f"hydra.sweep.dir={sweep}"], "SIGTERM", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _errors(done) == [], done.stderr[-3000:]
    assert _last_line(done) == "note: SIGTERM came once every sweep job had run: it stopped nothing"
    assert _files(sweep) == ["0", "0/coffee.pt", "1", "1/coffee.pt", "multirun.yaml"]


@pytest.mark.parametrize("job", [0, 1])
def test_a_stop_signal_as_a_job_starts_stops_the_sweep_there(files, tmp_path, job):
    """A signal as a job's main starts, before its handlers are in place, stops the sweep there as one between two
    jobs does: nothing of that job left, nor of the sweep where no job was complete."""
    sweep = tmp_path / "sweep"
    done = run_stopped(f"""
        import itertools
        started = itertools.count()
        module.SweepJob.current = then_signal(module.SweepJob.current, signum, lambda: next(started) == {job})
        """, ["-m", "lr=0.001,0.0001", *cli_args(files, "coffee.pt"), f"hydra.sweep.dir={sweep}"], "SIGINT", tmp_path,
        run="main")
    assert done.returncode == 130, done.stderr[-3000:]
    if job == 0:
        assert _last_line(done) == ("error: interrupted before sweep job 0 (lr=0.001): the sweep stopped; no output "
                                    "written")
        assert not sweep.exists()
    else:
        assert _last_line(done) == ("error: interrupted before sweep job 1 (lr=0.0001): the sweep stopped; complete: "
                                    f"job 0 (lr=0.001) -> {sweep / '0' / 'coffee.pt'}")
        assert _files(sweep) == ["0", "0/coffee.pt", "multirun.yaml"]


def test_a_job_stopped_before_writing_anything_leaves_no_folder(files, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_stopped("""
        from stylize.content import ContentImages
        ContentImages.batch = then_signal(ContentImages.batch, signum)
        """, ["-m", "lr=1e-3,1e-4", *cli_args(files, "coffee.pt", "checkpoint_every=0"), f"hydra.sweep.dir={sweep}"],
        "SIGHUP", tmp_path)
    assert done.returncode == 129
    assert _last_line(done) == (f"error: interrupted in sweep job 0: nothing written for it; the same sweep command "
                                f"with resume=true hydra.sweep.dir={sweep} continues the sweep (its complete jobs "
                                "kept)")
    assert _files(sweep) == ["multirun.yaml"]


def test_a_resumed_sweep_refuses_a_job_trained_for_other_steps(files, tmp_path):
    """A job's output trained with steps=1 is not the job of a sweep resumed with steps=2000: kept, the sweep's record
    would name 2000 steps beside a one-step style."""
    from stylize.bank import STYLE_FORMAT, atomic_save
    from stylize.errors import StyleError
    from stylize.train import SweepJob, _output_settings, _style_paths

    trained = single_run.config(files, out="coffee.pt", steps=1)
    atomic_save({"format": STYLE_FORMAT, "settings": _output_settings(trained, _style_paths(trained))},
                tmp_path / "coffee.pt")
    job, out = SweepJob(0, tmp_path, tmp_path), tmp_path / "coffee.pt"
    assert job.finished_earlier(single_run.config(files, out="coffee.pt", steps=1, resume=True)) == out  # its own
    with pytest.raises(StyleError, match=re.escape(f"{out} was trained with other settings: steps=1 (now 2000); pass "
                                                   "overwrite=true to train it again") + "$"):
        job.finished_earlier(single_run.config(files, out="coffee.pt", steps=2000, resume=True))
