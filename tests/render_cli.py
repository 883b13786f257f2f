"""Running `python -m pipeline.render` in a subprocess for the CLI tests, plus the file checks they share."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_render(args: list[str], cwd: Path, timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    """Runs the render CLI from `cwd` (a sweep's multirun/ folder lands there)."""
    return subprocess.run([sys.executable, "-m", "pipeline.render", *args], cwd=cwd, env=cli_env(), text=True,
                          capture_output=True, timeout=timeout, **popen)


def cli_env() -> dict[str, str]:
    """The environment the CLI tests run `python -m pipeline.render` in: this project importable, Hydra's errors as
    a user sees them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The same CLI called in this process (no interpreter start-up: fast for the many failure cases).
    Returns what a subprocess would: the exit code and the captured stdout / stderr."""
    from pipeline import render

    out, err = io.StringIO(), io.StringIO()
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    argv, handlers = sys.argv, {signum: signal.getsignal(signum) for signum in stops}  # main() sets its own
    code = 0
    sys.argv = ["pipeline.render", *args]
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                render.main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temp_leftovers(folder: Path) -> list[Path]:
    """Temp files AtomicOutput would have left beside a target."""
    return sorted(p for p in Path(folder).iterdir() if ".partial" in p.name)


def tiny_model_overrides(folder: Path, device="cpu") -> list[str]:
    """Hydra overrides that run the render on `device` with a tiny random segmenter and style bank written into
    `folder`, with every detection kept, tracked and stylized (random scores are low)."""
    from tests.tiny_models import segment_overrides, tiny_bank, tiny_segmenter

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = tiny_segmenter(folder / "tiny_segmenter.pt")
    bank = tiny_bank(folder / "tiny_bank.pt")
    return [*segment_overrides(checkpoint), f"style.bank={bank}", "style.min_score=0", "style.min_area=1",
            "track.birth_score=0", f"device={device}", "encode.preset=ultrafast"]
