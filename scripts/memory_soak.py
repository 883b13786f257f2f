"""Memory-flatness soak: render thousands of small frames and watch the process RSS, and each stage's time per frame.

    python scripts/memory_soak.py --frames 3000 --size 64 [--stages full|io] [--checkpoint SEG.pt --bank BANK.pt]
        [render overrides, e.g. segment_every=2 style.propagate=true]

The clip is make_demo_clip.py's scene (one shot: the same objects glide across it from the first frame to the last)
at --size x --size. `--stages full` runs every stage on the CPU: the committed demo segmenter (--checkpoint: another
checkpoint of ours), which finds those objects on every frame, at the clip's own size, and a tiny random style bank
(--bank: a real one); `--stages io` runs decode → encode alone. RSS is sampled every `--every` frames and after the
last batch; prints the first and last RSS, the least-squares slope and the growth from the first to the last quarter,
and exits 1 when that growth exceeds `--max-growth-mb`. It also prints each stage's ms per frame over the first and
the last quarter of the frames: a stage whose work grows with the video (state kept per object ever seen, or per
frame of a track) shows there long before it shows in RSS. The tracker's longest track and scene-cut count say
whether the soak held objects long enough for that (a clip of short tracks, cut every few frames, cannot).
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.render import ModelStages, compose_config, render  # noqa: E402
from common.arguments import existing_file, finite_number, reports_user_errors, whole_number  # noqa: E402
from scripts.make_demo_clip import make_clip  # noqa: E402
from tests.tiny_models import tiny_bank  # noqa: E402


@dataclass
class SoakResult:
    frames: np.ndarray     # frame counts at the samples
    rss_mb: np.ndarray     # RSS in MiB at the samples
    stage_seconds: list[dict[str, float]] = field(default_factory=list)  # each stage's seconds so far, per sample
    tracks: dict | None = None  # Tracker.summary() at the end (None: no tracker ran)

    def stage_ms(self) -> dict[str, tuple[float, float]]:
        """stage -> ms per frame over the first and the last quarter of the samples."""
        q = max(1, (len(self.frames) - 1) // 4)
        spans = [(0, q), (len(self.frames) - 1 - q, len(self.frames) - 1)]
        return {stage: tuple(1000 * (self.stage_seconds[b].get(stage, 0.0) - self.stage_seconds[a].get(stage, 0.0))
                             / max(1.0, self.frames[b] - self.frames[a]) for a, b in spans)
                for stage in (self.stage_seconds[-1] if self.stage_seconds else {})}

    @property
    def slope_mb_per_1000(self) -> float:
        return float(np.polyfit(self.frames, self.rss_mb, 1)[0] * 1000) if len(self.frames) > 1 else 0.0

    @property
    def quarter_growth_mb(self) -> float:
        """Mean RSS of the last quarter of samples minus that of the first quarter (after warm-up)."""
        q = max(1, len(self.rss_mb) // 4)
        return float(self.rss_mb[-q:].mean() - self.rss_mb[:q].mean())

    def line(self) -> str:
        return (f"{int(self.frames[-1])} frames: RSS first {self.rss_mb[0]:.1f} MiB, last {self.rss_mb[-1]:.1f} MiB, "
                f"slope {self.slope_mb_per_1000:+.2f} MiB/1000 frames, "
                f"first→last quarter {self.quarter_growth_mb:+.2f} MiB")

    def tracks_line(self) -> str:
        if not self.tracks:
            return "tracks: none (no tracker ran)"
        return (f"tracks: {self.tracks['tracks']} started, longest {self.tracks['longest']} frames, "
                f"{self.tracks['cuts']} scene cuts")

    def stages_line(self) -> str:
        return "ms per frame, first → last quarter: " + ", ".join(
            f"{stage} {first:.2f} → {last:.2f}" for stage, (first, last) in self.stage_ms().items())


def soak(frames: int = 3000, size: int = 64, stages: str = "full", every: int = 50, workdir: Path | None = None,
         checkpoint: Path | None = None, bank: Path | None = None, batch_size: int = 8,
         render_overrides: tuple[str, ...] = ()) -> SoakResult:
    with tempfile.TemporaryDirectory(prefix="memory_soak_", dir=workdir) as tmp:
        tmp = Path(tmp)
        clip, random_bank = tmp / "soak.mp4", tmp / "tiny_bank.pt"
        # the segmenter at the clip's size: its cost then follows --size, as every other stage's does
        overrides = [f"input={clip}", f"output={tmp / 'out.mp4'}", f"batch_size={batch_size}", "device=cpu",
                     "encode.preset=ultrafast", f"style.bank={bank or random_bank}", f"segment.min_size={size}",
                     f"segment.max_size={size}", *([f"segment.checkpoint={checkpoint}"] if checkpoint else [])]
        cfg = compose_config([*overrides, *render_overrides])  # before the clip is made: a bad override costs nothing
        make_clip(clip, frames, (size, size))
        if stages == "full" and bank is None:
            tiny_bank(random_bank)
        samples: list[tuple[int, float, dict[str, float]]] = []
        last: tuple[int, float, dict[str, float]] | None = None  # each batch's, kept until the next
        process = psutil.Process()

        def sample(summary) -> None:
            nonlocal last
            last = (summary.frames, process.memory_info().rss / 2**20, dict(summary.timings))
            if not samples or summary.frames - samples[-1][0] >= every:
                samples.append(last)

        gc.collect()
        summary = render(cfg, Path(cfg.output), on_batch=sample, build=None if stages == "full" else _no_model_stages)
    if last is not None and samples[-1] is not last:  # the last batch, whatever --every: the soak ends with the clip
        samples.append(last)
    warm = samples[len(samples) // 10:] or samples  # allocator and codec buffers settle in the first frames
    return SoakResult(np.array([f for f, _, _ in warm], float), np.array([r for _, r, _ in warm], float),
                      [t for _, _, t in warm], summary.tracks)


def _no_model_stages(cfg, device, reader, target) -> ModelStages:
    return ModelStages(run=[])


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=whole_number(1), default=3000)
    # even: the clip is H.264 yuv420p, whose chroma planes halve each side
    parser.add_argument("--size", type=whole_number(2, multiple_of=2), default=64,
                        help="square frame side in pixels, even")
    parser.add_argument("--stages", choices=("full", "io"), default="full")
    parser.add_argument("--every", type=whole_number(1), default=50, help="sample RSS every N frames")
    parser.add_argument("--batch-size", type=whole_number(1), default=8)
    parser.add_argument("--checkpoint", type=existing_file,
                        help="segmenter checkpoint of ours (default: the committed demo segmenter)")
    parser.add_argument("--bank", type=existing_file, help="style bank (default: a tiny random one)")
    parser.add_argument("--max-growth-mb", type=finite_number(0), default=50.0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the render")
    args = parser.parse_args(argv)
    # RSS is sampled after the first batch, then after a batch at least --every frames later: a slope and the
    # quarters need two samples, and the last batch ends at --frames
    if args.frames < args.batch_size + args.every:
        parser.error(f"--frames must be at least --batch-size + --every ({args.batch_size + args.every}), "
                     f"got {args.frames}: the soak needs two RSS samples")
    result = soak(args.frames, args.size, args.stages, args.every, checkpoint=args.checkpoint, bank=args.bank,
                  batch_size=args.batch_size, render_overrides=tuple(args.overrides))
    print(result.line())
    print(result.tracks_line())
    print(result.stages_line())
    if result.quarter_growth_mb > args.max_growth_mb:
        print(f"error: RSS grew {result.quarter_growth_mb:.1f} MiB (> {args.max_growth_mb} MiB)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
