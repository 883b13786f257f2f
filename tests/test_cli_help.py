"""Each command's --help names it as it is run and shows what that command takes, nothing of the others."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = {path.parent.relative_to(CONF).as_posix() for path in CONF.rglob("*.yaml") if path.parent != CONF}


def hydra_help(module: str) -> str:
    """`python -m <module> --help` (Hydra prints the help and exits 0)."""
    if module != "pipeline.render":
        # the trainers' `config_path="../conf"` is found beside their file only when run as `python -m`: called in
        # this process, Hydra looks for a package `conf`
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout
    out = io.StringIO()  # the render's conf/ is an absolute path: run in this process, no interpreter start-up
    with mock.patch.object(sys, "argv", [module, "--help"]), contextlib.redirect_stdout(out):
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main()
    assert exit_.value.code in (0, None)
    return out.getvalue()


def listed_groups(text: str) -> dict[str, list[str]]:
    """The help's `group: option, option` lines, under its config groups heading."""
    section = text.partition("== Config groups")[2].partition("\n\n")[0]
    return {group: options.split(", ") for group, options in re.findall(r"^([\w/]+): (.+)$", section, re.M)}


@pytest.mark.parametrize("module, usage, groups", [
    ("pipeline.render", "usage: python -m pipeline.render input=IN.mp4 output=OUT.mp4",
     {"decode", "segment", "style", "style/class_styles", "track", "composite", "encode", "debug"}),
    ("segment.train", "usage: python -m segment.train [segment=r18_fpn] [data=synthetic] [schedule=demo]",
     {"segment", "data", "schedule"}),
    ("stylize.train", "usage: python -m stylize.train style_image=", set()),
])
def test_hydra_help_gives_the_apps_usage_and_only_its_groups(module, usage, groups):
    # found by hand: all three listed every group in conf/ (stylize.train, which composes none, ten), the two
    # trainers both began "train is powered by Hydra", and none said how it is run
    text = hydra_help(module)
    assert text.startswith(usage) and "powered by Hydra" not in text, text[:300]
    listed = listed_groups(text)
    assert set(listed) == groups, listed
    for group, options in listed.items():  # written out by hand in the app's hydra.help: kept to conf/'s files
        assert sorted(options) == sorted(p.stem for p in (CONF / group).glob("*.yaml")), group
    for group in GROUPS - groups:  # no `group: options` line of another app's group anywhere in the help
        assert not re.search(rf"^{re.escape(group)}: \w", text, re.M), group
    assert "== Config (override any key" in text  # the composed config is still shown


@pytest.mark.parametrize("module", ["stylize.list", "stylize.import_onnx"])
def test_module_tools_name_themselves_as_run(module, capsys):
    # their usage said `list.py` / `import_onnx.py`, files no one runs
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


@pytest.mark.parametrize("script", ["bench_report.py", "profiling.py", "script_outputs.py"])
def test_helper_modules_say_they_are_libraries(script):
    # both printed nothing and exited 0, for --help and for nothing at all
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)

    shown = run("--help")
    assert shown.returncode == 0 and f"usage: scripts/{script}" in shown.stdout, shown
    assert "A library, not a command" in shown.stdout and "import it" in shown.stdout, shown.stdout
    refused = run()
    usage, error = refused.stderr.strip().splitlines()  # argparse's usage, then one line
    assert refused.returncode == 2 and usage.startswith("usage: "), refused
    assert error.startswith(f"scripts/{script}: error: nothing to run: this is a library that "), error


@pytest.mark.parametrize("module", [
    *(f"scripts.{path.stem}" for path in sorted((ROOT / "scripts").glob("*.py"))
      if path.stem not in ("bench_report", "profiling", "script_outputs")),  # the helper modules: above
    "segment.evaluate", "stylize.list", "stylize.import_onnx", "pipeline.viewer",
])
def test_argparse_help_gives_the_whole_first_paragraph_of_its_docstring(module, capsys):
    # make_demo_clip, crop_batches and bench_stylize took the first line of a sentence that goes on: "... across a
    # slowly panning photo background," and the help stopped there
    command = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_:
        command.main(["--help"])
    assert exit_.value.code == 0
    description = capsys.readouterr().out.split("\n\n")[1]  # after the usage, before the arguments
    # as argparse wraps it: at spaces, and after hyphens ("COCO-format")
    assert "".join(description.split()) == "".join(command.__doc__.split("\n\n")[0].split())
