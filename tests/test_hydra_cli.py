"""common/hydra_cli.py: an override that does not compose is one `error:` line and exit 2 in every Hydra app (Hydra
itself prints a block of six to twelve lines and exits 1)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import SettingError
from common.hydra_cli import check_overrides, exit_on_bad_overrides

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.mark.parametrize("module, override, message", [
    ("pipeline.render", "track.min_iuo=0.3", "error: Could not override 'track.min_iuo'. To append to your config "
                                             "use +track.min_iuo=0.3"),
    ("pipeline.render", "segment=r50fpn", "error: In 'render': Could not find 'segment/r50fpn' "
                                          "(options: demo, r18_fpn, r50_fpn)"),
    ("segment.train", "schedule=tinyy", "error: In 'train': Could not find 'schedule/tinyy' "
                                        "(options: demo, paper_1x, tiny)"),
    ("stylize.train", "stepz=3", "error: Could not override 'stepz'. To append to your config use +stepz=3"),
])
def test_a_bad_override_is_one_line_and_exit_2(tmp_path, module, override, message):
    result = subprocess.run([sys.executable, "-m", module, override], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, message + "\n")
    assert list(tmp_path.iterdir()) == []  # no outputs/ nor multirun/ folder from a refused run


def test_a_sweep_is_tried_at_each_swept_settings_first_value():
    check_overrides(CONF, "render", ["-m", "track.min_iou=0.3,0.5", "style.assign=by_class,per_instance"])
    with pytest.raises(SettingError, match="Could not find 'segment/r50fpn'"):
        check_overrides(CONF, "render", ["-m", "segment=r50fpn,r18_fpn"])
    with pytest.raises(SettingError, match="Ambiguous value"):  # without -m a comma is no sweep: Hydra refuses it
        check_overrides(CONF, "render", ["track.min_iou=0.3,0.5"])
    # a glob is expanded against the group's options by Hydra's sweeper alone: it cannot be composed as it is
    check_overrides(CONF, "render", ["-m", "segment=glob(*)", "track.min_iou=0.3,0.5"])


@pytest.mark.parametrize("flag", ["-m", "--mu", "--multi", "--multirun"])
def test_a_sweep_flag_argparse_takes_is_a_sweep(flag):
    # Hydra's argparse takes any prefix of --multirun: taken for another of Hydra's arguments, nothing is checked
    with pytest.raises(SettingError, match="Could not find 'segment/r50fpn'"):
        check_overrides(CONF, "render", [flag, "segment=r50fpn,r18_fpn"])


def test_a_refusal_is_said_once_under_torchrun(monkeypatch, capsys):
    """Every rank checks the command line and exits 2; only rank 0 says why (N copies of one line otherwise)."""
    for rank, said in (("1", ""), ("0", "error: In 'render': Could not find 'segment/r50fpn'")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            exit_on_bad_overrides(CONF, "render", ["segment=r50fpn"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(said) and (err == "") == (said == ""), err


def test_hydras_own_arguments_are_left_to_hydra():
    for args in (["--help"], ["--cfg", "job", "bogus=1"], ["--info"], ["hydra.run.dir=x", "track.min_iou=0.3"]):
        check_overrides(CONF, "render", args)


def test_a_group_set_to_null_is_one_line():
    """Hydra raises a plain ValueError for it, which was a traceback."""
    with pytest.raises(SettingError, match=r"^Config group override must be a string or a list. Got NoneType "
                                           r"\(encode=null\)$"):
        check_overrides(CONF, "render", ["encode=null"])
