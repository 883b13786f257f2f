"""Writes the synthetic shapes dataset (COCO format) used to train the demo segmenter.

    python scripts/make_synthetic_dataset.py --out data/synthetic --train 2000 --val 200 --size 256 --seed 0

Result: OUT/train/*.jpg, OUT/val/*.jpg, OUT/annotations/instances_{train,val}.json. Each split is replaced
atomically, and only where this script wrote it; the same arguments always give the same files.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.signals import STARTING, leaving, on_stop_signals  # noqa: E402 (light: what follows them is not)

if __name__ == "__main__":  # a stop signal while torch loads: one line, not a traceback; main's own handlers follow
    on_stop_signals(leaving(STARTING))

import argparse  # noqa: E402
import json  # noqa: E402

from common.arguments import last_output, reports_user_errors, whole_number  # noqa: E402
from segment.data.errors import DatasetError  # noqa: E402
from segment.data.synthetic import CLASS_NAMES, check_replaceable, write_coco_split  # noqa: E402


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset folder")
    # every value write_coco_split would refuse is refused here, for both splits, before either is written: a bad
    # --val used to fail only after the train split had been written (or replaced)
    parser.add_argument("--train", type=whole_number(0), default=2000, help="training images")
    parser.add_argument("--val", type=whole_number(0), default=200, help="validation images")
    parser.add_argument("--size", type=whole_number(32), default=256, help="image side in pixels (square images)")
    parser.add_argument("--seed", type=whole_number(0), default=0)
    parser.add_argument("--classes", nargs="+", default=CLASS_NAMES, choices=CLASS_NAMES, metavar="NAME",
                        help=f"shape classes to use (default all: {' '.join(CLASS_NAMES)})")
    parser.add_argument("--max-objects", type=whole_number(1), default=6, help="most objects per image")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} is a file, not a folder")
    splits = (("train", args.train), ("val", args.val))
    last_output(args.out / "annotations" / "instances_val.json")  # once it is in place, a stop signal is late
    try:
        for split, _ in splits:  # before minutes of generation, and before train replaces anything
            check_replaceable(args.out, split)
        for split, count in splits:
            path = write_coco_split(args.out, split, count, args.size, args.seed, classes=args.classes,
                                    max_objects=args.max_objects)
            coco = json.loads(path.read_text())
            print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} objects -> {path}")
    except (DatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
