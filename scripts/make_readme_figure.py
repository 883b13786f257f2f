"""The README's picture: chosen frames of a video beside the same frames of its render, one row per frame.

    python scripts/make_readme_figure.py --input .cache/demo/demo_clip.mp4 --render outputs/demo_stylized.mp4 \
        --frames 10 70 --out docs/img/demo.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import av
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.arguments import existing_file, whole_number  # noqa: E402


def frames_at(path: Path, indices: set[int]) -> dict[int, np.ndarray]:
    """RGB arrays of the frames at these 0-based decode positions."""
    found = {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in indices:
                found[index] = frame.to_ndarray(format="rgb24")
            if len(found) == len(indices):
                break
    missing = sorted(indices - set(found))
    if missing:
        raise SystemExit(f"error: {path} has no frame {missing[0]} (it has {index + 1})")
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", type=existing_file, required=True)
    p.add_argument("--render", type=existing_file, required=True)
    p.add_argument("--frames", type=whole_number(0), nargs="+", default=[10, 70], help="0-based frame numbers")
    p.add_argument("--gap", type=whole_number(0), default=4, help="white pixels between tiles")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    wanted = set(args.frames)
    before, after = frames_at(args.input, wanted), frames_at(args.render, wanted)
    rows = []
    for index in args.frames:
        a, b = before[index], after[index]
        gap = np.full((a.shape[0], args.gap, 3), 255, np.uint8)
        rows.append(np.concatenate([a, gap, b], axis=1))
    gap = np.full((args.gap, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for row in rows for x in (row, gap)][:-1], axis=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_name(f".{args.out.name}.tmp.png")
    Image.fromarray(grid).save(temporary)
    temporary.replace(args.out)
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]}): input | render, frames {args.frames}")


if __name__ == "__main__":
    main()
