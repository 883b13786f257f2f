"""DebugDumper on hand-built FrameRecords: masks round-trip through pycocotools, images follow `every`,
the folder is marked complete only at close, and the reader / viewer CLI reject or flag bad folders."""
from __future__ import annotations

import json
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
from common.errors import UserError
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


def test_png_layers_hold_the_frame_its_composite_and_the_stylized_crops(tmp_path):
    d = tmp_path / "d"
    records = write_dump(d, n=3, every=1, max_side=640, image_format="png")
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
    assert covered.any() and (stylized[:, ~covered] == 0).all()      # no background style: black elsewhere
    masks_layer = load("masks")
    person = (record.instances.masks[0] >= 0.5).numpy()
    assert (masks_layer[:, person] != load("original")[:, person]).any()   # masks tinted over the original


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


def test_a_rerun_replaces_the_earlier_dump(tmp_path):
    d = tmp_path / "d"
    write_dump(d, n=6, every=1, max_side=64)
    (d / "notes.txt").write_text("mine")
    write_dump(d, n=6, every=5, max_side=64)
    assert {p.name[:6] for p in (d / "images").iterdir()} == {"000000", "000005"}
    assert len(read_lines(d)) == 6 and (d / "notes.txt").read_text() == "mine"


def test_an_interrupted_dump_stays_marked_incomplete(tmp_path):
    d = tmp_path / "d"
    records = synthetic_records(4)
    with pytest.raises(RuntimeError):
        with DebugDumper(d, CLASS_NAMES, max_side=64) as dumper:
            dumper.write(records[:2])
            raise RuntimeError("render failed")
    assert json.loads((d / "manifest.json").read_text())["complete"] is False
    dump = load_dump(d)
    assert len(dump.frames) == 2 and "incomplete" in dump.warnings[0]
    assert not list((d / "images").glob("*.tmp*"))


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
])
def test_bad_folders_give_one_clear_error(tmp_path, case, message):
    d = tmp_path / case
    if case == "empty":
        d.mkdir()
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
        manifest = json.load(get("/api/manifest"))
        assert manifest["complete"] is True and manifest["warnings"] == []
        assert get("/images/000002_masks.jpg").headers["Content-Type"] == "image/jpeg"
        assert b"viewer.js" in get("/").read() and get("/static/viewer.js").status == 200
        for bad in ("/images/../manifest.json", "/images/..%2fmanifest.json", "/images/%2e%2e/%2e%2e/secret.txt",
                    "/images/000001_masks.jpg", "/static/../debug.py", "/images//etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as err:
                get(bad)
            assert err.value.code == 404, bad
    finally:
        server.shutdown()
        server.server_close()


def test_viewer_cli_serves_until_interrupted(tmp_path):
    d = tmp_path / "d"
    write_dump(d, n=2, max_side=64)
    proc = interruptible_popen([sys.executable, "-m", "pipeline.viewer", str(d), "--no-browser", "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        assert json.load(urllib.request.urlopen(url + "api/frames", timeout=10))["total"] == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped" in out and "Traceback" not in err


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
