"""segment_every N: render speed, and the skipped frames' masks against the segmenter's own, N = 1 as the peer.

Speed: the clip rendered with each N in turn (with `--propagate`, each N > 1 also with `style.propagate=true`),
`--repeats` rounds alternating their order, medians of fps and of the segment and stylize stages' ms per frame.
Output: each render's temporal stability figure; with style.propagate, its frames against the same frames of the
render with the same N without it (decoded; PSNR over whole frames), the skipped frames (what carrying the stylized
pixels over changes) and the segmented ones (the same content: the encoder's share of the difference).
Quality: on the frames N skips, the masks the tracker moved there (`pipeline/track.py`) against the masks the
segmenter finds on those frames, both at `style.min_score` (what gets styled). Per frame the two sets are matched
by Hungarian assignment on mask IoU within a class; each segmenter object counts its matched IoU (0 unmatched):
the mean over all objects, the share found at IoU >= 0.5, and the moved objects that match nothing.

    python scripts/bench_segment_every.py [--input CLIP] [--every 2 3 4] [--propagate] [--repeats 3] [overrides ...]
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.decode import VideoReader  # noqa: E402
from pipeline.render import compose_config, render  # noqa: E402
from pipeline.segment_stage import SegmentStage  # noqa: E402
from pipeline.track import Tracker, mask_iou  # noqa: E402
from common.arguments import reports_user_errors, torch_device, whole_number, writing_in_place  # noqa: E402
from scripts.bench_report import add_report_options, device_name, markdown_table, publish  # noqa: E402
from segment.checkpoint import load_segmenter  # noqa: E402
from segment.structures import Instances  # noqa: E402

DEMO_CLIP = ROOT / ".cache" / "demo" / "demo_clip.mp4"


@dataclass
class Agreement:
    """The skipped frames' moved objects against the segmenter's objects on those frames."""

    ious: list[float]   # per segmenter object: IoU with the moved object matched to it, 0 if none
    found: int = 0      # segmenter objects matched at IoU >= 0.5
    unmatched: int = 0  # moved objects matched to no segmenter object
    skipped: set[int] = field(default_factory=set)  # the frames N skipped (not every index % N: a cut is segmented)

    def add(self, index: int, reference: Instances, shown: Instances) -> None:
        """Skipped frame `index`: both with full bool masks (`binarize`)."""
        self.skipped.add(index)
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
    runs = {every: (SegmentStage(model, threshold, every, cfg.get("scene_cut")), Tracker.from_config(cfg.track))
            for every in everies}
    results = {every: Agreement(ious=[]) for every in everies}

    def styled(instances: Instances) -> Instances:
        return instances[instances.scores >= min_score].binarize()

    for batch in VideoReader(path, batch_size=int(cfg.batch_size), device=device):
        fresh = [replace(record) for record in batch]  # before the reference's instances are set
        reference = [styled(record.instances) for record in every_frame(batch)]
        for every, (sparse, tracker) in runs.items():
            for record, want in zip(tracker(sparse([replace(record) for record in fresh])), reference):
                if record.propagated:
                    results[every].add(record.index, want, styled(record.instances))
    return results


@dataclass(frozen=True)
class Variant:
    """One render setting: segment_every N, with or without style.propagate."""

    every: int
    propagate: bool = False

    @property
    def label(self) -> str:
        return f"{self.every}" + (" + style.propagate" if self.propagate else "")

    def overrides(self) -> list[str]:
        return [f"segment_every={self.every}", *(["style.propagate=true"] if self.propagate else [])]


@dataclass
class Timed:
    fps: float
    segment_ms: float
    stylize_ms: float
    stability: float | None
    psnr: tuple[float, float] | None = None  # style.propagate: skipped and segmented frames against N without it


def speeds(cfgs: dict[Variant, object], repeats: int, workdir: Path) -> dict[Variant, Timed]:
    """Medians of each variant's renders, the variants alternating their order each round; each render's output
    stays in `workdir` (the last round's)."""
    runs: dict[Variant, list] = {variant: [] for variant in cfgs}
    for round_ in range(repeats):
        for variant in (list(cfgs) if round_ % 2 == 0 else list(cfgs)[::-1]):
            summary = render(cfgs[variant], output_path(workdir, variant))
            runs[variant].append((summary.fps, *(1000 * summary.timings.get(stage, 0.0) / summary.frames
                                                 for stage in ("segment", "stylize")), summary.stability))
    return {variant: Timed(*(statistics.median(r[column] for r in rows) for column in range(3)), rows[-1][3])
            for variant, rows in runs.items()}


def output_path(workdir: Path, variant: Variant) -> Path:
    return workdir / f"every{variant.every}{'p' if variant.propagate else ''}.mp4"


def psnr_by_frame_kind(path: Path, reference: Path, skipped: set[int], device: torch.device) -> tuple[float, float]:
    """PSNR (dB, peak 255) of one render's output against another's (both decoded), over all pixels of the
    `skipped` frames, and of the others."""
    squared, count = [0.0, 0.0], [0, 0]
    for batch, want in zip(VideoReader(path, batch_size=8, device=device),
                           VideoReader(reference, batch_size=8, device=device)):
        for record, expected in zip(batch, want):
            kind = 0 if record.index in skipped else 1
            squared[kind] += float((record.image.double() - expected.image.double()).square().sum())
            count[kind] += record.image.numel()
    return tuple(10 * math.log10(255 ** 2 * n / total) if total else math.inf for total, n in zip(squared, count))


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEMO_CLIP, help="the clip (default: make demo's)")
    parser.add_argument("--every", type=whole_number(2), nargs="+", default=[2, 3, 4],
                        help="segment every Nth frame (1, segmenting every frame, is the peer each is compared with)")
    parser.add_argument("--propagate", action="store_true", help="each N > 1 also with style.propagate=true")
    parser.add_argument("--repeats", type=whole_number(0), default=3, help="renders of each N (0: mask quality only)")
    parser.add_argument("--device", type=torch_device, default="auto", help="auto | cpu | cuda[:N]")
    add_report_options(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the render, e.g. segment=r50_fpn ...")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"no clip at {args.input} (`make demo` writes the default one)")
    everies = list(dict.fromkeys(args.every))
    variants = [Variant(1)] + [Variant(every, propagate) for every in everies
                               for propagate in ((False, True) if args.propagate else (False,))]
    overrides = [f"input={args.input.resolve()}", "output=unused.mp4", "overwrite=true", f"device={args.device}",
                 *args.overrides]
    cfgs = {variant: compose_config([*overrides, *variant.overrides()]) for variant in variants}
    device = args.device
    quality = agreements(args.input, everies, cfgs[variants[0]], device)
    timed: dict[Variant, Timed] = {}
    with tempfile.TemporaryDirectory(prefix="bench_every_") as tmp:
        if args.repeats:
            timed = speeds(cfgs, args.repeats, Path(tmp))
            for variant in variants:
                if variant.propagate:
                    timed[variant].psnr = psnr_by_frame_kind(output_path(Path(tmp), variant), output_path(
                        Path(tmp), Variant(variant.every)), quality[variant.every].skipped, device)
    rows = []
    for variant in variants:
        compared = quality[variant.every].row() if variant.every > 1 else ["-", "1 (itself)", "-", "-"]
        run = timed.get(variant)
        measured = ["-"] * 6 if run is None else [
            f"{run.fps:.2f}", f"{run.fps / timed[variants[0]].fps:.2f}x", f"{run.segment_ms:.1f}",
            f"{run.stylize_ms:.1f}", "-" if run.stability is None else f"{run.stability:.3f}",
            "-" if run.psnr is None else " / ".join(f"{value:.2f}" for value in run.psnr)]
        rows.append([variant.label, *measured, *compared])
    header = ["segment_every", "fps", "fps / every frame", "segment ms/frame", "stylize ms/frame", "stability",
              "PSNR against the same N restyled, skipped / segmented frames (dB)", "skipped-frame objects",
              "mean mask IoU", "found at IoU >= 0.5", "moved objects matching none"]
    text = (f"\n## segment_every benchmark ({time.strftime('%Y-%m-%d %H:%M')}, scripts/bench_segment_every.py)\n\n"
            f"Device: {device_name(device)}; torch {torch.__version__}, Python {platform.python_version()}; "
            f"clip {args.input.name}; {args.repeats} renders of each setting, alternating, medians; "
            f"overrides: {' '.join(args.overrides) or 'none'}\n\n{markdown_table(header, rows)}\n")
    with writing_in_place(None if args.no_append else args.output):
        publish(text, args.output, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
