"""Checkpoint files: clear one-line errors for bad files, exact round trips, Hydra-group loading."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from segment.checkpoint import load_checkpoint, load_segmenter, load_torchvision_checkpoint, save_checkpoint
from segment.config import SegmenterConfig
from segment.errors import CheckpointError, ConfigError
from segment.model import build_model

SMALL = dict(
    backbone="resnet18", norm="gn", fpn_channels=64, representation_size=128, mask_head_channels=64, num_classes=3,
    class_names=["__background__", "cat", "cup"], min_size=96, max_size=128, score_threshold=0.0, detections_per_img=10,
)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(SegmenterConfig(**SMALL)).eval()


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in one_line(error) and "not found" in str(error.value)


@pytest.mark.parametrize("content", [os.urandom(4096), b"just some notes\nnot weights\n"], ids=["random-bytes", "text"])
def test_not_a_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "bogus.pt"
    path.write_bytes(content)
    for loader in (load_checkpoint, load_torchvision_checkpoint):
        with pytest.raises(CheckpointError) as error:
            loader(path)
        assert str(path) in one_line(error) and "not a readable PyTorch checkpoint" in str(error.value)


class RunsACommand:
    def __reduce__(self):
        return os.system, ("echo unpickled",)


def test_refused_and_truncated_files_say_why(tmp_path, small_model):
    """The reason was torch's message cut at 120 characters: mid-way through its advice on `weights_only` without
    naming the refused global, or through "This is an internal miniz error" for a truncated file."""
    evil = tmp_path / "evil.pth"
    torch.save({"model": small_model.state_dict(), "extra": RunsACommand()}, evil)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(evil)
    assert one_line(error).endswith(f"(Unsupported global: GLOBAL {os.system.__module__}.system; a weights-only load "
                                    "reads tensors and plain data only)")
    whole = tmp_path / "whole.pth"
    torch.save(small_model.state_dict(), whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    for path in (truncated, tmp_path / "empty.pth"):
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        assert one_line(error) == (f"{path} is not a readable PyTorch checkpoint (not a complete checkpoint: "
                                   "the file is truncated or empty)")


def test_torch_file_of_the_wrong_kind(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(path)
    torch.save({"format": "instyle-segment-v1", "config": "oops"}, path)
    with pytest.raises(CheckpointError, match="without a valid config"):
        load_checkpoint(path)


def test_mismatched_keys_and_shapes_are_listed(tmp_path, small_model):
    state = dict(small_model.state_dict())
    del state["roi_heads.mask_head.0.0.weight"]
    state["rpn.head.extra.weight"] = torch.zeros(1)
    state["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(7)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, **SMALL)
    message = one_line(error)
    assert str(path) in message
    assert "missing roi_heads.mask_head.0.0.weight" in message
    assert "unexpected rpn.head.extra.weight" in message
    assert "roi_heads.box_predictor.cls_score.bias (7,) vs model (3,)" in message
    # bare weights carry no config: the message says what they were read into and why (it named resnet50 to a
    # user training a resnet18, with no reason given)
    assert "does not fit the resnet18 model it was read into (a file of bare weights carries no config" in message


def test_save_load_round_trip_gives_identical_predictions(tmp_path, small_model, real_photos):
    path = tmp_path / "deep" / "segmenter.pt"
    save_checkpoint(small_model, path, extra={"epoch": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["segmenter.pt"]  # no temp file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "instyle-segment-v1" and raw["epoch"] == 3 and raw["class_names"] == SMALL["class_names"]
    loaded = load_checkpoint(path)
    assert loaded.config == small_model.config and not loaded.training
    frame = real_photos["chelsea"]
    want, got = small_model.predict(frame)[0], loaded.predict(frame)[0]
    assert len(want) == 10
    for a, b in zip((got.boxes, got.scores, got.labels, got.masks), (want.boxes, want.scores, want.labels, want.masks)):
        assert torch.equal(a, b)
    assert load_checkpoint(path, score_threshold=0.5).config.score_threshold == 0.5


def test_load_segmenter_from_hydra_group(tmp_path, small_model):
    with pytest.raises(CheckpointError, match="segment.checkpoint=/path/to/maskrcnn_resnet50_fpn_coco.pth"):
        load_segmenter(OmegaConf.load("conf/segment/r50_fpn.yaml"))
    path = save_checkpoint(small_model, tmp_path / "small.pt")
    group = OmegaConf.create({"checkpoint": str(path), "device": "cpu", "score_threshold": 0.3, "class_names": None})
    model = load_segmenter(group)
    assert model.device.type == "cpu" and model.config.score_threshold == 0.3
    assert model.class_names == SMALL["class_names"]
    with pytest.raises(ConfigError, match="unknown segment config keys: colour"):
        load_segmenter({"checkpoint": str(path), "device": "cpu", "colour": "red"})


def test_our_checkpoint_keeps_its_architecture_under_a_different_group(tmp_path, small_model, capsys):
    """segment=r18_fpn says other widths (and leaves the classes to the checkpoint); our checkpoint knows what it
    was trained as, and a note says which of the group's values it does not take (it said nothing)."""
    path = save_checkpoint(small_model, tmp_path / "small.pt")
    group = OmegaConf.load("conf/segment/r18_fpn.yaml")
    group.checkpoint, group.device, group.score_threshold = str(path), "cpu", 0.25
    model = load_segmenter(group)
    assert model.class_names == small_model.class_names and model.config.num_classes == small_model.config.num_classes
    assert model.config.fpn_channels == small_model.config.fpn_channels
    assert model.config.score_threshold == 0.25 and model.config.min_size == group.min_size
    assert capsys.readouterr().err == (
        f"note: {path} runs with the architecture it was trained with: "
        "segment.fpn_channels=128 (the checkpoint's: 64); segment.representation_size=512 (the checkpoint's: 128); "
        "segment.mask_head_channels=128 (the checkpoint's: 64) ignored\n")


def test_architecture_settings_our_checkpoint_does_not_take_are_named(tmp_path, small_model, capsys):
    """segment.backbone=resnet50 or segment.num_classes=5 on the command line rendered our checkpoint as trained,
    without a word. A value it has already, or a bare state_dict (no architecture of its own), is no news."""
    path = save_checkpoint(small_model, tmp_path / "small.pt")
    bare = tmp_path / "bare.pth"
    torch.save(small_model.state_dict(), bare)
    given = {"checkpoint": str(path), "device": "cpu", **SMALL}
    model = load_segmenter({**given, "backbone": "resnet50", "num_classes": 5, "class_names": None})
    assert model.config == small_model.config
    assert capsys.readouterr().err == (
        f"note: {path} runs with the architecture it was trained with: segment.backbone=resnet50 (the checkpoint's: "
        "resnet18); segment.num_classes=5 (the checkpoint's: 3) ignored\n")
    assert load_segmenter(given).config == small_model.config
    assert load_segmenter({**given, "checkpoint": str(bare)}).config.fpn_channels == SMALL["fpn_channels"]
    assert capsys.readouterr().err == ""


def test_class_names_alone_give_the_number_of_classes(tmp_path, small_model, capsys):
    """segment.class_names given with num_classes null (as segment=r18_fpn leaves it) was refused against COCO's 91,
    even with the checkpoint's own names; other names load the checkpoint's, with a note."""
    path = save_checkpoint(small_model, tmp_path / "small.pt")
    assert SegmenterConfig.from_dict({"class_names": SMALL["class_names"]}).num_classes == 3
    assert SegmenterConfig.from_dict({"class_names": None}).num_classes == 91
    model = load_checkpoint(path, class_names=SMALL["class_names"])
    assert model.class_names == SMALL["class_names"] and capsys.readouterr().err == ""
    model = load_checkpoint(path, class_names=["__background__", "dog", "cup", "pen"])
    assert model.class_names == SMALL["class_names"]
    assert capsys.readouterr().err == (
        f"note: {path} runs with the architecture it was trained with: segment.class_names=[__background__, dog, cup, "
        "pen] (the checkpoint's: [__background__, cat, cup]) ignored\n")
    with pytest.raises(ConfigError, match="^segment.class_names has 2 names but num_classes is 3$"):
        SegmenterConfig.from_dict({"class_names": ["__background__", "cat"], "num_classes": 3})


def test_the_demo_group_says_nothing_of_its_own_checkpoint(capsys):
    from pipeline.render import compose_config

    group = OmegaConf.to_container(compose_config(["input=x.mp4", "output=y.mp4"]).segment)
    assert load_segmenter({**group, "device": "cpu"}).config.fpn_channels == group["fpn_channels"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("setting, message", [
    ({"backbone": "foo"}, "segment.backbone='foo' is not one of resnet18, "),
    ({"norm": "foo"}, "segment.norm='foo' is not one of frozen_bn, bn, gn"),
    ({"bn_eps": -1}, "segment.bn_eps must be a finite number >= 0, got -1"),
    ({"class_names": "abc"}, "segment.class_names must be a list of names, got 'abc'"),
    ({"num_classes": 1, "class_names": None}, "segment.num_classes must be a whole number >= 2, got 1"),
    ({"num_classes": 4}, "segment.class_names has 3 names but num_classes is 4"),
], ids=["backbone", "norm", "bn_eps", "class_names", "num_classes", "mismatch"])
def test_bad_architecture_values_are_refused_where_the_checkpoints_stand(tmp_path, small_model, setting, message):
    """They were dropped unread: segment.backbone=foo rendered, exit 0."""
    path = save_checkpoint(small_model, tmp_path / "small.pt")
    with pytest.raises(ConfigError) as error:
        load_segmenter({"checkpoint": str(path), "device": "cpu", **SMALL, **setting})
    assert one_line(error).startswith(message)


def test_fp16_file_is_half_the_size_and_loads_as_fp32(tmp_path, small_model):
    full = save_checkpoint(small_model, tmp_path / "full.pt")
    half = save_checkpoint(small_model, tmp_path / "half.pt", weights_dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    stored = torch.load(half, weights_only=True)["model"]
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for name, value in small_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float(), rtol=0, atol=0)


def test_loaded_model_is_whole_and_trains_like_a_built_one(tmp_path):
    """Loading builds the model without initialising it and takes every tensor from the file: nothing may stay
    unfilled, a BatchNorm file without step counters loads, and what trains is what a built model trains."""
    torch.manual_seed(1)
    built = build_model(SegmenterConfig(**{**SMALL, "norm": "bn", "trainable_layers": 3, "channels_last": True}))
    path = save_checkpoint(built, tmp_path / "bn.pt")
    raw = torch.load(path, weights_only=True)
    raw["model"] = {k: v for k, v in raw["model"].items() if not k.endswith("num_batches_tracked")}
    torch.save(raw, path)
    loaded = load_checkpoint(path)
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert not any(t.is_meta for t in tensors.values())
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == \
        {n: p.requires_grad for n, p in built.named_parameters()}
    assert any(not p.requires_grad for p in built.parameters())  # trainable_layers=3 froze the stem
    assert loaded.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for name, value in built.state_dict().items():
        want = torch.zeros_like(value) if name.endswith("num_batches_tracked") else value
        assert torch.equal(loaded.state_dict()[name], want), name


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_saved_files_follow_the_umask(tmp_path, small_model, umask):
    """They were 0600 (mkstemp's mode) whatever the umask: a team's shared run folder could not read them."""
    old = os.umask(umask)
    try:
        path = save_checkpoint(small_model, tmp_path / "model.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_export_into_an_unwritable_place_is_one_line(tmp_path, small_model, capsys):
    from scripts.export_segmenter import main

    source = save_checkpoint(small_model, tmp_path / "source.pt")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    refusals = {tmp_path / "a_file" / "model.pt": f"cannot create output folder {tmp_path / 'a_file'}",
                tmp_path / "a_folder": f"output {tmp_path / 'a_folder'} is a folder"}
    if os.geteuid() != 0:  # root writes into a read-only folder all the same
        refusals[read_only / "model.pt"] = f"cannot write to output folder {read_only}"
    for target, refusal in refusals.items():
        assert main([str(source), str(target)]) == 2, target
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {refusal}") and "\n" not in err, err
    assert sorted(p.name for p in (tmp_path / "a_folder").iterdir()) == [] and not any(read_only.iterdir())


def test_export_counts_only_real_classes(tmp_path, capsys):
    """COCO's 91 names hold 11 'N/A' gaps: "90 classes (..., N/A, ...)"."""
    from scripts.export_segmenter import main

    names = ["__background__", "cat", "N/A", "cup"]
    torch.manual_seed(0)
    model = build_model(SegmenterConfig(**{**SMALL, "num_classes": 4, "class_names": names}))
    source = save_checkpoint(model, tmp_path / "gaps.pt")
    assert main([str(source), str(tmp_path / "out.pt")]) == 0
    assert capsys.readouterr().out.strip().endswith(", 2 classes (cat, cup)")


def test_export_writes_fp16_weights_unless_told_fp32(tmp_path, small_model):
    """An exported file holds fp16 weights by default (half the size), fp32 with --fp32; both load as written."""
    from scripts.export_segmenter import main
    from segment.checkpoint import read_file

    source = save_checkpoint(small_model, tmp_path / "source.pt")
    for flags, dtype in (([], torch.float16), (["--fp32"], torch.float32)):
        out = tmp_path / f"{dtype}.pt"
        assert main([str(source), str(out), *flags]) == 0
        weights = read_file(out)["model"]
        assert {w.dtype for w in weights.values() if w.is_floating_point()} == {dtype}
        loaded = load_checkpoint(out).state_dict()
        assert all(torch.equal(loaded[k], w.to(loaded[k].dtype)) for k, w in weights.items())


def test_fp16_file_keeps_integer_buffers_exact(tmp_path):
    # num_batches_tracked is an int64 count: beyond fp16's 65504 a cast would not even stay finite
    model = build_model(SegmenterConfig(**{**SMALL, "norm": "bn"}))
    counters = [name for name, value in model.state_dict().items() if name.endswith("num_batches_tracked")]
    assert counters
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.num_batches_tracked.fill_(90001)
    half = save_checkpoint(model, tmp_path / "half.pt", weights_dtype=torch.float16)
    stored = torch.load(half, weights_only=True)["model"]
    loaded = load_checkpoint(half).state_dict()
    for name in counters:
        assert stored[name].dtype == torch.int64 and int(stored[name]) == 90001, name
        assert loaded[name].dtype == torch.int64 and int(loaded[name]) == 90001, name


def test_a_folded_model_is_not_saved(tmp_path):
    """Folded convs carry the BN in their weights and bias: saved, the file would load into a model that applies
    the BN again (fold_frozen_norms is for inference only)."""
    torch.manual_seed(0)
    model = build_model(SegmenterConfig(**dict(SMALL, norm="frozen_bn"))).eval().fold_frozen_norms()
    with pytest.raises(CheckpointError, match="folded") as error:
        save_checkpoint(model, tmp_path / "folded.pt")
    one_line(error)
    assert not any(tmp_path.iterdir())


def test_a_relative_path_missing_here_is_read_from_the_project(tmp_path, monkeypatch):
    """The render's default checkpoint (models/demo_segmenter.pt) must be found from any working directory, while
    a file of that name where the command runs wins."""
    from segment.checkpoint import PROJECT_ROOT, project_relative

    monkeypatch.chdir(tmp_path)
    relative = "models/demo_segmenter.pt"
    assert (PROJECT_ROOT / relative).is_file()
    assert project_relative(relative) == PROJECT_ROOT / relative
    assert project_relative("models/nowhere.pt") == type(PROJECT_ROOT)("models/nowhere.pt")
    (tmp_path / "models").mkdir()
    (tmp_path / relative).write_bytes(b"")
    assert project_relative(relative) == type(PROJECT_ROOT)(relative)
