"""The README's picture: chosen frames of a video beside the same frames of its render, one row per frame.

    python scripts/make_readme_figure.py --input .cache/demo/demo_clip.mp4 --render outputs/demo_stylized.mp4 \
        --frames 10 70 --out docs/img/demo.png [--overwrite]

The image is written in its suffix's format (.png, .jpg / .jpeg), atomically; an existing one is replaced only
with --overwrite.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import av
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.arguments import existing_file, last_output, reports_user_errors, whole_number  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.outputs import AtomicOutput  # noqa: E402
from scripts.script_outputs import checked_output  # noqa: E402

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # suffix -> PIL's format for it


def video_size(path: Path) -> tuple[int, int]:
    """(width, height) of the first video stream, as its frames decode (PyAV applies no display rotation)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream")
            stream = container.streams.video[0]
            return stream.codec_context.width, stream.codec_context.height
    except av.FFmpegError as error:
        raise UserError(f"{path} is not a video PyAV can read ({error})") from None


def frames_at(path: Path, indices: set[int]) -> dict[int, np.ndarray]:
    """RGB arrays of the frames at these 0-based decode positions."""
    found, count = {}, 0
    with av.open(str(path)) as container:
        for count, frame in enumerate(container.decode(video=0), start=1):
            if count - 1 in indices:
                found[count - 1] = frame.to_ndarray(format="rgb24")
            if len(found) == len(indices):
                break
    missing = sorted(indices - set(found))
    if missing:
        raise UserError(f"{path} has no frame {missing[0]} (it has {count})")
    return found


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", type=existing_file, required=True)
    p.add_argument("--render", type=existing_file, required=True)
    p.add_argument("--frames", type=whole_number(0), nargs="+", default=[10, 70], help="0-based frame numbers")
    p.add_argument("--gap", type=whole_number(0), default=4, help="white pixels between tiles")
    p.add_argument("--out", type=Path, required=True, help=f"the image: {', '.join(FORMATS)}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    target = checked_output(args.out, args.overwrite, suffixes=tuple(FORMATS), kind="image type")
    sizes = {path: video_size(path) for path in (args.input, args.render)}
    if sizes[args.input] != sizes[args.render]:  # tiles of two sizes cannot make the figure's rows
        (w, h), (rw, rh) = sizes[args.input], sizes[args.render]
        raise UserError(f"{args.input} is {w}x{h} but {args.render} is {rw}x{rh}: a figure puts their frames side "
                        "by side, give a render of that input")
    wanted = set(args.frames)
    before, after = frames_at(args.input, wanted), frames_at(args.render, wanted)
    rows = []
    for index in args.frames:
        a, b = before[index], after[index]
        gap = np.full((a.shape[0], args.gap, 3), 255, np.uint8)
        rows.append(np.concatenate([a, gap, b], axis=1))
    gap = np.full((args.gap, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for row in rows for x in (row, gap)][:-1], axis=0)
    last_output(target)
    with AtomicOutput(target, overwrite=args.overwrite) as temp:
        Image.fromarray(grid).save(temp, format=FORMATS[target.suffix.lower()])
    print(f"wrote {target} ({grid.shape[1]}x{grid.shape[0]}): input | render, frames {args.frames}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
