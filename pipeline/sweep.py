"""A sweep (`python -m pipeline.render -m ...`) renders every job even when some fail, then exits 2 naming them.

Hydra stops a sweep at the first job that raises or exits, so one bad value in `-m style.default_style=a,b,c`
lost the jobs after it. The render's `main` reports a job's user error with `failed` instead of exiting, and
`SweepReport` (registered in conf/render.yaml's hydra.callbacks) exits at the end of the sweep.
"""
from __future__ import annotations

import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode

_failed: list[str] = []
_swept: set[str] = set()  # the keys the sweep varies: what tells its jobs apart


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def failed(message: str) -> None:
    """A sweep job's user error: said now, one line naming the job, and counted for the exit status."""
    hydra = HydraConfig.get()
    settings = [o for o in hydra.overrides.task if o.split("=", 1)[0] in _swept]
    name = f"job {hydra.job.num}" + (f" ({' '.join(settings)})" if settings else "")
    _failed.append(name)
    print(f"error: {name}: {message}", file=sys.stderr)


class SweepReport(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        _failed.clear()
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        _swept.clear()
        _swept.update(o.key_or_group for o in overrides if o.is_sweep_override())

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if _failed:
            print(f"error: {len(_failed)} sweep job(s) failed: {'; '.join(_failed)}", file=sys.stderr)
            sys.exit(2)
