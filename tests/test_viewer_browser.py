"""The debug viewer in a real headless browser (Debian chromium driven by Playwright; no browser download):
slider, layer toggles, instance highlight, timeline, timing chart, the JS RLE decoder against pycocotools,
and the warning banner / explanation for partly written or empty dumps."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.debug_reader import load_dump
from pipeline.viewer import ViewerServer
from tests.debug_fixture import synthetic_records, write_dump

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# INSTYLE_UPDATE_SCREENSHOT=1 refreshes the README's picture of the viewer.
DOCS_SCREENSHOT = ROOT / "docs" / "img" / "viewer.png"


def ensure_chromium() -> None:
    if not CHROMIUM.exists():
        result = subprocess.run(["bash", str(ROOT / "scripts" / "install_browser.sh")], capture_output=True, text=True)
        print(result.stdout, result.stderr)
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing and scripts/install_browser.sh could not install it (needs root and apt-get)")


@pytest.fixture(scope="module")
def browser():
    ensure_chromium()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("viewer") / "clip_debug"
    write_dump(directory, n=12, every=2, max_side=480, size=(270, 480))
    return directory


def serve(directory: Path) -> ViewerServer:
    server = ViewerServer(load_dump(directory), port=0)
    server.start_in_thread()
    return server


@pytest.fixture
def open_page(browser):
    servers, pages = [], []

    def open_(directory: Path):
        server = serve(directory)
        servers.append(server)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url)
        pages.append((page, errors))
        return page, errors

    yield open_
    for page, errors in pages:
        page.close()
        assert errors == [], f"JavaScript errors: {errors}"
    for server in servers:
        server.shutdown()
        server.server_close()


def frames_of(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "frames.jsonl").read_text().splitlines()]


def seek(page, pos: int) -> None:
    page.locator("#slider").fill(str(pos))


def table_rows(page) -> list[list[str]]:
    return page.locator("#instances tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))")


def test_slider_table_layers_highlight_timeline_and_timings(open_page, dump_dir, tmp_path):
    frames = frames_of(dump_dir)
    page, _ = open_page(dump_dir)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    assert page.locator("#banner").is_hidden()

    # Slider → frame index and instance table agree with frames.jsonl.
    for pos in (4, 7, 0, 6):
        seek(page, pos)
        frame = frames[pos]
        assert page.locator("#frame-index").text_content() == str(frame["index"])
        label = page.locator("#frame-time").text_content()
        assert ("not segmented" in label) == ("crops carried over" in label) == frame["propagated"] == (pos % 2 == 1)
        assert ("new shot" in label) == frame["cut"] == (pos == 6)
        rows = table_rows(page)
        assert len(rows) == len(frame["instances"])
        carried = {region["instance"] for region in frame["regions"] if region["carried"]}
        assert carried == ({0} if frame["propagated"] else set())
        for i, (row, inst) in enumerate(zip(rows, frame["instances"])):
            assert row[0] == (f"#{inst['track_id']}" if inst["track_id"] >= 0 else "–")
            assert row[1] == inst["class"] and row[2] == f"{inst['score']:.3f}"
            assert row[3] == (inst["style"] or "(original)") + (" (carried)" if i in carried else "")
            assert row[5] == str(inst["area"])
    seek(page, 4)
    original = page.locator('.panel[data-layer="original"] img')
    page.wait_for_function("() => document.querySelector('.panel[data-layer=original] img').naturalWidth > 0")
    assert original.evaluate("img => img.naturalWidth") == frames[4]["dump_size"][1]

    # Layer toggle hides and shows its panel.
    stylized = page.locator('.panel[data-layer="stylized"]')
    assert stylized.is_visible()
    page.locator("#toggle-stylized").click()
    assert stylized.is_hidden() and page.locator('.panel[data-layer="original"]').is_visible()
    page.locator("#toggle-stylized").click()
    assert stylized.is_visible()

    # Click the dog's row: it is highlighted, and every panel outlines track 1.
    row = page.locator('#instances tbody tr[data-track="1"]')
    row.click()
    assert "selected" in row.get_attribute("class")
    assert page.locator("#instances tbody tr.selected").count() == 1
    assert page.locator("#selection").get_attribute("data-track") == "1"
    tracks_drawn = page.locator("canvas.highlight").evaluate_all("cs => cs.map(c => c.dataset.track)")
    assert tracks_drawn == ["1"] * 4
    lit = page.locator('.panel[data-layer="original"] canvas').evaluate(
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] === 255) n++; return n; }")
    assert lit > 0
    # The selection follows the track to another frame where it exists.
    seek(page, 3)
    assert page.locator("#instances tbody tr.selected").get_attribute("data-track") == "1"
    seek(page, 4)

    # Timeline: one row per track, frames axis covers the dump; timing chart: one area per stage.
    tracks = {i["track_id"] for f in frames for i in f["instances"] if i["track_id"] >= 0}
    timeline = page.locator("#timeline")
    assert timeline.get_attribute("data-tracks") == str(len(tracks))
    assert timeline.locator("g.track").count() == len(tracks)
    assert sorted(int(t) for t in timeline.locator("g.track").evaluate_all("gs => gs.map(g => g.dataset.track)")) \
        == sorted(tracks)
    assert timeline.get_attribute("data-frames") == str(len(frames))
    # a dashed line where a new shot starts (the fixture's frame 6), at that frame's place on the axis
    cuts = timeline.locator("line.cut")
    assert cuts.evaluate_all("ls => ls.map(l => Number(l.dataset.frame))") == [f["index"] for f in frames if f["cut"]]
    seek(page, 6)  # the frame marker sits mid-frame, the cut line at the frame's start: half a frame apart
    step = (float(timeline.get_attribute("width")) - float(timeline.get_attribute("data-left")) - 8) / len(frames)
    marker_x = float(page.locator("#timeline-marker").get_attribute("x1"))
    assert float(cuts.first.get_attribute("x1")) == pytest.approx(marker_x - step / 2)
    stages = {s for f in frames for s in f["timings"]}
    timing = page.locator("#timing")
    assert timing.get_attribute("data-frames") == str(len(frames))
    assert timing.locator("path.stage").count() == len(stages)
    assert set(timing.locator("path.stage").evaluate_all("ps => ps.map(p => p.dataset.stage)")) == stages
    assert page.locator("#timing-current tbody tr").count() == len(stages) + 1   # + total

    # A frame without images says so instead of showing a stale picture.
    seek(page, 5)
    assert page.locator('.panel[data-layer="original"] .noimage').is_visible()
    assert "no images for frame 5" in page.locator('.panel[data-layer="original"] .noimage').text_content()
    seek(page, 4)

    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
    if os.environ.get("INSTYLE_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS_SCREENSHOT), full_page=True)
    assert (tmp_path / "viewer.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def long_dump(tmp_path_factory) -> Path:
    """520 frames (more than the page's first request of 500) at half size, from a 29.97 fps video; the dog is
    untracked on frame 3, a gap in its track. Frames 8 on are frame 7's record again, without images."""
    directory = tmp_path_factory.mktemp("viewer_long") / "long_debug"
    records = synthetic_records(8, 270, 480)
    records[3].track_ids[1] = -1
    write_dump(directory, records=records, every=1, max_side=240, video_info={"average_rate": "30000/1001"})
    lines = (directory / "frames.jsonl").read_text().splitlines()
    lines += [json.dumps({**json.loads(lines[7]), "index": i, "images": {}}) for i in range(8, 520)]
    (directory / "frames.jsonl").write_text("\n".join(lines) + "\n")
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**manifest, "frame_count": 520}))
    return directory


def test_a_long_half_size_dump_with_the_videos_rate_and_a_gap_in_a_track(open_page, long_dump):
    frames = frames_of(long_dump)
    manifest = json.loads((long_dump / "manifest.json").read_text())
    page, _ = open_page(long_dump)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    assert page.locator("#banner").is_hidden()
    assert page.locator("#slider").get_attribute("max") == "519"        # all of them, not the first 500
    seek(page, 519)
    assert page.locator("#frame-index").text_content() == "519"
    assert "video (29.97)" in page.locator("#fps option").all_text_contents()
    assert float(page.locator("#fps").input_value()) == pytest.approx(30000 / 1001, abs=1e-3)

    # each track's colour is the manifest's, track 0 included
    rgb = lambda c: f"rgb({c[0]},{c[1]},{c[2]})"  # noqa: E731
    swatches = page.locator("#timeline g.track > rect:not(.row-bg):not(.segment)").evaluate_all(
        "rs => rs.map(r => [r.parentNode.dataset.track, r.getAttribute('fill')])")
    assert swatches == [["0", rgb(manifest["palette"][0])], ["1", rgb(manifest["palette"][1])]]
    seek(page, 0)
    assert page.locator("#instances tbody tr .swatch").evaluate_all("ss => ss.map(s => s.getAttribute('style'))") == [
        "background:" + rgb(manifest["palette"][0]), "background:" + rgb(manifest["untracked_color"])]
    # the dog's gap on frame 3 splits its mosaic run, though the style is the same on both sides
    assert page.locator('#timeline g.track[data-track="1"] rect.segment title').all_text_contents() == [
        "track 1: frames 2–2, style mosaic", "track 1: frames 4–4, style mosaic",
        "track 1: frames 5–519, style (original)"]

    # the timing chart's stage areas stack: each one's top is the sum of the stages up to it, the last the total
    stages = list(dict.fromkeys(s for f in frames for s in f["timings"]))
    totals = [1000 * sum(f["timings"].values()) for f in frames]
    y = lambda ms: 8 + (1 - ms / max(totals)) * (180 - 8 - 22)  # noqa: E731  (the chart's height and margins)
    paths = dict(page.locator("#timing path.stage").evaluate_all(
        "ps => ps.map(p => [p.dataset.stage, p.getAttribute('d')])"))
    for k, stage in enumerate(stages):
        tops = [float(v) for v in re.findall(r"[ML][-\d.]+,([-\d.]+)", paths[stage])[0:2 * len(frames):2]]
        expected = [y(1000 * sum(f["timings"][s] for s in stages[:k + 1])) for f in frames]
        assert tops == pytest.approx(expected, abs=0.06), stage

    # the highlight at half size: the box scaled onto the image, the mask the frame's own
    seek(page, 4)
    page.locator('#instances tbody tr[data-track="0"]').click()
    h, w = frames[4]["dump_size"]
    alpha = lambda: np.array(page.locator('.panel[data-layer="original"] canvas').evaluate(  # noqa: E731
        "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 3))"),
        np.uint8).reshape(h, w)
    columns = np.flatnonzero(alpha().any(axis=0))
    box = frames[4]["instances"][0]["box"]
    scale = w / frames[4]["size"][1]
    assert frames[4]["scale"] == 0.5 and abs(columns.max() - box[2] * scale) <= 1.5, (columns.max(), box)
    assert abs(columns.min() - box[0] * scale) <= 1.5, (columns.min(), box)
    seek(page, 3)
    own = frames[3]["instances"][0]["mask"]
    mask = mask_utils.decode({"size": own["size"], "counts": own["counts"].encode()}).astype(bool)
    lit = alpha() > 0
    assert mask.sum() > 100 and lit[mask].all()          # frame 3's mask, not frame 4's shifted by 7.5 px

    # an untracked object is selected on its own frame only
    seek(page, 0)
    page.locator('#instances tbody tr[data-track="-1"]').click()
    assert page.locator("#instances tbody tr.selected").count() == 1
    seek(page, 2)
    assert page.locator("#instances tbody tr.selected").count() == 0
    assert page.locator("#selection").text_content() == ""


def test_play_advances_and_timeline_click_seeks(open_page, dump_dir):
    page, _ = open_page(dump_dir)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    page.locator("#play").click()
    page.wait_for_function("() => document.body.dataset.frame !== '0'", timeout=5000)
    page.locator("#play").click()
    box = page.locator("#timeline").bounding_box()
    page.mouse.click(box["x"] + box["width"] - 12, box["y"] + 8)     # near the right end: the last frame
    assert page.locator("#frame-index").text_content() == "11"


def test_js_rle_decoder_matches_pycocotools(open_page, dump_dir):
    page, _ = open_page(dump_dir)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    rles = [i["mask"] for f in frames_of(dump_dir) for i in f["instances"]]
    # Also a large, irregular mask: long runs and negative deltas exercise every branch of the string format.
    rng = np.random.default_rng(0)
    blob = np.zeros((300, 500), np.uint8)
    blob[20:280, 30:470] = 1
    blob[rng.random(blob.shape) < 0.05] ^= 1
    encoded = mask_utils.encode(np.asfortranarray(blob))
    rles.append({"size": encoded["size"], "counts": encoded["counts"].decode()})
    decoded = page.evaluate("rles => rles.map(r => window.viewer.decodeRle(r).join(''))", rles)
    for rle, flat in zip(rles, decoded):
        h, w = rle["size"]
        expected = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal((np.frombuffer(flat.encode(), np.uint8) - ord("0")).reshape(h, w), expected)


def test_partly_written_dump_shows_a_banner_and_what_is_intact(open_page, dump_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(dump_dir, partial)
    text = (partial / "frames.jsonl").read_text()
    (partial / "frames.jsonl").write_text(text[: len(text) - 30])
    manifest = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (partial / "images" / "000002_masks.jpg").unlink()
    page, _ = open_page(partial)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    banner = page.locator("#banner")
    assert banner.is_visible()
    assert "incomplete" in banner.text_content() and "truncated" in banner.text_content()
    assert "image files" in banner.text_content()
    assert page.locator("#slider").get_attribute("max") == str(len(text.splitlines()) - 2)
    seek(page, 2)
    assert page.locator('.panel[data-layer="masks"] .noimage').is_visible()
    assert page.locator('.panel[data-layer="original"] .noimage').is_hidden()


def test_dump_without_frames_says_why(open_page, tmp_path):
    empty = tmp_path / "empty_debug"
    write_dump(empty, n=0)
    page, _ = open_page(empty)
    page.wait_for_function("() => document.querySelector('#message').textContent.includes('no frames')",
                           timeout=15000)
    assert page.locator("#message").is_visible() and page.locator("#main").is_hidden()


def test_a_real_tiny_render_dump_opens_in_the_viewer(open_page, tmp_path):
    """End to end: `python -m pipeline.render ... debug.dump=true` on a tiny clip with tiny random models."""
    from tests.helpers_video import pattern_frames, write_clip
    from tests.render_cli import run_render, tiny_model_overrides

    clip = write_clip(tmp_path / "clip.mp4", pattern_frames(6, 96, 64))
    result = run_render([f"input={clip}", f"output={tmp_path / 'out.mp4'}", *tiny_model_overrides(tmp_path / "models"),
                         "debug.dump=true", "debug.every=2", "debug.max_side=64"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    dump = tmp_path / "out_debug"                       # default: <output stem>_debug beside the output
    manifest = json.loads((dump / "manifest.json").read_text())
    frames = frames_of(dump)
    assert manifest["complete"] is True and manifest["frame_count"] == len(frames) == 6
    assert [f["index"] for f in frames] == list(range(6))
    assert [bool(f["images"]) for f in frames] == [True, False] * 3
    assert all(f["dump_size"] == [43, 64] for f in frames)
    stages = {s for f in frames for s in f["timings"]}
    assert {"segment", "track", "assign", "stylize", "composite"} <= stages

    page, _ = open_page(dump)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    assert page.locator("#banner").is_hidden()
    assert page.locator("#slider").get_attribute("max") == "5"
    seek(page, 2)
    assert page.locator("#frame-index").text_content() == "2"
    assert len(table_rows(page)) == len(frames[2]["instances"])
    assert page.locator("#timing path.stage").count() == len(stages)
    page.wait_for_function("() => document.querySelector('.panel[data-layer=composite] img').naturalWidth === 64")
    page.screenshot(path=str(tmp_path / "viewer_real_render.png"), full_page=True)


@pytest.fixture(scope="module")
def every3_dump(tmp_path_factory) -> Path:
    """24 frames, images on every 3rd (0, 3, ..., 21): the last two frames have none, so wrapping must skip them."""
    directory = tmp_path_factory.mktemp("viewer_every3") / "every3_debug"
    write_dump(directory, n=24, every=3, max_side=120, size=(45, 120))   # wide enough for the disc's 24-frame walk
    return directory


def test_images_only_stepping_lands_only_on_frames_with_images(open_page, every3_dump):
    with_images = [f["index"] for f in frames_of(every3_dump) if f["images"]]
    assert with_images == list(range(0, 24, 3))
    page, _ = open_page(every3_dump)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    page.locator("#images-only").check()
    frame = lambda: int(page.locator("#frame-index").text_content())  # noqa: E731

    # A full lap each way through the buttons: every stop has images, and it wraps to the first / last such frame.
    def lap(button: str) -> list[int]:
        stops = []
        for _ in with_images:
            page.locator(button).click()
            stops.append(frame())
        return stops

    assert lap("#next") == with_images[1:] + [0]
    assert lap("#prev") == with_images[::-1]
    # From frames without images (scrubbed there with the slider), in either direction.
    for start, button, expected in ((22, "#next", 0), (22, "#prev", 21), (23, "#next", 0), (1, "#prev", 0),
                                    (1, "#next", 3), (0, "#prev", 21), (21, "#next", 0)):
        seek(page, start)
        page.locator(button).click()
        assert frame() == expected, (start, button)
    # The arrow keys step the same way.
    seek(page, 22)
    page.locator("#slider").press("ArrowRight")
    assert frame() == 0
    page.locator("#slider").press("ArrowLeft")
    assert frame() == 21


def test_arrow_keys_step_while_a_checkbox_has_focus(open_page, every3_dump):
    page, _ = open_page(every3_dump)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    frame = lambda: int(page.locator("#frame-index").text_content())  # noqa: E731
    page.locator("#images-only").click()          # a click leaves the focus on the checkbox
    assert page.evaluate("document.activeElement.id") == "images-only"
    page.keyboard.press("ArrowRight")
    assert frame() == 3
    page.keyboard.press("ArrowLeft")
    assert frame() == 0
    page.locator("#toggle-stylized").click()      # a layer toggle too, and the options stay as they were
    page.keyboard.press("ArrowLeft")
    assert frame() == 21
    assert page.locator("#images-only").is_checked() and not page.locator("#toggle-stylized").is_checked()
    page.keyboard.press(" ")                      # Space still toggles the focused checkbox, and does not play
    assert page.locator("#toggle-stylized").is_checked() and page.locator("#play").text_content() == "▶ play"
    # A field one types in keeps its arrow keys.
    page.evaluate("() => { const i = document.createElement('input'); i.type = 'number'; i.id = 'typing';"
                  " document.body.appendChild(i); i.focus(); }")
    page.keyboard.press("ArrowRight")
    assert frame() == 21


def test_instances_the_background_style_painted_say_so(open_page, tmp_path):
    """Under style.background=style_12 the instances assign did not keep were labelled "(original)", though the
    background painted them; only the kept ones left original keep their pixels."""
    d = tmp_path / "bg_debug"
    write_dump(d, n=8, every=1, max_side=160, background=True, background_style="style_12")
    frames = frames_of(d)
    page, _ = open_page(d)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    seek(page, 6)                # the person styled, the dog kept but left original, the car not kept
    styles = {(row[0], row[1]): row[3] for row in table_rows(page)}
    assert styles == {("#0", "person"): "candy", ("#1", "dog"): "(original)", ("–", "car"): "(background: style_12)"}
    assert [(i["keep"], i["style"]) for i in frames[6]["instances"]] == [(True, "candy"), (True, None), (False, None)]
    legend = page.locator("#style-legend").inner_text()
    assert "(left original)" in legend and "candy" in legend and "mosaic" in legend
    # the timeline rows are tracks: none of them was painted by the background here
    assert "(background" not in legend
    tips = page.locator("#timeline rect.segment title").evaluate_all("ts => ts.map(t => t.textContent)")
    assert any(tip.startswith("track 1:") and tip.endswith("style (original)") for tip in tips)


def test_a_tracked_object_the_background_painted_is_so_on_the_timeline(open_page, tmp_path):
    records = synthetic_records(6, background=True)
    for record in records[3:]:            # the person drops below min_score: assign no longer keeps it
        record.keep[0], record.styles[0] = False, None
        record.stylized = [r for r in record.stylized if r.instance != 0]
    d = tmp_path / "bg_debug"
    write_dump(d, records=records, max_side=160, background_style="style_12")
    page, _ = open_page(d)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    person = page.locator('#timeline g.track[data-track="0"] rect.segment')
    assert person.evaluate_all("rs => rs.map(r => r.dataset.style)") == ["candy", "(background: style_12)"]
    assert "(background: style_12)" in page.locator("#style-legend").inner_text()
    seek(page, 4)
    assert table_rows(page)[0][3] == "(background: style_12)"


def test_a_reload_after_a_new_render_shows_its_images(open_page, tmp_path):
    """Images were served with max-age=3600 and no validator: a render into the same folder, then a reload,
    showed the old render's pictures beside the new records."""
    d = tmp_path / "clip_debug"
    write_dump(d, n=2, every=1, max_side=160)
    page, _ = open_page(d)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    pixel = ("async () => { const img = document.querySelector('.panel[data-layer=composite] img'); await img.decode();"
             " const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;"
             " const x = c.getContext('2d'); x.drawImage(img, 0, 0); return [...x.getImageData(5, 5, 1, 1).data]; }")
    before = page.evaluate(pixel)
    # the new render's composite: one flat colour, the same name
    Image.new("RGB", (160, 90), (250, 10, 10)).save(d / "images" / "000000_composite.jpg", quality=95)
    page.reload()
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    after = page.evaluate(pixel)
    assert before != after and abs(after[0] - 250) < 12 and after[1] < 20 and after[2] < 20, (before, after)


def test_corrupt_records_are_skipped_and_the_page_still_opens(open_page, tmp_path):
    """Bare NaN in one line made JSON.parse reject every frame (a blank page); {"index": 1000} threw
    `f.instances is not iterable`; "images" as a list broke the reader."""
    d = tmp_path / "corrupt_debug"
    records = synthetic_records(4)
    records[3].instances.scores[0] = float("nan")          # written as null: shown as "–", nothing thrown
    records[3].instances.boxes[0, 0] = float("inf")
    write_dump(d, records=records, every=1, max_side=160)
    good = frames_of(d)
    lines = (d / "frames.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"score":0.9,', '"score":NaN,')
    lines.insert(2, json.dumps({"index": 1000}))
    lines.insert(3, json.dumps({**good[2], "images": ["images/000002_original.jpg"]}))
    lines.insert(4, json.dumps({**good[2], "regions": [None]}))      # fields the page reads, of the wrong shape
    lines.insert(5, json.dumps({**good[2], "time": "0.08s"}))
    (d / "frames.jsonl").write_text("\n".join(lines) + "\n")
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "palette": []}))
    page, errors = open_page(d)
    page.wait_for_selector("#main:not([hidden])", timeout=15000)
    assert "5 unreadable or malformed lines skipped" in page.locator("#banner").text_content()
    assert "palette unreadable, the defaults used" in page.locator("#banner").text_content()
    assert page.locator("#slider").get_attribute("max") == "2"
    for pos, index in enumerate((0, 2, 3)):
        seek(page, pos)
        assert page.locator("#frame-index").text_content() == str(index)
    row = table_rows(page)[0]
    assert row[2] == "–" and row[4].startswith("–, ")
    page.locator('#instances tbody tr[data-track="0"]').click()     # the highlight skips the box it cannot place
    assert page.locator("#selection").get_attribute("data-track") == "0"
    assert errors == []
