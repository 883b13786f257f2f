"""A Hydra sweep (`-m`) of any of our three apps runs every job even when some fail, then exits 2 naming them.

Hydra stops a sweep at the first job that raises or exits, so one bad value in `-m style.default_style=a,b,c`
lost the jobs after it. An app's `main` reports a job's user error with `failed` instead of exiting and a job's
output with `completed`; `SweepReport` (registered in the app's conf/*.yaml hydra.callbacks) exits at the end of the
sweep.

A stop signal (Ctrl-C, SIGTERM, SIGHUP) stops the sweep: in a job as the app stops a single run (the render through
`leave`), between two jobs as the next one starts (`stop_later` records it; `pending_stop` for one that comes while
that job puts its own handlers in place), and after the last job it stops nothing (a note). The job it stopped
leaves no folder that holds only Hydra's record of its settings, and a sweep stopped before any job left anything
leaves no sweep folder; its one line names the jobs complete and their outputs.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from common.signals import on_stop_signals

HYDRA_RECORDS = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes into a job's output_subdir
SWEEP_RECORD = "multirun.yaml"  # what Hydra's sweeper writes into the sweep's folder


@dataclass
class _Sweep:
    failed: list[str] = field(default_factory=list)    # the jobs' names
    complete: list[str] = field(default_factory=list)  # "job N (settings) -> output"
    swept: set[str] = field(default_factory=set)       # the keys the sweep varies: what tells its jobs apart
    stops: list[int] = field(default_factory=list)     # the stop signals that came between two jobs
    folder: Path | None = None                         # Hydra's sweep folder: its record, a folder per job
    made: list[Path] = field(default_factory=list)     # the folders made for it, deepest first


_sweep = _Sweep()


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _job_name() -> str:
    """`job N (the swept settings)` of the job that runs now."""
    hydra = HydraConfig.get()
    settings = [o for o in hydra.overrides.task if o.split("=", 1)[0] in _sweep.swept]
    return f"job {hydra.job.num}" + (f" ({' '.join(settings)})" if settings else "")


def failed(message: str) -> None:
    """A sweep job's user error: said now, one line naming the job, and counted for the exit status."""
    name = _job_name()
    _sweep.failed.append(name)
    discard_job_folder()  # what Hydra recorded of a job that left nothing
    _say(f"error: {name}: {message}")


def completed(output: Path) -> None:
    """The job that runs now has its output in place."""
    _sweep.complete.append(f"{_job_name()} -> {output}")


def stop_later(signum: int, frame) -> None:
    """The stop signals' handler between two jobs: the sweep stops as the next job starts (`SweepReport`)."""
    _sweep.stops.append(signum)


def pending_stop() -> int | None:
    """The stop signal that came since the last job, if any (the job that starts now stops at once)."""
    return _sweep.stops[0] if _sweep.stops else None


def leave(signum: int, in_job: bool) -> NoReturn:
    """Ends the sweep on a stop signal in the job that runs now (`in_job`: it had begun its work), or as it starts:
    its folder goes if it holds only Hydra's record of its settings, and so does the sweep's if no job has left
    anything; then one line on what the sweep wrote, and the signal's exit status."""
    on_stop_signals(stop_later)  # a second Ctrl-C must not cut the clean-up short
    discard_job_folder()
    _discard_sweep_folder()
    so_far = f"complete: {'; '.join(_sweep.complete)}" if _sweep.complete else "no output written"
    if _sweep.failed:
        so_far += f"; failed: {'; '.join(_sweep.failed)}"
    sys.stdout.flush()
    sys.stderr.flush()
    where = f"in sweep {_job_name()}: its output not written," if in_job else f"before sweep {_job_name()}:"
    # not through sys.stderr: the signal may have come in the middle of a write to it
    os.write(2, f"error: interrupted {where} the sweep stopped; {so_far}\n".encode())
    os._exit(128 + signum)


def discard_job_folder() -> None:
    """The folder of the job that runs now, if it holds nothing but Hydra's record of its settings (or nothing)."""
    hydra = HydraConfig.get()
    job = Path(hydra.runtime.output_dir)
    if _sweep.folder is not None and job == _sweep.folder:  # hydra.sweep.subdir '.' (segment.train): not the job's
        return
    records = None if hydra.output_subdir is None else job / str(hydra.output_subdir)
    try:
        if records is not None and records.is_dir():
            if {p.name for p in records.iterdir()} - HYDRA_RECORDS or any(p != records for p in job.iterdir()):
                return  # what the job holds besides is still described by the record
            for name in HYDRA_RECORDS:
                (records / name).unlink(missing_ok=True)
            records.rmdir()
        job.rmdir()
    except OSError:  # not empty, gone, or changed meanwhile: what is left stays
        pass


def _discard_sweep_folder() -> None:
    folder = _sweep.folder
    if folder is None or folder not in _sweep.made:  # a folder that was there before holds others' records too
        return
    try:
        if {p.name for p in folder.iterdir()} - {SWEEP_RECORD}:
            return
        (folder / SWEEP_RECORD).unlink(missing_ok=True)
        for made in _sweep.made:
            made.rmdir()
    except OSError:  # something else was put there meanwhile: it stays, and so do the folders above it
        pass


class SweepReport(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        global _sweep
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        _sweep = _Sweep(swept={o.key_or_group for o in overrides if o.is_sweep_override()})
        # resolved once: Hydra's sweeper reads the same ${now:...} from the config's cache when it makes the folder;
        # normalised as Hydra's job folders are (os.path.abspath), so that a job folder that is the sweep's is seen
        _sweep.folder = Path(os.path.abspath(str(config.hydra.sweep.dir)))
        missing = _sweep.folder
        while not missing.exists() and missing != missing.parent:
            _sweep.made.append(missing)
            missing = missing.parent
        on_stop_signals(stop_later)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if _sweep.stops:
            leave(_sweep.stops[0], in_job=False)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if _sweep.stops:
            _say(f"note: {signal.Signals(_sweep.stops[0]).name} came once every sweep job had run: it stopped nothing")
        if _sweep.failed:
            if not _sweep.complete:  # every job refused: no sweep folder holding only Hydra's record of it
                _discard_sweep_folder()
            _say(f"error: {len(_sweep.failed)} sweep job(s) failed: {'; '.join(_sweep.failed)}")
            sys.exit(2)
