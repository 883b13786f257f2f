"""Write a trained segmenter checkpoint as a compact inference file (fp16 weights, no optimizer state).

    python scripts/export_segmenter.py runs/demo_segmenter/model_final.pt models/demo_segmenter.pt [--note "..."]

The source may also be a torchvision Mask R-CNN R50-FPN file (its BatchNorm eps and class count are read from it).
The file loads like any checkpoint of ours (weights come back as fp32); `--note` is stored under "provenance".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.errors import UserError  # noqa: E402
from segment.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from segment.config import real_class_names  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="checkpoint written by segment.train (last.pt / model_final.pt) "
                        "or a torchvision Mask R-CNN R50-FPN file")
    parser.add_argument("out", type=Path, help="inference file to write")
    parser.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16)")
    parser.add_argument("--note", default="", help="provenance text stored in the file")
    args = parser.parse_args(argv)
    if args.out.resolve() == args.source.resolve():
        print("error: the output would overwrite the source checkpoint", file=sys.stderr)
        return 2
    try:
        model = load_checkpoint(args.source)
        save_checkpoint(model, args.out, extra={"provenance": args.note or f"exported from {args.source}"},
                        weights_dtype=None if args.fp32 else torch.float16)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a read-only or missing folder, a folder as the output...
        print(f"error: cannot write {args.out}: {error.strerror or error}", file=sys.stderr)
        return 2
    size_mb = args.out.stat().st_size / 2**20
    classes = real_class_names(model.class_names)
    count = f"{len(classes)} class{'' if len(classes) == 1 else 'es'}"
    print(f"{args.out}: {size_mb:.1f} MB, {count} ({', '.join(classes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
