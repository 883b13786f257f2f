"""DebugDumper on hand-built FrameRecords: masks round-trip through pycocotools, images follow `every`,
the folder is marked complete only at close, and the reader / viewer CLI reject or flag bad folders."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.debug import DebugDumper, DebugDumpError
from pipeline.debug_reader import load_dump
from pipeline.record import StylizedRegion
from common.errors import UserError
from pipeline import viewer
from pipeline.viewer import ViewerServer
from tests.helpers_process import interruptible_popen
from tests.debug_fixture import CLASS_NAMES, synthetic_records, write_dump

ROOT = Path(__file__).resolve().parents[1]


def read_lines(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "frames.jsonl").read_text().splitlines()]


def test_full_size_masks_decode_to_the_binarized_masks(tmp_path):
    records = write_dump(tmp_path / "d", n=6, every=1, max_side=640)
    lines = read_lines(tmp_path / "d")
    assert [line["index"] for line in lines] == [r.index for r in records]
    for record, line in zip(records, lines):
        inst = record.instances
        assert line["size"] == line["dump_size"] == [90, 160] and line["scale"] == 1.0
        assert line["time"] == pytest.approx(record.time)
        assert len(line["instances"]) == len(inst)
        for i, d in enumerate(line["instances"]):
            expected = (inst.masks[i] >= 0.5).numpy()
            decoded = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), expected)
            assert d["area"] == int(expected.sum())
            assert d["track_id"] == int(record.track_ids[i])
            assert d["class"] == CLASS_NAMES[int(inst.labels[i])]
            assert d["style"] == record.styles[i]
            assert d["keep"] == bool(record.keep[i])
            assert d["score"] == pytest.approx(float(inst.scores[i]), abs=1e-4)
            assert d["box"] == pytest.approx(inst.boxes[i].tolist(), abs=0.01)
        assert [r["box"] for r in line["regions"]] == [list(r.box) for r in record.stylized]
        assert [r["carried"] for r in line["regions"]] == [r.carried for r in record.stylized]
        assert (line["propagated"], line["cut"]) == (record.propagated, record.cut)
        assert set(line["timings"]) == {"decode", "segment", "track", "composite"}


def test_downscaled_masks_are_the_majority_vote_and_images_follow_every(tmp_path):
    d = tmp_path / "d"
    records = write_dump(d, n=10, every=3, max_side=80)      # 160x90 → 80x45: exact 2x2 blocks
    lines = read_lines(d)
    for record, line in zip(records, lines):
        assert line["dump_size"] == [45, 80] and line["scale"] == 0.5
        for i, inst in enumerate(line["instances"]):
            blocks = (record.instances.masks[i] >= 0.5).numpy().reshape(45, 2, 80, 2).mean(axis=(1, 3))
            decoded = mask_utils.decode({"size": inst["mask"]["size"], "counts": inst["mask"]["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), blocks >= 0.5)
        if record.index % 3 == 0:
            assert set(line["images"]) == {"original", "masks", "stylized", "composite"}
            for rel in line["images"].values():
                with Image.open(d / rel) as image:
                    assert image.size == (80, 45) and image.format == "JPEG"
        else:
            assert line["images"] == {}
    on_disk = sorted(p.name for p in (d / "images").iterdir())
    assert on_disk == sorted(f"{i:06d}_{layer}.jpg" for i in (0, 3, 6, 9)
                             for layer in ("original", "masks", "stylized", "composite"))
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["frame_count"] == 10 and manifest["image_frames"] == 4
    assert manifest["class_names"] == CLASS_NAMES and manifest["every"] == 3
    assert manifest["layers"] == ["original", "masks", "stylized", "composite"]


def test_roi_masks_are_binarized_at_the_composites_threshold_before_the_majority_vote(tmp_path):
    """A render's masks are RoIMasks: that path binarized them at 0.5 whatever composite.mask_threshold was."""
    from segment.roi_masks import RoIMasks
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    cone = (1 - (yy ** 2 + xx ** 2).sqrt()).clamp(0, 1)      # every probability from 0 to 1: the threshold matters
    records = synthetic_records(2)
    for record in records:
        inst = record.instances
        inst.masks = RoIMasks.from_probs(cone.expand(len(inst), 28, 28), inst.boxes, record.size)
    d = tmp_path / "d"
    write_dump(d, records=records, max_side=80, mask_threshold=0.9)     # 160x90 → 80x45: exact 2x2 blocks
    for record, line in zip(records, read_lines(d)):
        pasted = record.instances.masks.paste().numpy()
        expected = (pasted >= 0.9).reshape(-1, 45, 2, 80, 2).mean(axis=(2, 4)) >= 0.5
        assert expected.any()
        for i, inst in enumerate(line["instances"]):
            decoded = mask_utils.decode({"size": inst["mask"]["size"], "counts": inst["mask"]["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), expected[i])


def test_the_masks_layer_draws_the_boxes_where_the_objects_are_in_the_smaller_image(tmp_path):
    d = tmp_path / "d"
    write_dump(d, n=1, max_side=80, image_format="png")          # 160x90 → 80x45: scale 0.5
    line = read_lines(d)[0]
    manifest = json.loads((d / "manifest.json").read_text())
    layer = np.asarray(Image.open(d / line["images"]["masks"]))
    for inst in line["instances"]:
        x1, y1, x2, y2 = (int(v * line["scale"]) for v in inst["box"])    # torchvision draws at whole pixels
        color = manifest["palette"][inst["track_id"]] if inst["track_id"] >= 0 else manifest["untracked_color"]
        # the box's left edge, in the track's colour from corner to corner (its label, above, shares the colour)
        np.testing.assert_array_equal(layer[y1:y2 + 1, x1], np.broadcast_to(color, (y2 + 1 - y1, 3)))


@pytest.mark.parametrize("background", [False, True])
def test_png_layers_hold_the_frame_its_composite_and_the_stylized_crops(tmp_path, background):
    d = tmp_path / "d"
    records = write_dump(d, n=3, every=1, max_side=640, image_format="png", background=background)
    record, line = records[2], read_lines(d)[2]
    load = lambda layer: np.asarray(Image.open(d / line["images"][layer])).transpose(2, 0, 1)  # noqa: E731
    np.testing.assert_array_equal(load("original"), record.image.numpy())
    np.testing.assert_array_equal(load("composite"), record.output.numpy())
    stylized = load("stylized")
    covered = np.zeros(record.size, bool)
    for region in record.stylized:
        x1, y1, x2, y2 = region.box
        covered[y1:y2, x1:x2] = True
        expected = (region.pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(stylized[:, y1:y2, x1:x2], expected)
    # elsewhere the background style's frame, or black without one
    elsewhere = np.zeros((3, *record.size), np.uint8) if record.background is None else \
        (record.background * 255).round().to(torch.uint8).numpy()
    assert covered.any() and (stylized[:, ~covered] == elsewhere[:, ~covered]).all()
    masks_layer = load("masks")
    person = (record.instances.masks[0] >= 0.5).numpy()
    assert (masks_layer[:, person] != load("original")[:, person]).any()   # masks tinted over the original
    # inside a mask, below its label: torchvision's blend, 0.45 * original + 0.55 * the manifest's track colour
    palette = json.loads((d / "manifest.json").read_text())["palette"]
    for i, inst in enumerate(line["instances"]):
        if inst["track_id"] < 0:
            continue                               # the car's square is all label at this size
        x1, y1, x2, y2 = inst["box"]
        y, x = int(y2) - 4, int((x1 + x2) / 2)
        assert record.instances.masks[i, y, x] == 1
        blend = 0.45 * record.image[:, y, x].numpy() + 0.55 * np.array(palette[inst["track_id"]])
        np.testing.assert_allclose(masks_layer[:, y, x], blend, atol=1)


def test_default_dir_is_beside_the_output_and_bad_settings_fail(tmp_path):
    cfg = OmegaConf.create({"dump": True, "dir": None, "every": 2, "max_side": 320, "image_format": "jpg",
                            "jpeg_quality": 80, "workers": 1})
    dumper = DebugDumper.from_config(cfg, CLASS_NAMES, output_path=tmp_path / "clip.mp4")
    dumper.close()
    assert dumper.dir == tmp_path / "clip_debug" and dumper.every == 2 and dumper.max_side == 320
    assert json.loads((tmp_path / "clip_debug" / "manifest.json").read_text())["frame_count"] == 0
    with pytest.raises(DebugDumpError, match="debug.dir"):
        DebugDumper.from_config(cfg, CLASS_NAMES)
    for key, value in (("every", 0), ("image_format", "gif"), ("jpeg_quality", 0), ("max_side", 4), ("workers", 0),
                       ("every", "abc"), ("every", 1.5)):
        with pytest.raises(UserError, match=f"debug.{key}"):
            DebugDumper.from_config(OmegaConf.merge(cfg, {key: value}), CLASS_NAMES, tmp_path / "x.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DebugDumpError, match="not a folder"):
        DebugDumper(tmp_path / "file", CLASS_NAMES)


def test_a_rerun_replaces_the_earlier_dump_only_with_overwrite(tmp_path):
    """A rerun silently replaced an existing dump whatever the render's overwrite said."""
    d = tmp_path / "d"
    write_dump(d, n=6, every=1, max_side=64)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(DebugDumpError, match="already holds a debug dump: pass overwrite=true"):
        write_dump(d, n=6, every=5, max_side=64)
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before      # nothing touched
    write_dump(d, n=6, every=5, max_side=64, overwrite=True)
    assert {p.name[:6] for p in (d / "images").iterdir()} == {"000000", "000005"}
    assert len(read_lines(d)) == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dump(empty, n=1, max_side=32)                  # an empty folder holds nothing to lose
    assert len(read_lines(empty)) == 1


def test_a_rerun_removes_the_temp_images_a_killed_render_left(tmp_path):
    """AtomicOutput's temps are `.{stem}.{hex}.partial{suffix}`; the clean-up looked for *.tmp and kept them."""
    d = tmp_path / "d"
    write_dump(d, n=2, max_side=32)
    leftovers = [d / "images" / ".000001_masks.0a1b2c3d.partial.jpg", d / ".manifest.12ab34cd.partial.json",
                 d / "images" / ".000000_original.0000ff00.partial.png"]
    for leftover in leftovers:
        leftover.write_bytes(b"half written")
    write_dump(d, n=2, max_side=32, overwrite=True)
    assert not [p for p in leftovers if p.exists()]
    assert sorted(p.name for p in (d / "images").iterdir()) == sorted(
        f"{i:06d}_{layer}.jpg" for i in (0, 1) for layer in ("original", "masks", "stylized", "composite"))


@pytest.mark.parametrize("case", ["notes", "manifest", "frames", "image", "folder"])
def test_a_folder_with_files_a_dump_does_not_write_is_always_refused(tmp_path, case):
    """A dump folder's foreign files (someone's manifest.json, notes beside the dump) were replaced or kept at
    random; now nothing is written there, overwrite or not."""
    d = tmp_path / "d"
    if case == "manifest":
        d.mkdir()
        (d / "manifest.json").write_text('{"format": "someone-elses", "version": 3}')
    elif case == "frames":
        d.mkdir()
        (d / "frames.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    else:
        write_dump(d, n=1, max_side=32)
        if case == "notes":
            (d / "notes.txt").write_text("mine")
        elif case == "image":
            (d / "images" / "holiday.png").write_bytes(b"png")
        else:
            (d / "runs").mkdir()
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    for overwrite in (False, True):
        with pytest.raises(DebugDumpError, match="not a debug dump's") as error:
            write_dump(d, n=1, max_side=32, overwrite=overwrite)
        assert len(str(error.value).splitlines()) == 1 and str(d) in str(error.value)
        assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_a_render_refuses_an_existing_dump_without_overwrite_and_records_the_composite(tmp_path):
    """The render passed neither its overwrite nor composite.mask_threshold to the dump: a rerun replaced the
    dump with overwrite=false, and the masks were binarized at 0.5 whatever the composite used."""
    from tests.helpers_video import pattern_frames, write_clip
    from tests.render_cli import run_in_process, tiny_model_overrides

    clip = write_clip(tmp_path / "clip.mp4", pattern_frames(3, 64, 48))
    dump = tmp_path / "dump"
    args = [f"input={clip}", *tiny_model_overrides(tmp_path / "models"), "debug.dump=true", f"debug.dir={dump}",
            "composite.mask_threshold=0.9", "composite.feather_px=2", "composite.smooth_masks=0.25"]
    first = run_in_process([*args, f"output={tmp_path / 'a.mp4'}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((dump / "manifest.json").read_text())
    assert (manifest["mask_threshold"], manifest["feather_px"], manifest["smooth_masks"]) == (0.9, 2, 0.25)
    assert manifest["area_threshold"] == 0.5 and manifest["background_style"] is None
    before = {p: p.read_bytes() for p in dump.rglob("*") if p.is_file()}
    second = run_in_process([*args, f"output={tmp_path / 'b.mp4'}"], cwd=tmp_path)
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: debug dir {dump} ") and "overwrite=true" in errors[0]
    assert "render:" not in second.stderr                      # refused before the first frame: no progress bar
    assert not (tmp_path / "b.mp4").exists() and not list(tmp_path.glob(".b.*"))
    assert {p: p.read_bytes() for p in dump.rglob("*") if p.is_file()} == before
    # a background style: the manifest and every frame record name what painted the rest of the frame
    third = run_in_process([*args, f"output={tmp_path / 'b.mp4'}", "overwrite=true", "style.background=style_02"],
                           cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert json.loads((dump / "manifest.json").read_text())["background_style"] == "style_02"
    lines = read_lines(dump)
    assert len(lines) == 3 and all(line["background_style"] == "style_02" for line in lines)


def test_masks_are_binarized_at_the_composites_threshold_and_area_is_what_min_area_counts(tmp_path):
    """With composite.mask_threshold=0.95 the dumped masks were those at 0.5: 20-46% bigger than what was
    composited, and the manifest said 0.5."""
    d = tmp_path / "d"
    records = write_dump(d, n=3, max_side=640, mask_threshold=0.95, feather_px=3, smooth_masks=0.4)
    manifest = json.loads((d / "manifest.json").read_text())
    assert (manifest["mask_threshold"], manifest["feather_px"], manifest["smooth_masks"]) == (0.95, 3, 0.4)
    assert manifest["area_threshold"] == 0.5
    shrunk = 0
    for record, line in zip(records, read_lines(d)):
        for i, d_ in enumerate(line["instances"]):
            decoded = mask_utils.decode({"size": d_["mask"]["size"], "counts": d_["mask"]["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), (record.instances.masks[i] >= 0.95).numpy())
            assert d_["area"] == int((record.instances.masks[i] >= 0.5).sum())
            shrunk += d_["area"] > decoded.sum()
    assert shrunk > 0                                  # the soft discs: 0.95 keeps fewer pixels than 0.5
    with pytest.raises(UserError, match="composite.mask_threshold"):
        DebugDumper(tmp_path / "e", CLASS_NAMES, mask_threshold=0)


def test_the_background_style_is_named_in_every_frame_record(tmp_path):
    """Frame records said only "background": true: the viewer could not tell what painted the objects assign
    did not keep, and labelled them "(original)"."""
    d = tmp_path / "d"
    write_dump(d, n=6, max_side=64, background=True, background_style="style_12")
    lines = read_lines(d)
    assert all(line["background"] is True and line["background_style"] == "style_12" for line in lines)
    assert json.loads((d / "manifest.json").read_text())["background_style"] == "style_12"
    dog = [i for i in lines[5]["instances"] if i["track_id"] == 1][0]
    assert (dog["style"], dog["keep"]) == (None, True)            # left original: its own pixels
    assert {r["style"] for r in lines[5]["regions"]} == {"candy", "original"}
    write_dump(tmp_path / "plain", n=2, max_side=64, background_style="style_12")   # no background ran
    assert [line["background_style"] for line in read_lines(tmp_path / "plain")] == [None, None]


def test_the_stylized_layer_stacks_overlapping_crops_as_the_composite_does(tmp_path):
    """The layer pasted crops in record.stylized order; the composite blends lower scores first, so where crops
    overlapped the layer showed the other object on top."""
    record = synthetic_records(3)[2]
    solid = lambda color, h, w: torch.tensor(color)[:, None, None].expand(3, h, w).clone()  # noqa: E731
    person, dog = 0, 1
    assert float(record.instances.scores[person]) > float(record.instances.scores[dog])
    record.stylized = [StylizedRegion(person, "candy", (20, 20, 60, 60), solid((1.0, 0.0, 0.0), 40, 40)),
                       StylizedRegion(dog, "mosaic", (40, 40, 80, 80), solid((0.0, 1.0, 0.0), 40, 40))]
    d = tmp_path / "d"
    write_dump(d, records=[record], max_side=640, image_format="png")
    layer = np.asarray(Image.open(d / read_lines(d)[0]["images"]["stylized"]))
    np.testing.assert_array_equal(layer[40:60, 40:60], np.broadcast_to([255, 0, 0], (20, 20, 3)))  # person on top
    np.testing.assert_array_equal(layer[60:80, 60:80], np.broadcast_to([0, 255, 0], (20, 20, 3)))


def test_not_finite_numbers_are_written_as_null(tmp_path):
    """A NaN score or an infinite timing went out as bare NaN / Infinity, which JSON.parse rejects: the
    browser showed no frame at all."""
    records = synthetic_records(2)
    records[0].instances.scores[0] = float("nan")
    records[0].instances.boxes[0, 2] = float("inf")
    records[1].timings["segment"] = float("-inf")
    d = tmp_path / "d"
    write_dump(d, records=records, max_side=64)
    text = (d / "frames.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["instances"][0]["score"] is None and first["instances"][0]["box"][2] is None
    assert second["timings"]["segment"] is None
    dump = load_dump(d)
    assert len(dump.frames) == 2 and dump.warnings == []


def test_scores_keep_four_places_and_the_manifest_the_video_info(tmp_path):
    from fractions import Fraction
    from pipeline.decode import VideoInfo
    info = VideoInfo(path=tmp_path / "clip.mp4", width=160, height=90, time_base=Fraction(1, 30000),
                     average_rate=Fraction(30000, 1001), frame_count=2, declared_frames=2, duration=0.067,
                     codec="h264", pix_fmt="yuv420p", rotation=0, has_audio=False)
    records = synthetic_records(2)
    records[0].instances.scores[0] = 0.8765
    d = tmp_path / "d"
    write_dump(d, records=records, max_side=64, video_info=info)
    assert read_lines(d)[0]["instances"][0]["score"] == 0.8765
    video = json.loads((d / "manifest.json").read_text())["video"]
    assert video["info"]["average_rate"] == "30000/1001" and video["info"]["path"] == str(tmp_path / "clip.mp4")
    assert (video["info"]["width"], video["info"]["height"], video["info"]["codec"]) == (160, 90, "h264")
    assert video["size"] == [90, 160]


def test_the_manifest_is_put_in_place_last(tmp_path, monkeypatch):
    """The folder shows a dump once its manifest is there: the frames and images must already be."""
    placed, real_rename = [], os.rename

    def rename(source, target):
        if Path(source).parent.name.endswith(".partial"):
            placed.append(Path(target).name)
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    write_dump(tmp_path / "d", n=2, max_side=32)
    assert sorted(placed) == ["frames.jsonl", "images", "manifest.json"] and placed[-1] == "manifest.json"


def test_malformed_and_not_json_records_are_skipped_with_one_warning(tmp_path):
    """A record whose images is a list raised AttributeError; NaN / Infinity (Python's JSON, not the browser's)
    and records without instances were served and stopped the page."""
    d = tmp_path / "d"
    write_dump(d, n=3, max_side=64)
    good = read_lines(d)
    bad = [{**good[0], "images": ["images/000000_original.jpg"]}, {"index": 1000},
           {**good[1], "instances": [{**good[1]["instances"][0], "box": "0,0,1,1"}]},
           {**good[1], "instances": [{**good[1]["instances"][0], "mask": {"size": [1, 1], "counts": "1"}}]},
           {**good[2], "dump_size": None}, [1, 2], {**good[2], "timings": {"segment": "slow"}},
           {**good[1], "regions": [None]}, {**good[2], "time": "0.08s"}]
    text = (d / "frames.jsonl").read_text()
    text += "".join(json.dumps(record) + "\n" for record in bad)
    text += json.dumps(good[0]).replace('"score": 0.9', '"score": NaN') + "\n"
    text += json.dumps(good[0]).replace('"time": 0.0', '"time": -Infinity') + "\n"
    (d / "frames.jsonl").write_text(text)
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "palette": [], "every": 0}))   # the page divides by both
    dump = load_dump(d)
    assert [json.loads(f)["index"] for f in dump.frames] == [0, 1, 2]
    assert dump.warnings == ["manifest.json: every, palette unreadable, the defaults used",
                             "frames.jsonl: 11 unreadable or malformed lines skipped"]
    assert dump.manifest["palette"] == manifest["palette"] and "every" not in dump.manifest


@pytest.mark.parametrize("case, said", [("missing", "missing"), ("cut off", "unreadable"),
                                        ("nested too deep", "unreadable")])  # was a RecursionError traceback
def test_a_missing_or_unreadable_manifest_is_one_warning(tmp_path, case, said):
    """Without a manifest that could be read, the reader also said "manifest.json has complete=false"."""
    d = tmp_path / "d"
    write_dump(d, n=2, max_side=32)
    if case == "missing":
        (d / "manifest.json").unlink()
    elif case == "cut off":
        (d / "manifest.json").write_text('{"format": "instyle-debug-v1", "comp')
    else:
        (d / "manifest.json").write_text('{"format": "instyle-debug-v1", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    dump = load_dump(d)
    assert len(dump.warnings) == 1 and f"manifest.json is {said}" in dump.warnings[0], dump.warnings
    assert len(dump.frames) == 2


def test_images_are_served_with_validators_and_revalidated(tmp_path):
    """Images went out with max-age=3600 and no validator: after a render into the same folder the browser kept
    showing the old render's pictures beside the new records."""
    d = tmp_path / "d"
    write_dump(d, n=1, max_side=64)
    server = ViewerServer(load_dump(d), port=0)
    server.start_in_thread()
    url = server.url + "images/000000_composite.jpg"
    def get(headers: dict | None = None):
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10)
    try:
        first = get()
        tag, body = first.headers["ETag"], first.read()
        assert first.headers["Cache-Control"] == "no-cache" and tag and first.headers["Last-Modified"]
        with pytest.raises(urllib.error.HTTPError) as unchanged:
            get({"If-None-Match": tag})
        assert unchanged.value.code == 304 and unchanged.value.headers["ETag"] == tag
        (d / "images" / "000000_composite.jpg").write_bytes(body + b"\0")     # a new render's image
        again = get({"If-None-Match": tag})
        assert again.status == 200 and again.headers["ETag"] != tag and again.read() == body + b"\0"
        # new bytes under the old mtime (a copy that keeps times: cp -p, rsync -t): the size still tells
        image, stat = d / "images" / "000000_composite.jpg", (d / "images" / "000000_composite.jpg").stat()
        image.write_bytes(body + b"\0\0")
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        copied = get({"If-None-Match": again.headers["ETag"]})
        assert copied.status == 200 and copied.read() == body + b"\0\0"
        assert get().headers["Cache-Control"] == "no-cache"
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_the_browser_dropped_prints_no_traceback(tmp_path, capfd):
    """Playing the page cancels image downloads: each printed socketserver's "Exception occurred during processing
    of request" and a BrokenPipeError or ConnectionResetError traceback (19 in one short session). Other errors
    still print theirs."""
    d = tmp_path / "d"
    write_dump(d, n=1, max_side=32)
    server = ViewerServer(load_dump(d), port=0)
    try:
        for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), ValueError("a bug")):
            try:
                raise error
            except Exception:
                server.handle_error(None, ("127.0.0.1", 1))
        printed = capfd.readouterr().err
        assert "BrokenPipeError" not in printed and "ConnectionResetError" not in printed
        assert printed.count("Exception occurred during processing of request") == 1 and "ValueError: a bug" in printed
    finally:
        server.server_close()


def test_the_server_reads_the_dump_again_once_a_render_replaced_it(tmp_path, capfd):
    """The records and manifest were read once, at start: after a render with overwrite=true into the same folder,
    a reloaded page showed the new images with the old records (images are revalidated)."""
    d = tmp_path / "d"
    write_dump(d, n=2, max_side=32)
    server = ViewerServer(load_dump(d), port=0)
    server.start_in_thread()
    get = lambda path: json.load(urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10))  # noqa: E731
    try:
        assert get("/api/frames")["total"] == 2 and get("/api/manifest")["every"] == 1
        write_dump(d, n=5, every=2, max_side=32, overwrite=True)
        assert get("/api/frames")["total"] == 5 and get("/api/manifest")["every"] == 2
        assert "changed on disk: read again (5 frames)" in capfd.readouterr().err
        shutil.rmtree(d)                          # between a render's moves: nothing to read, the last dump shown
        d.mkdir(); (d / ".0123abcd.partial").mkdir()
        manifest = get("/api/manifest")
        assert manifest["every"] == 2 and get("/api/frames")["total"] == 5
        assert manifest["warnings"][-1].startswith("the dump changed on disk and cannot be read now (")
        shutil.rmtree(d)
        write_dump(d, n=3, max_side=32)
        assert get("/api/frames")["total"] == 3 and get("/api/manifest")["warnings"] == []
    finally:
        server.shutdown()
        server.server_close()


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`, hidden ones included."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_an_interrupted_dump_leaves_nothing_and_an_earlier_dump_as_it_was(tmp_path):
    """A failed render's dump stayed, marked incomplete, in the folders made for it; with overwrite it had already
    taken the place of the earlier, complete dump."""
    d = tmp_path / "out" / "d"
    records = synthetic_records(4)
    with pytest.raises(RuntimeError):
        with DebugDumper(d, CLASS_NAMES, max_side=64) as dumper:
            dumper.write(records[:2])
            raise RuntimeError("render failed")
    assert not list(tmp_path.iterdir())
    write_dump(d, n=4, max_side=64)
    before, earlier = tree(tmp_path), tree(d)
    with pytest.raises(RuntimeError):
        with DebugDumper(d, CLASS_NAMES, max_side=64, every=3, overwrite=True) as dumper:
            dumper.write(records[:2])
            dumper.complete()             # complete, not yet in place: a render's video failed to commit
            assert {name: data for name, data in tree(d).items() if ".partial" not in name} == earlier
            raise RuntimeError("render failed")
    assert tree(tmp_path) == before


def test_a_dump_marked_incomplete_loads_with_a_warning(tmp_path):
    d = tmp_path / "d"
    write_dump(d, n=2, max_side=64)
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    dump = load_dump(d)
    assert len(dump.frames) == 2 and "incomplete" in dump.warnings[0]


def test_a_complete_dump_whose_frames_lost_lines_says_so(tmp_path):
    d = tmp_path / "d"
    write_dump(d, n=4, max_side=32)
    lines = (d / "frames.jsonl").read_text().splitlines(keepends=True)
    (d / "frames.jsonl").write_text("".join(lines[:2]))
    dump = load_dump(d)
    assert len(dump.frames) == 2 and dump.warnings == ["manifest.json says 4 frames, frames.jsonl holds 2"]


def test_image_entries_not_named_as_dumped_images_are_dropped(tmp_path):
    """The server serves only images/NNNNNN_layer.ext: a record naming another file (that exists) would show a
    broken picture."""
    d = tmp_path / "d"
    write_dump(d, n=2, max_side=32)
    lines = read_lines(d)
    lines[0]["images"]["original"] = "manifest.json"
    lines[1]["images"]["masks"] = "images/../frames.jsonl"
    (d / "frames.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dump = load_dump(d)
    assert [set(json.loads(f)["images"]) for f in dump.frames] == [{"masks", "stylized", "composite"},
                                                                   {"original", "stylized", "composite"}]
    assert dump.warnings == ["2 image files listed in frames.jsonl are missing from images/"]


def test_a_dump_that_cannot_replace_the_earlier_one_leaves_it(tmp_path, monkeypatch):
    d = tmp_path / "d"
    write_dump(d, n=2, max_side=64)
    before = tree(tmp_path)
    real_rename = os.rename

    def rename(source, target):  # the new dump's manifest, its last entry, cannot be moved in
        if Path(target) == d / "manifest.json" and ".partial" in Path(source).parent.name:
            raise OSError(18, "Invalid cross-device link")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(DebugDumpError, match=f"cannot put the debug dump in place at {d} .*: the earlier dump "
                                             "there is kept"):
        write_dump(d, n=3, max_side=64, overwrite=True)
    assert tree(tmp_path) == before


def test_a_dump_through_a_link_replaces_the_folder_it_points_to(tmp_path):
    real = tmp_path / "real"
    write_dump(real, n=2, max_side=64)
    (tmp_path / "link").symlink_to(real)
    write_dump(tmp_path / "link", n=3, max_side=64, overwrite=True)
    assert (tmp_path / "link").is_symlink() and len(read_lines(real)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_partly_written_dumps_load_what_is_intact_with_warnings(tmp_path):
    d = tmp_path / "d"
    write_dump(d, n=5, every=1, max_side=64)
    (d / "images" / "000001_composite.jpg").unlink()
    text = (d / "frames.jsonl").read_text()
    (d / "frames.jsonl").write_text(text[: len(text) - 40])          # the last line is cut off mid-write
    (d / "manifest.json").unlink()
    dump = load_dump(d)
    assert len(dump.frames) == 4
    assert json.loads(dump.frames[1])["images"].keys() == {"original", "masks", "stylized"}
    joined = " | ".join(dump.warnings)
    assert "manifest.json is missing" in joined and "truncated" in joined and "1 image files" in joined


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("empty", "is empty"), ("foreign", "is not a debug dump"),
    ("other_manifest", "not an instyle debug manifest"), ("file", "is not a folder"),
    # was "is not a debug dump": a render writing its first dump there, or killed before it finished
    ("being_written", "holds no finished debug dump: a render is still writing it, or was killed before it finished"),
])
def test_bad_folders_give_one_clear_error(tmp_path, case, message):
    d = tmp_path / case
    if case == "empty":
        d.mkdir()
    elif case == "being_written":
        d.mkdir(); (d / ".0123abcd.partial").mkdir()
    elif case == "foreign":
        d.mkdir(); (d / "video.mp4").write_bytes(b"\0")
    elif case == "other_manifest":
        d.mkdir(); (d / "manifest.json").write_text('{"format": "something-else"}')
    elif case == "file":
        d.write_text("x")
    with pytest.raises(DebugDumpError, match=message):
        load_dump(d)
    cli = subprocess.run([sys.executable, "-m", "pipeline.viewer", str(d), "--no-browser", "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr.startswith("error: ") and message in cli.stderr and len(cli.stderr.strip().splitlines()) == 1


def test_server_pages_frames_and_blocks_path_traversal(tmp_path):
    d = tmp_path / "d"
    write_dump(d, n=7, every=2, max_side=64)
    (tmp_path / "secret.txt").write_text("secret")
    server = ViewerServer(load_dump(d), port=0)
    server.start_in_thread()
    get = lambda path: urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10)  # noqa: E731
    try:
        page = json.load(get("/api/frames?offset=5&limit=10"))
        assert page["total"] == 7 and [f["index"] for f in page["frames"]] == [5, 6]
        page = json.load(get("/api/frames?offset=-1&limit=3"))       # not a slice from the end
        assert page["offset"] == 0 and [f["index"] for f in page["frames"]] == [0, 1, 2]
        manifest = json.load(get("/api/manifest"))
        assert manifest["complete"] is True and manifest["warnings"] == []
        assert get("/images/000002_masks.jpg").headers["Content-Type"] == "image/jpeg"
        # HEAD (curl -I) was 501 Unsupported method: GET's status and headers, no body
        for path in ("/", "/api/frames?limit=2", "/images/000002_masks.jpg"):
            full, head = get(path), urllib.request.urlopen(urllib.request.Request(server.url.rstrip("/") + path,
                                                                                  method="HEAD"), timeout=10)
            assert head.status == 200 and head.read() == b""
            assert head.headers["Content-Length"] == str(len(full.read())) != "0"
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(urllib.request.Request(server.url + "nothing", method="HEAD"), timeout=10)
        assert missing.value.code == 404
        assert b"viewer.js" in get("/").read() and get("/static/viewer.js").status == 200
        for bad in ("/images/../manifest.json", "/images/..%2fmanifest.json", "/images/%2e%2e/%2e%2e/secret.txt",
                    "/images/000001_masks.jpg", "/static/../debug.py", "/images//etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as err:
                get(bad)
            assert err.value.code == 404, bad
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_viewer_cli_serves_until_interrupted(tmp_path, signum):
    """Serving until stopped, its normal end: one line and exit 0 (a closed terminal's SIGHUP killed it silently)."""
    d = tmp_path / "d"
    write_dump(d, n=2, max_side=64)
    (d / "manifest.json").unlink()                    # a partly written dump: its warnings on stderr
    proc = interruptible_popen([sys.executable, "-m", "pipeline.viewer", str(d), "--no-browser", "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        assert json.load(urllib.request.urlopen(url + "api/frames", timeout=10))["total"] == 2
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped" in out and "Traceback" not in err
    assert err.splitlines() == ["warning: manifest.json is missing: the dump is partly written; showing what "
                                "frames.jsonl holds"]


def test_ctrl_c_while_the_browser_starts_stops_the_viewer_cleanly(tmp_path, monkeypatch, capsys):
    """Once the viewer says Ctrl-C stops it, it does: also while webbrowser.open is still starting a browser."""
    d = tmp_path / "d"
    write_dump(d, n=2, max_side=64)

    def interrupted(url):
        raise KeyboardInterrupt

    monkeypatch.setattr(viewer, "_has_browser", lambda: True)
    monkeypatch.setattr(viewer.webbrowser, "open", interrupted)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        assert viewer.main([str(d), "--port", "0"]) == 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    out = capsys.readouterr().out
    assert "(Ctrl-C stops)" in out and out.splitlines()[-1] == "stopped"


def test_records_with_missing_stage_fields_still_dump(tmp_path):
    """Records before tracking/assign (no track ids, styles, keep, output, masks) still produce a valid dump."""
    record = synthetic_records(1)[0]
    record.track_ids, record.styles, record.keep, record.output, record.stylized = None, [], None, None, []
    record.instances.masks = None
    with DebugDumper(tmp_path / "d", CLASS_NAMES, max_side=64) as dumper:
        dumper.write([record])
    line = read_lines(tmp_path / "d")[0]
    assert {d["track_id"] for d in line["instances"]} == {-1}
    assert all(d["mask"] is None and d["style"] is None and d["keep"] is None for d in line["instances"])
    assert set(line["images"]) == {"original", "masks", "stylized"}
