"""segment_every N: render speed, and the skipped frames' masks against the segmenter's own, N = 1 as the peer.

Speed: the clip rendered with each N in turn, `--repeats` rounds alternating their order, medians of fps and of
the segment stage's ms per frame.
Quality: on the frames N skips, the masks the tracker moved there (`pipeline/track.py`) against the masks the
segmenter finds on those frames, both at `style.min_score` (what gets styled). Per frame the two sets are matched
by Hungarian assignment on mask IoU within a class; each segmenter object counts its matched IoU (0 unmatched):
the mean over all objects, the share found at IoU >= 0.5, and the moved objects that match nothing.

    python scripts/bench_segment_every.py [--input CLIP] [--every 2 3 4] [--repeats 3] [overrides ...]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.decode import VideoReader  # noqa: E402
from pipeline.render import compose_config, render, resolve_device  # noqa: E402
from pipeline.segment_stage import SegmentStage  # noqa: E402
from pipeline.track import Tracker, mask_iou  # noqa: E402
from scripts.bench_report import markdown_table, publish  # noqa: E402
from segment.checkpoint import load_segmenter  # noqa: E402
from segment.structures import Instances  # noqa: E402

DEMO_CLIP = ROOT / ".cache" / "demo" / "demo_clip.mp4"


@dataclass
class Agreement:
    """The skipped frames' moved objects against the segmenter's objects on those frames."""

    ious: list[float]   # per segmenter object: IoU with the moved object matched to it, 0 if none
    found: int = 0      # segmenter objects matched at IoU >= 0.5
    unmatched: int = 0  # moved objects matched to no segmenter object

    def add(self, reference: Instances, shown: Instances) -> None:
        """One frame: both with full bool masks (`binarize`)."""
        matched = []
        if len(reference) and len(shown):
            iou = mask_iou(reference.masks.cpu(), shown.masks.cpu())
            iou = iou * (reference.labels.cpu()[:, None] == shown.labels.cpu()[None, :])
            rows, cols = linear_sum_assignment(iou.numpy(), maximize=True)
            matched = [float(iou[r, c]) for r, c in zip(rows, cols) if iou[r, c] > 0]
        self.ious += matched + [0.0] * (len(reference) - len(matched))
        self.found += sum(value >= 0.5 for value in matched)
        self.unmatched += len(shown) - len(matched)

    def row(self) -> list[str]:
        count = len(self.ious)
        mean = sum(self.ious) / count if count else float("nan")
        return [str(count), f"{mean:.3f}", f"{self.found / count:.1%}" if count else "-", str(self.unmatched)]


def agreements(path: Path, everies: list[int], cfg, device: torch.device) -> dict[int, Agreement]:
    """One pass over the clip through the render's segment and track stages: each batch segmented whole once (the
    reference), then, for each N, its own copies of the batch's records through every-Nth segmentation and a tracker
    of its own, comparing the frames N skips."""
    model = load_segmenter({**OmegaConf.to_container(cfg.segment, resolve=True), "device": str(device)})
    threshold, min_score = float(cfg.segment.get("score_threshold", 0.5)), float(cfg.style.min_score)
    every_frame = SegmentStage(model, threshold)
    runs = {every: (SegmentStage(model, threshold, every), Tracker.from_config(cfg.track)) for every in everies}
    results = {every: Agreement(ious=[]) for every in everies}

    def styled(instances: Instances) -> Instances:
        return instances[instances.scores >= min_score].binarize()

    for batch in VideoReader(path, batch_size=int(cfg.batch_size), device=device):
        fresh = [replace(record) for record in batch]  # before the reference's instances are set
        reference = [styled(record.instances) for record in every_frame(batch)]
        for every, (sparse, tracker) in runs.items():
            for record, want in zip(tracker(sparse([replace(record) for record in fresh])), reference):
                if record.propagated:
                    results[every].add(want, styled(record.instances))
    return results


def speeds(cfgs: dict[int, object], repeats: int, workdir: Path) -> dict[int, tuple[float, float]]:
    """Median fps and segment ms per frame of each N's render, the Ns alternating their order each round."""
    runs: dict[int, list[tuple[float, float]]] = {every: [] for every in cfgs}
    for round_ in range(repeats):
        for every in (list(cfgs) if round_ % 2 == 0 else list(cfgs)[::-1]):
            summary = render(cfgs[every], workdir / f"every{every}.mp4")
            runs[every].append((summary.fps, 1000 * summary.timings.get("segment", 0.0) / summary.frames))
    return {every: (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
            for every, rows in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEMO_CLIP, help="the clip (default: make demo's)")
    parser.add_argument("--every", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=3, help="renders of each N (0: quality only)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-append", action="store_true", help="print only, leave docs/benchmarks.md alone")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the render, e.g. segment=r50_fpn ...")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"no clip at {args.input} (`make demo` writes the default one)")
    if any(every < 2 for every in args.every) or args.repeats < 0:
        parser.error("--every takes whole numbers >= 2 and --repeats one >= 0")
    everies = [1, *dict.fromkeys(args.every)]
    overrides = [f"input={args.input.resolve()}", "output=unused.mp4", "overwrite=true", f"device={args.device}",
                 *args.overrides]
    cfgs = {every: compose_config([*overrides, f"segment_every={every}"]) for every in everies}
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_every_") as tmp:
        timed = speeds(cfgs, args.repeats, Path(tmp)) if args.repeats else {}
    quality = agreements(args.input, everies[1:], cfgs[1], device)
    rows = []
    for every in everies:
        compared = quality[every].row() if every > 1 else ["-", "1 (itself)", "-", "-"]
        fps, segment = timed.get(every, (None, None))
        ratio = f"{fps / timed[1][0]:.2f}x" if fps else "-"
        rows.append([str(every), *(["-", "-", "-"] if fps is None else [f"{fps:.2f}", ratio, f"{segment:.1f}"]),
                     *compared])
    header = ["segment_every", "fps", "fps / every frame", "segment ms/frame", "skipped-frame objects",
              "mean mask IoU", "found at IoU >= 0.5", "moved objects matching none"]
    text = (f"\n## segment_every benchmark ({time.strftime('%Y-%m-%d %H:%M')}, scripts/bench_segment_every.py)\n\n"
            f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} "
            f"({torch.get_num_threads()} threads); torch {torch.__version__}, Python {platform.python_version()}; "
            f"clip {args.input.name}; {args.repeats} renders of each N, alternating, medians; "
            f"overrides: {' '.join(args.overrides) or 'none'}\n\n{markdown_table(header, rows)}\n")
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
