"""common/hydra_cli.py: an override that does not compose is one `error:` line and exit 2 in every Hydra app (Hydra
itself prints a block of six to twelve lines and exits 1)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import SettingError
from common.hydra_cli import check_overrides, compose_checked, exit_on_bad_overrides, hydra_readable

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.mark.parametrize("module, args, message", [
    ("pipeline.render", ["track.min_iuo=0.3"], "error: Could not override 'track.min_iuo': track has no key 'min_iuo' "
                                               "(did you mean track.min_iou?)"),
    ("pipeline.render", ["segment=r50fpn"], "error: In 'render': Could not find 'segment/r50fpn' "
                                            "(options: demo, r18_fpn, r50_fpn)"),
    ("segment.train", ["schedule=tinyy"], "error: In 'train': Could not find 'schedule/tinyy' "
                                          "(options: demo, paper_1x, tiny)"),
    ("stylize.train", ["stepz=3"], "error: Could not override 'stepz': the config has no key or group 'stepz' "
                                   "(did you mean steps?)"),
    # the sweep's second option: Hydra's error block, and the sweep's folder was left with its multirun.yaml
    ("pipeline.render", ["-m", "segment=demo,r51"], "error: In 'render': Could not find 'segment/r51' "
                                                    "(options: demo, r18_fpn, r50_fpn)"),
    # Hydra's ValueError traceback
    ("pipeline.render", ["-m", "--cfg", "job", "track.min_iou=0.3,0.5"],
     "error: -m and --cfg cannot be given together: Hydra takes one of -m, --run, --cfg, --info"),
])
def test_a_bad_override_is_one_line_and_exit_2(tmp_path, module, args, message):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, message + "\n")
    assert list(tmp_path.iterdir()) == []  # no outputs/ nor multirun/ folder from a refused run


def test_a_sweep_is_tried_at_each_swept_settings_first_value_and_each_swept_groups_options():
    check_overrides(CONF, "render", ["-m", "track.min_iou=0.3,0.5", "style.assign=by_class,per_instance"])
    with pytest.raises(SettingError, match="Could not find 'segment/r50fpn'"):
        check_overrides(CONF, "render", ["-m", "segment=r50fpn,r18_fpn"])
    with pytest.raises(SettingError, match="Could not find 'segment/r51'"):
        check_overrides(CONF, "render", ["-m", "track.min_iou=0.3,0.5", "segment=demo,r18_fpn,r51"])
    with pytest.raises(SettingError, match="Could not find 'style/class_styles/none'"):  # a group in a group
        check_overrides(CONF, "render", ["-m", "style/class_styles=coco,none"])
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


def test_overrides_beside_hydras_own_arguments_are_checked_too():
    for args in (["--help"], ["--hydra-help"], ["--version"], ["--info"], ["--info", "defaults", "track.min_iou=0.3"],
                 ["--cfg", "job", "track.min_iou=0.3"],
                 ["hydra.run.dir=x", "hydra.job.chdir=true", "track.min_iou=0.3"],
                 ["-m", "hydra.sweep.dir=x", "track.min_iou=0.3,0.5"], ["--run", "track.min_iou=0.3"],
                 # another config than the one checked against, and what Hydra's parser refuses: Hydra answers
                 ["--config-name", "other", "bogus=1"], ["-cp", "elsewhere", "bogus=1"], ["--cfg", "everything"]):
        check_overrides(CONF, "render", args)
    with pytest.raises(SettingError, match=r"^Could not override 'segment.typo': segment has no key 'typo' \(known: "
                                           r"checkpoint, backbone, .*, cuda_graphs\)$"):
        check_overrides(CONF, "render", ["--cfg", "job", "segment.typo=3"])
    with pytest.raises(SettingError, match="Could not find 'segment/nope'"):
        check_overrides(CONF, "render", ["--info", "config", "segment=nope"])
    with pytest.raises(SettingError, match=r"^Could not override 'hydra.typo': hydra has no key 'typo' \(known: run, "):
        check_overrides(CONF, "render", ["hydra.typo=1", "track.min_iou=0.3"])
    # Hydra's message is one line, the reason in its cause
    with pytest.raises(SettingError, match=r"^Error merging override hydra.job.chdir=maybe Value 'maybe' is not a "
                                           r"valid bool"):
        check_overrides(CONF, "render", ["hydra.job.chdir=maybe"])


@pytest.mark.parametrize("args, message", [
    (["--run", "-m"], "-m and --run cannot be given together"),
    (["--cfg", "job", "--info"], "--cfg and --info cannot be given together"),
    (["hydra.mode=MULTIRUN", "--cfg", "job"], None),  # a mode set in the config is Hydra's to reconcile
])
def test_hydras_modes_given_together_are_one_line(args, message):
    if message is None:
        check_overrides(CONF, "render", args)
        return
    with pytest.raises(SettingError, match=f"^{message}: Hydra takes one of -m, --run, --cfg, --info$"):
        check_overrides(CONF, "render", args)


@pytest.mark.parametrize("override, message", [
    # Hydra's hint, "To append to your config use +...", is refused by every stage that reads the group
    ("style.asign=by_class", "Could not override 'style.asign': style has no key 'asign' (did you mean style.assign?)"),
    ("segmnt=r50_fpn", "Could not override 'segmnt': the config has no key or group 'segmnt' (did you mean segment?)"),
    ("track.tracker.max_age=3", "Could not override 'track.tracker.max_age': track has no key 'tracker' (known: "
                                "match_on, min_iou, same_class, birth_score, max_misses, motion, velocity_momentum, "
                                "mask_size)"),
    ("style.margin.x=1", "Could not override 'style.margin.x': style.margin is a value, not a group of keys"),
    # Hydra's hint is defaults-list syntax ("use 'override style/class_styles: coco'")
    ("+style/class_styles=coco", "style/class_styles is already chosen in the config: leave out the + "
                                 "(style/class_styles=coco)"),
])
def test_a_misnamed_key_says_what_is_there(override, message):
    with pytest.raises(SettingError) as refusal:
        check_overrides(CONF, "render", [override])
    assert str(refusal.value) == message


def test_a_group_set_to_null_is_one_line():
    """Hydra raises a plain ValueError for it, which was a traceback."""
    with pytest.raises(SettingError, match=r"^Config group override must be a string or a list. Got NoneType "
                                           r"\(encode=null\)$"):
        check_overrides(CONF, "render", ["encode=null"])


@pytest.mark.parametrize("module, args, message", [
    ("segment.train", ["data=coco", "data.root={d}", "output_dir={d}/run"], "image directory not found: {d}/train2017"),
    ("stylize.train", ["style_image={d}/a.jpg", "content={d}", "vgg={d}/vgg.pth", "out={d}/a.pt"],
     "VGG16 weights not found at {d}/vgg.pth: pass vgg=/path/to/vgg16-397923af.pth (torchvision's ImageNet vgg16 "
     "state_dict, loaded with weights_only=True)"),
    ("stylize.train", ["mode=full", "style_image=[{d}/a.jpg,{d}/b.jpg]", "content={d}", "vgg={d}/vgg.pth",
                       "out={d}/ab.pt"], "VGG16 weights not found at {d}/vgg.pth: pass vgg=/path/to/vgg16-397923af.pth "
                                         "(torchvision's ImageNet vgg16 state_dict, loaded with weights_only=True)"),
])
def test_the_trainings_read_paths_hydra_cannot_read_unquoted(tmp_path, module, args, message):
    """Non-ASCII file names were Hydra's `LexerNoViableAltException` in both trainings (the render quoted them)."""
    folder = tmp_path / "données (é)"
    folder.mkdir()
    result = subprocess.run([sys.executable, "-m", module, *(arg.format(d=folder) for arg in args)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, f"error: {message.format(d=folder)}\n")
    assert list(folder.iterdir()) == []


def test_an_interpolation_of_no_setting_is_one_line():
    """A file name with `${` in it is Hydra's interpolation: one naming no setting was an InterpolationKeyError
    traceback where the job first read the value."""
    hint = r" \(Hydra reads \$\{...\} as another setting's value: for a literal \$\{ write \\\$\{\)$"
    for args, key in ((["input=dollar${x}.mp4"], "input"), (["-m", "input=a.mp4", "output=o_${x}.mp4,b.mp4"], "output"),
                      (["segment.checkpoint=${oops}"], "segment.checkpoint")):
        with pytest.raises(SettingError, match=rf"^{key}: Interpolation key '\w+' not found" + hint):
            check_overrides(CONF, "render", args)
    # interpolations of settings, and of resolvers Hydra sets up only for the job, are the user's to make
    check_overrides(CONF, "render", ["input=a.mp4", "output=b.mp4", "debug.dir=${output}_dump"])
    check_overrides(CONF, "train", ["output_dir=${hydra:runtime.output_dir}/x"])
    # escaped, the name arrives as it is
    escaped = hydra_readable(["input=dollar\\${x}.mp4", "output=b.mp4"], ("input", "output"))
    check_overrides(CONF, "render", escaped)
    assert compose_checked(CONF, "render", escaped).input == "dollar${x}.mp4"
