"""Reads a debug dump folder (see pipeline/debug.py for the layout), tolerating a partly written one.

Missing, empty or foreign folders raise DebugDumpError (nothing to show). A partly written dump
(manifest missing or complete=false, a truncated or corrupt line in frames.jsonl, images missing)
loads with everything that is intact and a list of warnings the viewer shows in a banner.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.debug_format import FORMAT, FRAMES, IMAGES, LAYERS, MANIFEST, PALETTE, UNTRACKED, DebugDumpError


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
    if not any(root.iterdir()):
        raise DebugDumpError(f"debug dump folder {root} is empty (did the render run with debug.dump=true?)")
    manifest_path, frames_path = root / MANIFEST, root / FRAMES
    if not manifest_path.exists() and not frames_path.exists():
        raise DebugDumpError(f"{root} is not a debug dump: no {MANIFEST} or {FRAMES} in it")

    warnings: list[str] = []
    manifest = _read_manifest(manifest_path, warnings)
    frames = _read_frames(frames_path, warnings)
    _drop_missing_images(root, frames, warnings)
    if manifest.get("complete") is False:
        warnings.insert(0, f"dump is incomplete ({MANIFEST} has complete=false): the render stopped or is "
                           f"still running; showing the {len(frames)} frames written so far")
    if manifest.get("complete") and manifest.get("frame_count") not in (None, len(frames)):
        warnings.append(f"{MANIFEST} says {manifest['frame_count']} frames, {FRAMES} holds {len(frames)}")
    manifest["frame_count_read"] = len(frames)
    return Dump(dir=root, manifest=manifest, frames=frames, warnings=warnings)


def _read_manifest(path: Path, warnings: list[str]) -> dict:
    defaults = {"format": FORMAT, "complete": False, "class_names": [], "layers": list(LAYERS),
                "palette": [list(c) for c in PALETTE], "untracked_color": list(UNTRACKED), "video": {}}
    if not path.exists():
        warnings.append(f"{MANIFEST} is missing: the dump is partly written; showing what {FRAMES} holds")
        return defaults
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.append(f"{MANIFEST} is unreadable ({e.__class__.__name__}): showing what {FRAMES} holds")
        return defaults
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DebugDumpError(f"{path} is not an instyle debug manifest (format != {FORMAT})")
    return {**defaults, **manifest}


def _read_frames(path: Path, warnings: list[str]) -> list[str]:
    if not path.exists():
        warnings.append(f"{FRAMES} is missing: no frames were written")
        return []
    frames: list[str] = []
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    truncated_tail = raw[-1] != b""       # the writer ends every line with \n; a cut-off write does not
    lines = raw if truncated_tail else raw[:-1]
    bad = 0
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "index" not in record:
                raise ValueError("not a frame record")
        except (ValueError, UnicodeDecodeError):
            if number == len(lines) and truncated_tail:
                warnings.append(f"{FRAMES}: the last line is truncated ({len(line)} bytes ignored)")
            else:
                bad += 1
            continue
        frames.append(line.decode("utf-8"))
    if bad:
        warnings.append(f"{FRAMES}: {bad} unreadable lines skipped")
    return frames


def _drop_missing_images(root: Path, frames: list[str], warnings: list[str]) -> None:
    """Frames whose image files are missing keep their record; their `images` lose the missing layers."""
    missing = 0
    for i, text in enumerate(frames):
        record = json.loads(text)
        images = record.get("images") or {}
        present = {layer: rel for layer, rel in images.items() if (root / rel).is_file()}
        if len(present) != len(images):
            missing += len(images) - len(present)
            record["images"] = present
            frames[i] = json.dumps(record, separators=(",", ":"))
    if missing:
        warnings.append(f"{missing} image files listed in {FRAMES} are missing from {IMAGES}/")
