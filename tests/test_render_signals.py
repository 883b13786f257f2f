"""A stop signal, or a refusal, in a render with a debug dump and in a sweep: what stays on disk and what the
render says about it. Each signal is sent by the render itself at a phase boundary (a stage's real function, then
`os.kill`), so its timing is the same on every run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_process import run_interruptible, stop_after
from tests.helpers_video import pattern_frames, read_frames, write_clip
from tests.render_cli import cli_env, run_in_process, tiny_model_overrides

FRAMES = 6

# `python -m pipeline.render` in a child process (its start-up handlers too), with a patch that sends it SIGINT
# where the test needs it
DRIVER = """
import os, runpy, signal

def stop():
    os.kill(os.getpid(), signal.SIGINT)

{patch}
runpy.run_module("pipeline.render", run_name="__main__", alter_sys=True)  # sys.argv[1:]: the overrides
"""

AFTER_THE_FIRST_DUMPED_BATCH = """
from pipeline import debug
real_write = debug.DebugDumper.write
def write(self, batch):
    real_write(self, batch)
    stop()
debug.DebugDumper.write = write
"""

AFTER_THE_COMPLETE_MANIFEST = """
from pipeline import debug
real_manifest = debug.DebugDumper._write_manifest
def write_manifest(self, complete):
    real_manifest(self, complete)
    if complete:
        stop()
debug.DebugDumper._write_manifest = write_manifest
"""

AFTER_JOB_1_ENCODED = """
from pipeline import encode
real_close, closed = encode.VideoWriter.close, []
def close(self):
    real_close(self)
    closed.append(self)
    if len(closed) == 2:
        stop()
encode.VideoWriter.close = close
"""

# before Hydra's launcher imports run_job
BEFORE_THE_FIRST_JOB = """
import hydra.core.utils as hydra_utils
real_run_job = hydra_utils.run_job
def run_job(*args, **kwargs):
    stop()
    return real_run_job(*args, **kwargs)
hydra_utils.run_job = run_job
"""

AS_THE_SWEEP_ENDS = """
from common import sweep
real_end = sweep.SweepReport.on_multirun_end
def on_multirun_end(self, config, **kwargs):
    stop()
    return real_end(self, config, **kwargs)
sweep.SweepReport.on_multirun_end = on_multirun_end
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    return tiny_model_overrides(tmp_path_factory.mktemp("models"))


@pytest.fixture()
def clip(tmp_path) -> Path:
    return write_clip(tmp_path / "in.mp4", pattern_frames(FRAMES, 64, 48))


def run_stopped(patch: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_interruptible([sys.executable, "-c", DRIVER.format(patch=patch), *args], cwd=cwd, env=cli_env())


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`, hidden ones included."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def dump_args(clip: Path, models: list[str], *extra: str) -> list[str]:
    """A render into new/out.mp4 (a folder it makes) with its dump beside it, in new/out_debug/."""
    return [f"input={clip}", "output=new/out.mp4", *models, "batch_size=2", "debug.dump=true", *extra]


def earlier_render(tmp_path: Path, clip: Path, models: list[str]) -> dict[str, bytes | None]:
    result = run_in_process(dump_args(clip, models), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "new" / "out_debug" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["frame_count"] == FRAMES
    return snapshot(tmp_path)


def test_a_stop_mid_render_leaves_no_dump_and_no_folder(tmp_path, models, clip):
    """The dump (frames.jsonl, images, manifest complete:false) and the folder the render made stayed beside
    "error: interrupted: no output written", and the same command was then refused: the folder held a dump."""
    result = run_stopped(AFTER_THE_FIRST_DUMPED_BATCH, dump_args(clip, models), cwd=tmp_path)
    assert result.returncode == 130, result.stderr
    assert errors(result.stderr) == ["error: interrupted: no output written"], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


@pytest.mark.parametrize("patch", [AFTER_THE_FIRST_DUMPED_BATCH, AFTER_THE_COMPLETE_MANIFEST],
                         ids=["mid-render", "complete-manifest"])
def test_a_stopped_rerun_keeps_the_earlier_video_and_its_dump(tmp_path, models, clip, patch):
    """With overwrite=true the earlier dump was replaced by a two-frame incomplete one while the earlier video
    stayed; stopped as the complete manifest was written, the dump said complete, every frame, of a video
    discarded."""
    before = earlier_render(tmp_path, clip, models)
    result = run_stopped(patch, dump_args(clip, models, "overwrite=true", "debug.every=2"), cwd=tmp_path)
    assert result.returncode == 130, result.stderr
    assert errors(result.stderr) == ["error: interrupted: no output written"], result.stderr
    assert snapshot(tmp_path) == before


def test_a_refused_encoder_option_keeps_the_earlier_dump(tmp_path, models, clip):
    """The refused option emptied the earlier dump (every image gone) before the encoder said no."""
    before = earlier_render(tmp_path, clip, models)
    result = run_in_process(dump_args(clip, models, "overwrite=true", "+encode.options.nosuchoption=1"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(errors(result.stderr)) == 1 and "nosuchoption" in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_a_dump_that_cannot_be_put_in_place_says_the_video_is_written(tmp_path, models, clip, monkeypatch):
    before = earlier_render(tmp_path, clip, models)
    real_rename = os.rename

    def rename(source, target):  # the dump's last entry, its manifest, cannot be moved in
        if ".partial" in Path(source).parent.name and Path(source).name == "manifest.json":
            raise PermissionError(13, "Permission denied")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    video, dump = tmp_path / "new" / "out.mp4", tmp_path / "new" / "out_debug"
    earlier_video = video.stat().st_ino
    result = run_in_process(dump_args(clip, models, "overwrite=true", "debug.every=2"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert errors(result.stderr) == [f"error: cannot put the debug dump in place at {dump} (Permission denied): the "
                                     f"earlier dump there is kept; the video {video} is written, without it"
                                     ], result.stderr
    assert video.stat().st_ino != earlier_video       # the new video (the same bytes), beside the earlier dump
    assert snapshot(tmp_path) == before


def test_a_stop_as_the_dump_is_put_in_place_waits_until_the_video_and_dump_both_are(tmp_path, models, clip,
                                                                                     monkeypatch, ctrl_c):
    """In-process callers keep Python's Ctrl-C: it came between the two renames, the video would stay without its
    dump."""
    from pipeline.render import compose_config, render

    earlier_render(tmp_path, clip, models)
    stop_after(monkeypatch, os, "rename",
               lambda source, target: ".partial" in Path(source).parent.name and Path(source).name == "manifest.json")
    cfg = compose_config(dump_args(clip, models, "overwrite=true", "debug.every=2"))
    with pytest.raises(KeyboardInterrupt):
        render(cfg, tmp_path / "new" / "out.mp4")
    manifest = json.loads((tmp_path / "new" / "out_debug" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["image_frames"] == FRAMES // 2
    assert len(read_frames(tmp_path / "new" / "out.mp4")[0]) == FRAMES
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["out.mp4", "out_debug"]


def sweep_folder(tmp_path: Path) -> Path:
    folders = list(tmp_path.glob("multirun/*/*"))
    assert len(folders) == 1, folders
    return folders[0]


def test_a_stop_in_a_sweep_job_names_the_jobs_complete(tmp_path, models, clip):
    """Stopped in job 1, the sweep said "no output written" beside job 0's complete video, and left job 1's
    folder holding only Hydra's record of its settings."""
    result = run_stopped(AFTER_JOB_1_ENCODED, ["-m", "style.assign=by_class,per_instance", f"input={clip}",
                                               "output=out.mp4", *models], cwd=tmp_path)
    sweep = sweep_folder(tmp_path)
    assert result.returncode == 130, result.stderr
    assert errors(result.stderr) == [
        "error: interrupted in sweep job 1 (style.assign=per_instance): its output not written, the sweep stopped; "
        f"complete: job 0 (style.assign=by_class) -> {sweep / '0' / 'out.mp4'}"], result.stderr
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "multirun.yaml"]
    assert len(read_frames(sweep / "0" / "out.mp4")[0]) == FRAMES


def test_a_stop_before_the_first_sweep_job_leaves_no_sweep_folder(tmp_path, models, clip):
    """The sweep's folder stayed, holding multirun.yaml."""
    result = run_stopped(BEFORE_THE_FIRST_JOB, ["-m", "batch_size=2,3", f"input={clip}", "output=out.mp4", *models],
                         cwd=tmp_path)
    assert result.returncode == 130, result.stderr
    assert errors(result.stderr) == ["error: interrupted before sweep job 0 (batch_size=2): the sweep stopped; "
                                     "no output written"], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_a_stop_once_every_sweep_job_has_run_keeps_the_sweeps_report(tmp_path, models, clip):
    """It said "interrupted between two sweep jobs: the later ones not run" (there were none), exited 130, and the
    summary of the failed job (exit 2) was lost."""
    result = run_stopped(AS_THE_SWEEP_ENDS, ["-m", "batch_size=2,0", f"input={clip}", "output=out.mp4", *models],
                         cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "note: SIGINT came once every sweep job had run: it stopped nothing" in result.stderr
    assert errors(result.stderr)[-1] == "error: 1 sweep job(s) failed: job 1 (batch_size=0)", result.stderr
    assert len(read_frames(sweep_folder(tmp_path) / "0" / "out.mp4")[0]) == FRAMES


@pytest.mark.parametrize("dump_dir", ["new", "."])
def test_a_dump_folder_that_holds_the_output_is_refused_before_rendering(tmp_path, models, clip, dump_dir):
    """debug.dir above the output: the dump's last check found the video (or its temp file) there, after the whole
    render, and discarded both with a message naming a temp file."""
    result = run_in_process(dump_args(clip, models, f"debug.dir={dump_dir}"), cwd=tmp_path)
    assert result.returncode == 2 and "render:" not in result.stderr, result.stderr
    assert errors(result.stderr) == [f"error: debug.dir {(tmp_path / dump_dir).resolve()} holds the output "
                                     f"{tmp_path / 'new' / 'out.mp4'}: give the dump a folder of its own"]


def test_an_existing_dump_folder_keeps_its_identity_and_permissions(tmp_path, models, clip):
    """The dump was built beside its folder and renamed in place of it: a folder the user made (setgid, group-only)
    became a new one with the umask's permissions, and a render with debug.dir=. removed the current folder."""
    folder = tmp_path / "mine"
    folder.mkdir()
    folder.chmod(0o2770)
    identity = (folder.stat().st_ino, folder.stat().st_mode)
    for overwrite in ("overwrite=false", "overwrite=true"):  # into the empty folder, then over its dump
        result = run_in_process(dump_args(clip, models, f"debug.dir={folder}", overwrite), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (folder.stat().st_ino, folder.stat().st_mode) == identity
        assert sorted(p.name for p in folder.iterdir()) == ["frames.jsonl", "images", "manifest.json"]


# ---- common/sweep.py's clean-up of Hydra's records, on hand-made folders ----

def running_job(monkeypatch, job: Path, sweep_dir: Path) -> None:
    """What `discard_job_folder` reads of the job that runs now: Hydra's config as a sweep job sees it."""
    from types import SimpleNamespace

    from common import sweep

    hydra = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(job)), output_subdir=".hydra")
    monkeypatch.setattr(sweep, "HydraConfig", SimpleNamespace(get=lambda: hydra))
    monkeypatch.setattr(sweep, "_sweep", sweep._Sweep(folder=sweep_dir))


def test_a_job_folder_holding_more_than_hydras_records_keeps_them(tmp_path, monkeypatch):
    """A job stopped after it wrote something keeps the record of the settings that made it; one that wrote nothing
    leaves no folder."""
    from common import sweep

    for name, extra in (("0", "out.mp4"), ("1", None)):
        job = tmp_path / "multirun" / name
        (job / ".hydra").mkdir(parents=True)
        for record in sorted(sweep.HYDRA_RECORDS):
            (job / ".hydra" / record).write_text("x: 1\n")
        if extra:
            (job / extra).write_bytes(b"frames")
        running_job(monkeypatch, job, tmp_path / "multirun")
        sweep.discard_job_folder()
    kept = tmp_path / "multirun" / "0"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == [
        ".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "out.mp4"]
    assert not (tmp_path / "multirun" / "1").exists()


@pytest.mark.parametrize("existed", [True, False], ids=["the users", "made for the sweep"])
def test_a_sweep_folder_that_was_there_before_keeps_its_record(existed, tmp_path, monkeypatch):
    """Every job refused: the sweep's folder goes with Hydra's multirun.yaml only where the sweep made it; a folder
    the user gave (hydra.sweep.dir=runs) may hold others' records: it stays, multirun.yaml too."""
    from omegaconf import OmegaConf

    from common import sweep

    folder = tmp_path / "runs"
    if existed:
        folder.mkdir()
    config = OmegaConf.create({"hydra": {"overrides": {"task": ["batch_size=0,1"]}, "sweep": {"dir": str(folder)}}})
    monkeypatch.setattr(sweep, "on_stop_signals", lambda handler: None)  # this test process's handlers stay
    monkeypatch.setattr(sweep, "_sweep", sweep._Sweep())
    report = sweep.SweepReport()
    report.on_multirun_start(config)
    folder.mkdir(exist_ok=True)  # what Hydra's sweeper then does
    (folder / sweep.SWEEP_RECORD).write_text("hydra: {}\n")
    sweep._sweep.failed.extend(["job 0 (batch_size=0)", "job 1 (batch_size=1)"])
    with pytest.raises(SystemExit) as exit_:
        report.on_multirun_end(config)
    assert exit_.value.code == 2
    assert (folder / sweep.SWEEP_RECORD).exists() == existed and folder.exists() == existed
