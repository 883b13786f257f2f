"""Per-frame debug dump: what every stage decided for every frame, in a folder the viewer can open.

Layout of a dump folder (`python -m pipeline.viewer DIR` shows it):

    DIR/manifest.json   format, video info, class names, layers, palette, frame count, `complete`, the
                        composite's mask_threshold / feather_px / smooth_masks, area_threshold, background_style
    DIR/frames.jsonl    one JSON object per frame, appended as frames arrive (memory stays flat)
    DIR/images/{index:06d}_{layer}.{jpg|png}   every `every`-th frame only

One frame record (every frame, whatever `every` is):
    index, pts, time (seconds), size [H, W] of the decoded frame,
    dump_size [h, w] of the dumped images and masks, scale = h / H (images and masks are downscaled
    so the longer side is <= max_side; boxes stay in original pixels: to draw one, multiply x by
    w / W and y by h / H, which equal `scale` up to the rounding of dump_size),
    instances: [{track_id (-1 untracked), label, class, score, box xyxy (original px), area (mask
    pixels at p >= 0.5 at original size: what style.min_area and the tracker count, whatever
    composite.mask_threshold is), style (null: not styled), keep, mask}], where mask is COCO RLE
    ({"size": [h, w], "counts": str}, pycocotools.mask.encode) of the mask binarized at the composite's
    mask_threshold (the manifest's `mask_threshold`: the mask the composite blended through, before its
    feather and smoothing) and downscaled to dump_size by majority vote (area-average of the binary mask >= 0.5),
    propagated: whether the segmenter skipped the frame (`segment_every`), its instances moved by the tracker,
    cut: whether a new shot starts there (`scene_cut`: the tracker ended every track, the objects get new ids),
    regions: [{instance, style, box, carried}] the stylized crops (carried: the last segmented frame's, moved:
    `style.propagate`), background: whether a background style ran, background_style: its spec (null: none ran;
    it paints every pixel no region covers, so the objects assign did not keep as well),
    timings: {stage: seconds} as the stages recorded them (stages up to composite),
    images: {layer: path relative to DIR} for frames with images, else {}.

Layers: `original`; `masks` (masks coloured by track, with "#id class" labels on their boxes);
`stylized` (the stylized-only layer: the background style's frame if one ran, black otherwise, with
every stylized crop pasted whole over its box in the composite's depth order, so margins the compositor
feathers away stay visible);
`composite` (the frame the encoder gets).

Numbers that are not finite (a NaN score, an infinite timing) are written as null: the browser's JSON.parse
rejects bare NaN, which would blank the whole page.

Safety: the dump is written into a hidden temp folder inside DIR (`.{hex}.partial`, its manifest saying
complete=false until `complete()`), and `publish()` renames its entries into DIR, the manifest last, so DIR only ever
shows a complete dump: a render puts it in place right after its video, and a stopped or failed render removes it
with the folders made for it, leaving an earlier dump as it was. Inside DIR, not beside it: DIR itself (a folder the
user made, its permissions and group, the current folder) is never replaced, and only DIR needs to be writable. An
earlier dump is replaced only with `overwrite` (the render's), and a folder holding anything a dump does not write
never. Each hidden folder (`.{hex}.partial`, and `.{hex}.replaced` holding an earlier dump while it is replaced) is
flock-ed by its render for its whole life: the next dump into DIR removes those of killed renders, never a live one's.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
import secrets
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from common.leftovers import new_held, note_removed_leftovers, remove_dead
from common.outputs import AtomicOutput, make_folders, remove_made_folders, temp_target
from common.settings import number, whole
from pipeline.composite import depth_order
from pipeline.debug_format import (AREA_THRESHOLD, FORMAT, FRAMES, HIDDEN_DIR, IMAGE_NAME, IMAGES, LAYERS,
                                   MANIFEST, MASK_THRESHOLD, PALETTE, UNTRACKED, DebugDumpError,
                                   track_color)
from pipeline.record import FrameRecord
from segment.roi_masks import RoIMasks

PIL_FORMATS = {"jpg": "JPEG", "png": "PNG"}
PASTE_CHUNK = 16  # RoIMasks pasted at a time for the dump
LABEL_FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/TTF/DejaVuSans-Bold.ttf",
               "/Library/Fonts/Arial Bold.ttf", "C:/Windows/Fonts/arialbd.ttf")


def dump_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(h, w) with the longer side <= max_side, aspect kept, never upscaled."""
    h, w = size
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def downscale_masks(masks: torch.Tensor | RoIMasks, size: tuple[int, int],
                    threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """(N, H, W) probabilities or bool, or RoIMasks → (N, h, w) bool: binarize at `threshold` (p >= threshold, as
    the composite does), then majority vote per output pixel. RoIMasks are pasted a few at a time: a hundred
    full-frame masks at once would be most of a GB at 1080p."""
    if isinstance(masks, RoIMasks):
        return torch.cat([torch.zeros((0, *size), dtype=torch.bool, device=masks.device),
                          *(downscale_masks(masks[i:i + PASTE_CHUNK].paste(), size, threshold)
                            for i in range(0, len(masks), PASTE_CHUNK))])
    binary = masks >= threshold if masks.dtype != torch.bool else masks
    if binary.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=binary.device)
    if tuple(binary.shape[-2:]) == tuple(size):
        return binary
    return F.interpolate(binary[:, None].float(), size=size, mode="area")[:, 0] >= 0.5


def encode_rle(masks: np.ndarray) -> list[dict]:
    """(N, h, w) bool → COCO RLEs with str counts (what pycocotools.mask.decode takes back)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _axis_scales(size: tuple[int, int], small: tuple[int, int]) -> tuple[float, float]:
    """(sx, sy): dump pixels per original pixel along x and y (equal up to rounding of the dump size)."""
    return small[1] / size[1], small[0] / size[0]


def _depth_order(record: FrameRecord) -> list:
    """The record's stylized regions in the order the composite blends them (bottom first), from the composite's
    own ordering: overlapping crops must stack as they do in the video."""
    if not record.stylized:
        return []
    return depth_order(record.stylized, record.instances.scores.float().tolist())


def _stylized_layer(record: FrameRecord, size: tuple[int, int]) -> torch.Tensor:
    """Background style (or black) with every stylized crop pasted whole over its box, at dump size."""
    h, w = size
    sx, sy = _axis_scales(record.size, size)
    if record.background is not None:
        canvas = _resize_image(record.background.float(), size).clamp(0, 1)
    else:
        canvas = torch.zeros((3, h, w), dtype=torch.float32, device=record.image.device)
    for region in _depth_order(record):
        x1, y1, x2, y2 = region.box
        bx1, by1 = max(0, round(x1 * sx)), max(0, round(y1 * sy))
        bx2, by2 = min(w, max(bx1 + 1, round(x2 * sx))), min(h, max(by1 + 1, round(y2 * sy)))
        if bx2 <= bx1 or by2 <= by1:
            continue
        crop = F.interpolate(region.pixels[None].float().to(canvas.device), size=(by2 - by1, bx2 - bx1),
                             mode="bilinear", antialias=True, align_corners=False)[0]
        canvas[:, by1:by2, bx1:bx2] = crop.clamp(0, 1)
    return _to_uint8(canvas)


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Fraction):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (Path, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return repr(value)


def _finite(value: Any) -> Any:
    """`value` (JSON-ready) with every NaN and ±Infinity as None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any, **options) -> str:
    """Strict JSON (what the browser's JSON.parse reads): not-finite numbers become null."""
    return json.dumps(_finite(value), allow_nan=False, **options)


def _dump_entries(directory: Path) -> tuple[list[str], list[str]]:
    """(ours, foreign): the folder's entries a dump writes (manifest, frames, images and their temp files), and
    the rest, as paths relative to the folder. A manifest.json of another format, or a frames.jsonl without our
    manifest that does not start as our frame records do, is foreign."""
    ours, foreign = [], []
    manifest_ours = False
    manifest = directory / MANIFEST
    if manifest.is_file() and not manifest.is_symlink():
        try:
            manifest_ours = json.loads(manifest.read_bytes()).get("format") == FORMAT
        except (ValueError, AttributeError, OSError):
            manifest_ours = False
    for entry in sorted(directory.iterdir()):
        name, plain = entry.name, entry.is_file() and not entry.is_symlink()
        if name == MANIFEST and plain:
            (ours if manifest_ours else foreign).append(name)
        elif name == FRAMES and plain:
            (ours if manifest_ours or _looks_like_frames(entry) else foreign).append(name)
        elif _temp_of(name) == MANIFEST and plain:
            ours.append(name)
        elif HIDDEN_DIR.match(name) and entry.is_dir() and not entry.is_symlink():
            continue  # a dump being written (this render's, another's) or a killed render's: no earlier dump
        elif name == IMAGES and entry.is_dir() and not entry.is_symlink():
            for image in sorted(entry.iterdir()):
                plain_image = image.is_file() and not image.is_symlink()
                mine = plain_image and (IMAGE_NAME.match(image.name) or IMAGE_NAME.match(_temp_of(image.name)))
                (ours if mine else foreign).append(f"{IMAGES}/{image.name}")
        else:
            foreign.append(name + ("/" if entry.is_dir() else ""))
    return ours, foreign


def _temp_of(name: str) -> str:
    """The name of the file an AtomicOutput temp file `name` (a killed render's leftover) was written for; "" where
    it is none."""
    target = temp_target(name)
    return "" if target is None else target.name


def _looks_like_frames(path: Path) -> bool:
    """frames.jsonl as the writer starts it: empty, or a compact record whose first key is the index (a killed
    render can leave the first line cut short, so it is not parsed)."""
    with open(path, "rb") as f:
        head = f.read(16)
    return head == b"" or head.startswith(b'{"index":')


def check_dump_dir(directory: Path, overwrite: bool) -> None:
    """Refuses, before anything is written, a dump folder that is a file, one holding what a dump does not write
    (always: someone else's files), and one holding an earlier dump without `overwrite` (the render's)."""
    if directory.exists() and not directory.is_dir():
        raise DebugDumpError(f"debug dir {directory} exists and is not a folder")
    if not directory.is_dir():
        return
    try:
        ours, foreign = _dump_entries(directory)
    except OSError as e:
        raise DebugDumpError(f"cannot read debug dir {directory}: {e.strerror or e}") from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DebugDumpError(f"debug dir {directory} holds files that are not a debug dump's ({shown}): "
                             "give the dump a folder of its own (debug.dir=PATH)")
    if ours and not overwrite:
        raise DebugDumpError(f"debug dir {directory} already holds a debug dump: pass overwrite=true to "
                             "replace it, or choose another debug.dir")



def _new_hidden_dir(directory: Path, kind: str) -> tuple[Path, int]:
    """A new folder `.{random hex}.{kind}` in `directory`, with the umask's permissions, and its held descriptor
    (`common.leftovers.new_held`: close it once the folder is gone)."""
    return new_held(lambda: directory / f".{secrets.token_hex(4)}.{kind}", _made_folder_descriptor)


def _made_folder_descriptor(folder: Path) -> int:
    folder.mkdir()
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        with contextlib.suppress(OSError):  # removed meanwhile by another run's clean-up: new_held makes another
            folder.rmdir()
        raise


def _release(descriptor: int | None) -> None:
    if descriptor is not None:
        os.close(descriptor)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    # the dump's own new temp folder holds no one's leftovers: no listing of it per image
    with AtomicOutput(path, overwrite=True, clean_leftovers=False) as temp:
        temp.write_bytes(data)


class DebugDumper:
    """Writes the dump for a stream of frame batches: `write` after composite, `close` at the end (a render:
    `complete`, then `publish` once its video is in place), `abort` when the render fails."""

    def __init__(self, directory: str | Path, class_names: list[str], every: int = 1, max_side: int = 640,
                 image_format: str = "jpg", jpeg_quality: int = 90, workers: int = 2, video_info: Any = None,
                 overwrite: bool = False, mask_threshold: float = MASK_THRESHOLD, feather_px: int | None = None,
                 smooth_masks: float | None = None, background_style: str | None = None):
        """`overwrite`: replace an earlier dump in `directory` (the render's own overwrite); `mask_threshold`,
        `feather_px`, `smooth_masks`: the composite's settings (the masks are binarized at its threshold, the
        others are recorded); `background_style`: the background style spec, None when there is none."""
        every, max_side = whole(every, "debug.every", 1), whole(max_side, "debug.max_side", 16)
        jpeg_quality, workers = whole(jpeg_quality, "debug.jpeg_quality", 1, 100), whole(workers, "debug.workers", 1)
        if image_format not in ("jpg", "png"):
            raise DebugDumpError(f"debug.image_format must be jpg or png, got {image_format!r}")
        self.mask_threshold = number(mask_threshold, "composite.mask_threshold", 0.0, 1.0, low_open=True)
        self.feather_px, self.smooth_masks = feather_px, smooth_masks
        self.background_style = background_style
        self.dir = Path(directory)
        self.class_names = list(class_names)
        self.every, self.max_side = int(every), int(max_side)
        self.image_format, self.jpeg_quality = image_format, int(jpeg_quality)
        self.video_info = _jsonable(video_info) if video_info is not None else None
        self.overwrite = overwrite
        self.frame_count = 0
        self.image_frames = 0
        self._first: dict[str, Any] | None = None
        self._closed = self._completed = self._published = False
        # A few encoder threads overlap PNG/JPEG encoding with the render; the bound keeps memory flat.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="debug-dump")
        self._pending: deque[Future] = deque()
        self._max_pending = 4 * workers
        self._made: list[Path] = []  # the folders made for the dump, deepest first: removed with an unpublished one
        self.temp_dir: Path | None = None  # where the dump is written until it is published
        self._temp_dir_hold: int | None = None  # its flock-ed descriptor: open while the folder exists
        self._frames = None
        try:
            check_dump_dir(self.dir, overwrite)
            self._make_temp_dir()
            self._frames = open(self.temp_dir / FRAMES, "w", encoding="utf-8")
            self._write_manifest(complete=False)
        except BaseException:  # Ctrl-C too: no abort() follows a failed constructor
            self.abort()
            raise

    @classmethod
    def from_config(cls, cfg: Any, class_names: list[str], output_path: str | Path | None = None,
                    **settings: Any) -> DebugDumper:
        """`cfg` is the `debug` config group; the folder is `cfg.dir`, else `<output stem>_debug/` beside the output.
        `settings`: the constructor's keywords that come from elsewhere (video_info, overwrite, the composite's)."""
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        directory = get("dir", None)
        if directory is None:
            if output_path is None:
                raise DebugDumpError("debug.dump=true needs debug.dir=PATH or an output path to put <stem>_debug/ beside")
            out = Path(output_path)
            directory = out.with_name(f"{out.stem}_debug")
        return cls(directory, class_names, every=get("every", 1), max_side=get("max_side", 640),
                   image_format=str(get("image_format", "jpg")), jpeg_quality=get("jpeg_quality", 90),
                   workers=get("workers", 2), **settings)

    def _make_temp_dir(self) -> None:
        """The dump's folder (made if missing) and the hidden temp folder inside it, where its entries' renames into
        it are atomic; first, the hidden folders that killed renders left there are removed (the folder has passed
        `check_dump_dir`: a refused dump removes nothing)."""
        try:
            make_folders(self.dir, self._made)
            hidden = [entry for entry in self.dir.iterdir() if HIDDEN_DIR.match(entry.name)]
            note_removed_leftovers(remove_dead(hidden, folders=True))
            self.temp_dir, self._temp_dir_hold = _new_hidden_dir(self.dir, "partial")
            (self.temp_dir / IMAGES).mkdir()
        except OSError as e:
            raise DebugDumpError(f"cannot prepare debug dir {self.dir}: {e.strerror or e}") from None

    def write(self, batch: list[FrameRecord]) -> None:
        if self._closed:
            raise RuntimeError("DebugDumper.write after close")
        start = time.perf_counter()
        for record in batch:
            self._write_record(record)
        self._frames.flush()
        spent = (time.perf_counter() - start) / max(1, len(batch))
        for record in batch:
            record.timings["debug"] = record.timings.get("debug", 0.0) + spent

    def _write_record(self, record: FrameRecord) -> None:
        size = record.size
        small = dump_size(size, self.max_side)
        scale = small[0] / size[0]
        instances, masks_small = self._instances_json(record, small)
        images = {}
        if record.index % self.every == 0:
            images = self._queue_images(record, small, instances, masks_small)
        line = {
            "index": record.index, "pts": record.pts, "time": record.time,
            "size": list(size), "dump_size": list(small), "scale": scale,
            "instances": instances, "propagated": record.propagated, "cut": record.cut,
            "regions": [{"instance": r.instance, "style": r.style, "box": list(r.box), "carried": r.carried}
                        for r in record.stylized],
            "background": record.background is not None,
            "background_style": self.background_style if record.background is not None else None,
            "timings": {k: round(float(v), 6) for k, v in record.timings.items()},
            "images": images,
        }
        if self._first is None:
            self._first = {"size": list(size), "dump_size": list(small), "scale": scale,
                           "time_base": str(record.time_base)}
        self._frames.write(to_json(line, separators=(",", ":")) + "\n")
        self.frame_count += 1

    def _instances_json(self, record: FrameRecord, small: tuple[int, int]) -> tuple[list[dict], np.ndarray | None]:
        """One dict per instance, and the dump-size bool masks (None without a mask branch) for the overlay."""
        inst = record.instances
        if inst is None:
            return [], None
        n = len(inst)
        # Device work (threshold, downscale) happens here; only small CPU arrays reach the threads.
        masks_small, areas, rles = None, [None] * n, [None] * n
        if inst.masks is not None:
            areas = inst.mask_areas(AREA_THRESHOLD).tolist()
            masks_small = downscale_masks(inst.masks, small, self.mask_threshold).cpu().numpy()
            rles = encode_rle(masks_small)
        track_ids = [-1] * n if record.track_ids is None else [int(t) for t in record.track_ids.tolist()]
        styles = list(record.styles) if len(record.styles) == n else [None] * n
        keep = [None] * n if record.keep is None else [bool(k) for k in record.keep.tolist()]
        rows = zip(inst.boxes.tolist(), inst.scores.tolist(), inst.labels.tolist())
        return [{
            "track_id": track_ids[i], "label": int(label), "class": self._class_name(int(label)),
            "score": round(float(score), 4), "box": [round(float(v), 2) for v in box],
            "area": None if areas[i] is None else int(areas[i]), "style": styles[i], "keep": keep[i], "mask": rles[i],
        } for i, (box, score, label) in enumerate(rows)], masks_small

    def _class_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def _queue_images(self, record: FrameRecord, small: tuple[int, int], instances: list[dict],
                      masks_small: np.ndarray | None) -> dict[str, str]:
        track_ids = [d["track_id"] for d in instances]
        original = _resize_image(record.image, small).cpu()
        composite = _resize_image(_to_uint8(record.output), small).cpu() if record.output is not None else None
        stylized = _stylized_layer(record, small).cpu()
        sx, sy = _axis_scales(record.size, small)
        boxes = torch.tensor([d["box"] for d in instances], dtype=torch.float32).reshape(-1, 4)
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        labels = [f"#{t} {d['class']}" if t >= 0 else d["class"] for t, d in zip(track_ids, instances)]
        colors = [track_color(t) for t in track_ids]
        layers = {"original": original, "masks": None, "stylized": stylized}   # masks drawn on a thread
        if composite is not None:
            layers["composite"] = composite
        paths = {name: f"{IMAGES}/{record.index:06d}_{name}.{self.image_format}" for name in layers}
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._encode_all, layers, paths, masks_small, boxes, labels, colors))
        self.image_frames += 1
        return paths

    def _encode_all(self, layers: dict, paths: dict, masks_small, boxes, labels, colors) -> None:
        layers["masks"] = _overlay(layers["original"], masks_small, boxes, labels, colors)
        for name, image in layers.items():
            buffer = io.BytesIO()
            options = {"quality": self.jpeg_quality} if self.image_format == "jpg" else {"compress_level": 3}
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format=PIL_FORMATS[self.image_format], **options)
            atomic_write_bytes(self.temp_dir / paths[name], buffer.getvalue())

    def _write_manifest(self, complete: bool) -> None:
        manifest = {
            "format": FORMAT, "version": 1, "complete": complete,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "video": {**(self._first or {}), **({"info": self.video_info} if self.video_info else {})},
            "class_names": self.class_names,
            "frame_count": self.frame_count, "image_frames": self.image_frames,
            "every": self.every, "max_side": self.max_side, "image_format": self.image_format,
            "layers": list(LAYERS), "palette": [list(c) for c in PALETTE], "untracked_color": list(UNTRACKED),
            "mask_threshold": self.mask_threshold, "feather_px": self.feather_px, "smooth_masks": self.smooth_masks,
            "area_threshold": AREA_THRESHOLD, "background_style": self.background_style,
        }
        atomic_write_bytes(self.temp_dir / MANIFEST, to_json(manifest, indent=2).encode("utf-8"))

    def complete(self) -> None:
        """Waits for the image threads, marks the dump complete, and checks again what its folder holds (another
        run may have written there meanwhile); the dump is not in place until `publish()`."""
        if self._completed:
            return
        self._closed = True
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
            self._frames.close()
        self._write_manifest(complete=True)
        check_dump_dir(self.dir, self.overwrite)
        self._completed = True

    def publish(self) -> None:
        """Renames the complete dump's entries into its folder, the manifest last, in place of an earlier dump's
        (`overwrite`), which are moved aside first and deleted after. When a rename fails, the earlier dump's entries
        go back and this dump is deleted. Safe to call twice."""
        if self._published:
            return
        if not self._completed or self.temp_dir is None:
            raise RuntimeError("DebugDumper.publish of a dump that is not complete")
        replaced, replaced_hold = self._put_in_place()
        self._published = True
        try:
            self.temp_dir.rmdir()
            self.temp_dir = None
            if replaced is not None:
                try:
                    shutil.rmtree(replaced)
                except OSError as e:
                    print(f"note: the earlier debug dump, moved aside to {replaced}, could not be deleted: "
                          f"{e.strerror or e}", file=sys.stderr)
        finally:  # only once they are gone: until then a later dump must not take them for a killed render's
            _release(self._temp_dir_hold)
            _release(replaced_hold)
            self._temp_dir_hold = None

    def _put_in_place(self) -> tuple[Path | None, int | None]:
        """`publish`'s renames: the folder the earlier dump was moved aside to, and its held descriptor (None, None
        without an earlier dump). On failure, what was moved is moved back and this dump deleted."""
        replaced, replaced_hold, moved, placed = None, None, [], []
        try:
            check_dump_dir(self.dir, self.overwrite)  # what another run may have written there since complete()
            earlier = [entry.name for entry in sorted(self.dir.iterdir())
                       if entry.name in (MANIFEST, FRAMES, IMAGES) or _temp_of(entry.name) == MANIFEST]
            if earlier:
                replaced, replaced_hold = _new_hidden_dir(self.dir, "replaced")
            for name in earlier:
                os.rename(self.dir / name, replaced / name)
                moved.append(name)
            for name in (IMAGES, FRAMES, MANIFEST):  # the manifest last: it says what the folder holds
                os.rename(self.temp_dir / name, self.dir / name)
                placed.append(name)
        except BaseException as e:
            self._put_back(placed, moved, replaced)
            _release(replaced_hold)
            self.abort()
            if isinstance(e, OSError):
                kept = ": the earlier dump there is kept" if moved else ""
                raise DebugDumpError(f"cannot put the debug dump in place at {self.dir} ({e.strerror or e}){kept}"
                                     ) from None
            raise
        return replaced, replaced_hold

    def _put_back(self, placed: list[str], moved: list[str], replaced: Path | None) -> None:
        """Undoes a failed `publish`: this dump's entries back into its temp folder, the earlier dump's into place."""
        steps = [(self.dir / name, self.temp_dir / name) for name in reversed(placed)]
        steps += [(replaced / name, self.dir / name) for name in moved]
        for source, target in steps:
            with contextlib.suppress(OSError):  # each on its own: one that fails must not keep the others back
                os.rename(source, target)
        if replaced is not None:
            with contextlib.suppress(OSError):
                replaced.rmdir()

    def close(self) -> None:
        """`complete()`, then `publish()`: the dump complete and in place. Safe to call twice."""
        self.complete()
        self.publish()

    def __enter__(self) -> DebugDumper:
        return self

    def abort(self) -> None:
        """For a failed render: stops the threads and deletes the dump being written, with the folders made for it;
        a published one stays. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)
            if self._frames is not None:
                self._frames.close()
        if self._published:
            return
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
        _release(self._temp_dir_hold)
        self._temp_dir_hold = None
        remove_made_folders(self._made)

    def __exit__(self, exc_type, *_) -> None:
        self.close() if exc_type is None else self.abort()


def _label_style(colors: list[tuple[int, int, int]], image_width: int) -> dict:
    """Readable labels: white text on the track colour, in a real font sized to the image when one is installed
    (older torchvision lacks the label-background options; it then gets plain labels)."""
    params = inspect.signature(draw_bounding_boxes).parameters
    style: dict[str, Any] = {}
    if "fill_labels" in params:
        style.update(fill_labels=True, label_colors="white", label_background_colors=colors)
    font = next((f for f in LABEL_FONTS if Path(f).is_file()), None)
    if font is not None:
        style.update(font=font, font_size=max(10, image_width // 45))
    return style


def _overlay(image: torch.Tensor, masks: np.ndarray | None, boxes: torch.Tensor, labels: list[str],
             colors: list[tuple[int, int, int]]) -> torch.Tensor:
    """Masks coloured by track over the original, with '#id class' on each box."""
    out = image
    if masks is not None and len(masks):
        out = draw_segmentation_masks(out, torch.from_numpy(masks), alpha=0.55, colors=colors)
    drawn = [i for i, box in enumerate(boxes.tolist()) if all(map(math.isfinite, box))]  # a NaN box has no place
    if drawn:
        width = max(1, image.shape[-1] // 320)
        colors = [colors[i] for i in drawn]
        out = draw_bounding_boxes(out, boxes[drawn], labels=[labels[i] for i in drawn], colors=colors, width=width,
                                  **_label_style(colors, image.shape[-1]))
    return out


__all__ = ["DebugDumper", "DebugDumpError", "check_dump_dir", "dump_size", "downscale_masks", "encode_rle",
           "track_color"]
