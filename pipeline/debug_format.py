"""The debug dump's on-disk format, shared by the writer (pipeline/debug.py) and the torch-free viewer."""
from __future__ import annotations

import re

from pipeline.errors import RenderError

FORMAT = "instyle-debug-v1"
MANIFEST = "manifest.json"
FRAMES = "frames.jsonl"
IMAGES = "images"
LAYERS = ("original", "masks", "stylized", "composite")
IMAGE_NAME = re.compile(r"^\d{6}_(original|masks|stylized|composite)\.(jpg|png)$")
# the dumper's own folders inside a dump's DIR: a dump being written (partial), an earlier one being replaced
HIDDEN_DIR = re.compile(r"^\.[0-9a-f]{8}\.(partial|replaced)$")
MASK_THRESHOLD = 0.5   # the composite's default (composite.mask_threshold); a dump records the one it ran with
AREA_THRESHOLD = 0.5   # `area` counts pixels at p >= this: what style.min_area and the tracker count
# Track colours (tab10); the viewer reads them from the manifest so both sides agree.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127)]
UNTRACKED = (150, 150, 150)


class DebugDumpError(RenderError):
    """A debug dump cannot be written or read (bad settings, missing, empty or foreign folder)."""


def track_color(track_id: int) -> tuple[int, int, int]:
    return UNTRACKED if track_id < 0 else PALETTE[track_id % len(PALETTE)]
