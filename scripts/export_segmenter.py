"""Write a trained segmenter checkpoint as a compact inference file (fp16 weights, no optimizer state).

    python scripts/export_segmenter.py runs/demo_segmenter/model_final.pt models/demo_segmenter.pt [--note "..."]
        [--overwrite]

The source may also be a torchvision Mask R-CNN R50-FPN file (its BatchNorm eps and class count are read from it).
The file loads like any checkpoint of ours (weights come back as fp32). Its "provenance" is the source's, if it has
one, followed by `--note` (default: "exported from SOURCE"). An existing output is replaced only with --overwrite.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.signals import STARTING, leaving, on_stop_signals  # noqa: E402 (light: what follows them is not)

if __name__ == "__main__":  # a stop signal while torch loads: one line, not a traceback; main's own handlers follow
    on_stop_signals(leaving(STARTING))

import argparse  # noqa: E402

import torch  # noqa: E402

from common.arguments import existing_file, last_output, reports_user_errors  # noqa: E402
from segment.checkpoint import load_checkpoint, read_file, save_checkpoint  # noqa: E402
from segment.config import real_class_names  # noqa: E402
from scripts.script_outputs import checked_output  # noqa: E402


def provenance(source: Path, note: str) -> str:
    """The source's provenance (a file exported before, or one a trainer labelled) with this export's note after
    it: an export of an export keeps where the weights came from."""
    state = read_file(source)  # read again after load_checkpoint, which returns the model alone
    earlier = state.get("provenance") if isinstance(state, dict) else None
    return "; ".join(part for part in (earlier if isinstance(earlier, str) else "", note) if part)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=existing_file, help="checkpoint written by segment.train (last.pt / "
                        "model_final.pt) or a torchvision Mask R-CNN R50-FPN file")
    parser.add_argument("out", type=Path, help="inference file to write")
    parser.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16)")
    parser.add_argument("--note", default="", help="provenance text added after the source's (default: "
                        "'exported from SOURCE')")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    out = checked_output(args.out, args.overwrite, input=args.source, suffixes=(".pt", ".pth"),
                         kind="checkpoint file")  # before the source is read
    model = load_checkpoint(args.source)
    last_output(out)
    save_checkpoint(model, out, extra={"provenance": provenance(args.source, args.note or
                                                                f"exported from {args.source}")},
                    weights_dtype=None if args.fp32 else torch.float16)
    size_mb = out.stat().st_size / 2**20
    classes = real_class_names(model.class_names)
    count = f"{len(classes)} class{'' if len(classes) == 1 else 'es'}"
    print(f"{out}: {size_mb:.1f} MB, {count} ({', '.join(classes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
