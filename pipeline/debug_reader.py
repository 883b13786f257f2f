"""Reads a debug dump folder (see pipeline/debug.py for the layout), tolerating a partly written one.

Missing, empty or foreign folders, and files that cannot be read at all, raise DebugDumpError (nothing to show).
A partly written dump (manifest missing or complete=false, a truncated, corrupt or malformed line in frames.jsonl,
images missing) loads with everything that is intact and a list of warnings the viewer shows in a banner.
Each line served is strict JSON of the shape the viewer's page reads: a line it could not show (NaN, a field of
the wrong type) would stop the page, so it is skipped and counted instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.debug_format import (FORMAT, FRAMES, HIDDEN_DIR, IMAGE_NAME, IMAGES, LAYERS, MANIFEST, PALETTE,
                                   UNTRACKED, DebugDumpError)


@dataclass
class Dump:
    dir: Path
    manifest: dict
    frames: list[str]                     # one JSON object per frame, as text (served as is)
    warnings: list[str] = field(default_factory=list)


def load_dump(directory: str | Path) -> Dump:
    root = Path(directory)
    if not root.exists():
        raise DebugDumpError(f"debug dump folder {root} does not exist")
    if not root.is_dir():
        raise DebugDumpError(f"{root} is not a folder (pass the debug dump folder, e.g. outputs/clip_debug)")
    try:
        empty = not any(root.iterdir())
    except OSError as e:
        raise DebugDumpError(f"cannot read debug dump folder {root}: {e.strerror or e}") from None
    if empty:
        raise DebugDumpError(f"debug dump folder {root} is empty (did the render run with debug.dump=true?)")
    manifest_path, frames_path = root / MANIFEST, root / FRAMES
    if not manifest_path.exists() and not frames_path.exists():
        if any(HIDDEN_DIR.match(entry.name) for entry in root.iterdir()):  # the dumper's own temp folders
            raise DebugDumpError(f"{root} holds no finished debug dump: a render is still writing it, or was killed "
                                 "before it finished; open it once a render has finished")
        raise DebugDumpError(f"{root} is not a debug dump: no {MANIFEST} or {FRAMES} in it")

    warnings: list[str] = []
    manifest, read = _read_manifest(manifest_path, warnings)
    frames = _read_frames(frames_path, warnings)
    _drop_missing_images(root, frames, warnings)
    if read and manifest.get("complete") is False:   # a manifest not read has said nothing of the kind
        warnings.insert(0, f"dump is incomplete ({MANIFEST} has complete=false): the render stopped or is "
                           f"still running; showing the {len(frames)} frames written so far")
    if manifest.get("complete") and manifest.get("frame_count") not in (None, len(frames)):
        warnings.append(f"{MANIFEST} says {manifest['frame_count']} frames, {FRAMES} holds {len(frames)}")
    manifest["frame_count_read"] = len(frames)
    return Dump(dir=root, manifest=manifest, frames=frames, warnings=warnings)


def _not_json_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str | bytes):
    """json.loads without Python's NaN / Infinity extensions, which the browser's JSON.parse rejects."""
    return json.loads(text, parse_constant=_not_json_constant)


def _read_manifest(path: Path, warnings: list[str]) -> tuple[dict, bool]:
    """The manifest over the defaults, and whether it was read."""
    defaults = {"format": FORMAT, "complete": False, "class_names": [], "layers": list(LAYERS),
                "palette": [list(c) for c in PALETTE], "untracked_color": list(UNTRACKED), "video": {}}
    if not path.exists():
        warnings.append(f"{MANIFEST} is missing: the dump is partly written; showing what {FRAMES} holds")
        return defaults, False
    try:
        manifest = strict_json(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise DebugDumpError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        warnings.append(f"{MANIFEST} is unreadable ({e.__class__.__name__}): showing what {FRAMES} holds")
        return defaults, False
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DebugDumpError(f"{path} is not an instyle debug manifest (format != {FORMAT})")
    bad = sorted(key for key, check in MANIFEST_FIELDS.items() if key in manifest and not check(manifest[key]))
    if bad:
        warnings.append(f"{MANIFEST}: {', '.join(bad)} unreadable, the defaults used")
    return {**defaults, **{k: v for k, v in manifest.items() if k not in bad}}, True


def _read_frames(path: Path, warnings: list[str]) -> list[str]:
    if not path.exists():
        warnings.append(f"{FRAMES} is missing: no frames were written")
        return []
    frames: list[str] = []
    try:
        with open(path, "rb") as f:
            raw = f.read().split(b"\n")
    except OSError as e:
        raise DebugDumpError(f"cannot read {path}: {e.strerror or e}") from None
    truncated_tail = raw[-1] != b""       # the writer ends every line with \n; a cut-off write does not
    lines = raw if truncated_tail else raw[:-1]
    bad = 0
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
            problem = frame_problem(strict_json(text))
            if problem:
                raise ValueError(problem)
        except (ValueError, UnicodeDecodeError, RecursionError):
            if number == len(lines) and truncated_tail:
                warnings.append(f"{FRAMES}: the last line is truncated ({len(line)} bytes ignored)")
            else:
                bad += 1
            continue
        frames.append(text)
    if bad:
        warnings.append(f"{FRAMES}: {bad} unreadable or malformed lines skipped")
    return frames


# ---------- what the viewer's page reads of a record, and of the manifest ----------

def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional(check):
    return lambda v: v is None or check(v)


def _size(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_integer(x) and x > 0 for x in v)


def _box(v) -> bool:
    return isinstance(v, list) and len(v) == 4 and all(x is None or _real(x) for x in v)


def _rle(v) -> bool:
    return isinstance(v, dict) and _size(v.get("size")) and isinstance(v.get("counts"), str)


INSTANCE_FIELDS = {   # key: check; every key required (the writer writes them all)
    "track_id": _integer, "class": lambda v: isinstance(v, str), "score": _optional(_real), "box": _box,
    "area": _optional(_integer), "style": _optional(lambda v: isinstance(v, str)),
    "keep": _optional(lambda v: isinstance(v, bool)), "mask": _optional(_rle),
}
REGION_FIELDS = {"instance": _integer, "carried": _optional(lambda v: isinstance(v, bool))}
FRAME_FIELDS = {   # required
    "index": _integer, "size": _size, "dump_size": _size, "instances": lambda v: isinstance(v, list),
    "images": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(p, str) for k, p in v.items()),
    "timings": lambda v: isinstance(v, dict) and all(x is None or _real(x) for x in v.values()),
}
FRAME_OPTIONAL = {   # absent or of this shape
    "time": _optional(_real), "propagated": _optional(lambda v: isinstance(v, bool)),
    "cut": _optional(lambda v: isinstance(v, bool)), "regions": _optional(lambda v: isinstance(v, list)),
    "background_style": _optional(lambda v: isinstance(v, str)),
}
MANIFEST_FIELDS = {
    "complete": lambda v: isinstance(v, bool), "every": lambda v: _integer(v) and v > 0,
    "class_names": lambda v: isinstance(v, list),
    "layers": lambda v: isinstance(v, list) and all(layer in LAYERS for layer in v),
    "palette": lambda v: isinstance(v, list) and len(v) > 0 and all(_color(c) for c in v),
    "untracked_color": lambda v: _color(v), "video": lambda v: isinstance(v, dict),
}


def _color(v) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_real(x) for x in v)


def frame_problem(record) -> str | None:
    """What keeps the viewer from showing a parsed frames.jsonl line, or None for a usable record."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, check in FRAME_FIELDS.items():
        if key not in record or not check(record[key]):
            return f"{key} missing or malformed"
    for key, check in FRAME_OPTIONAL.items():
        if key in record and not check(record[key]):
            return f"{key} malformed"
    for number, instance in enumerate(record["instances"]):
        if not isinstance(instance, dict):
            return f"instance {number} is not an object"
        for key, check in INSTANCE_FIELDS.items():
            if key not in instance or not check(instance[key]):
                return f"instance {number}: {key} missing or malformed"
        if instance["mask"] is not None and instance["mask"]["size"] != record["dump_size"]:
            return f"instance {number}: mask size is not dump_size"
    for number, region in enumerate(record.get("regions") or []):
        if not isinstance(region, dict) or not all(check(region.get(k)) for k, check in REGION_FIELDS.items()):
            return f"region {number} malformed"
    return None


def _drop_missing_images(root: Path, frames: list[str], warnings: list[str]) -> None:
    """Frames whose image files are missing keep their record; their `images` lose the missing layers (and any
    entry that is not a dumped image's name: the server would not serve it)."""
    missing = 0
    for i, text in enumerate(frames):
        record = json.loads(text)
        images = record["images"]
        present = {layer: rel for layer, rel in images.items()
                   if layer in LAYERS and _image_name(rel) and (root / rel).is_file()}
        if len(present) != len(images):
            missing += len(images) - len(present)
            record["images"] = present
            frames[i] = json.dumps(record, separators=(",", ":"), allow_nan=False)
    if missing:
        warnings.append(f"{missing} image files listed in {FRAMES} are missing from {IMAGES}/")


def _image_name(rel: str) -> bool:
    folder, _, name = rel.partition("/")
    return folder == IMAGES and IMAGE_NAME.match(name) is not None
