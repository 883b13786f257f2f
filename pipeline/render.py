"""`python -m pipeline.render input=IN.mp4 output=OUT.mp4 [overrides]`: stylize every object of a video.

decode (thread) → segment → track → assign → stylize → composite (this thread, on the device) → encode (thread),
with bounded queues between the threads; `stage_threads=2` runs segment → track → assign on a thread of its own,
so that one batch's stylize and composite overlap the next batch's segmentation (on a GPU each thread queues its
kernels on a CUDA stream of its own: pipeline/thread_stream.py). The output is written to a temp
file beside the target and renamed only when every frame is encoded, the debug dump (a temp folder) right after it;
errors and Ctrl-C leave nothing behind and never touch the input.
In multirun mode (`-m`) each run writes its output into its own sweep folder.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# light, unlike what follows: the start-up's handler is in place while torch and Hydra load
from common.signals import Stopped, exit_status, leaving, on_stop_signals, stop_signal, stop_until


if __name__ == "__main__":  # `python -m pipeline.render`; modules importing this one keep their handlers
    # Ctrl-C while torch and Hydra load and Hydra composes the config: nothing is written yet, so one line, not a
    # traceback from inside an import
    on_stop_signals(leaving(b"error: interrupted: no output written\n"))

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline.decode import VideoReader
from pipeline.encode import VIDEO_SUFFIXES, VideoWriter
from common.device import resolve_device
from common.errors import UserError, one_line
from common.hydra_cli import compose_checked, exit_on_bad_overrides, hydra_readable
from common.outputs import AtomicOutput, HeldStopSignals, check_output
from common.settings import check_settings, flag, whole
from common.sweep import completed, failed, in_sweep, leave, pending_stop, stop_later
from pipeline.errors import InputError, PipelineConfigError
from pipeline.record import FrameRecord
from pipeline.streaming import run_streaming
from pipeline.thread_stream import ThreadStream

Stage = Callable[[list[FrameRecord]], list[FrameRecord]]
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# conf/render.yaml's hydra.output_subdir: `value` in a sweep (hydra.mode MULTIRUN), else null (nothing written)
OmegaConf.register_new_resolver("sweep_only", lambda value, mode: value if getattr(mode, "name", mode) == "MULTIRUN"
                                else None, replace=True)
DEBUG_KEYS = ("dump", "dir", "every", "max_side", "image_format", "jpeg_quality", "workers")  # conf/debug
# What `render` reads without a default; `~track` or `~input` on the command line deletes one (Hydra composes that
# without a word), which was an omegaconf traceback mid-way through the set-up
REQUIRED_KEYS = ("input", "overwrite", "device", "batch_size", "queue_size")
REQUIRED_GROUPS = ("decode", "segment", "style", "track", "composite", "encode")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # scheme://, as PyAV (FFmpeg) would have read it
# conf/render.yaml's own settings, besides its groups (each checked by its stage): any other (`+segment_evry=2`) is
# refused, not rendered without
RENDER_KEYS = ("input", "output", "overwrite", "device", "batch_size", "segment_every", "scene_cut", "queue_size",
               "stage_threads", "torch_threads")
THREAD_STARTS = ("stylize", "composite")  # the stages that begin the second and third stage thread


@dataclass
class RenderSummary:
    output: Path
    frames: int = 0
    seconds: float = 0.0
    instances: int = 0
    tracks: object = None
    styles_used: list[str] = field(default_factory=list)
    stability: float | None = None
    input_change: float | None = None  # the stability figure on the input: what motion alone explains
    timings: dict[str, float] = field(default_factory=dict)  # stage -> total seconds over all frames
    output_file: AtomicOutput | None = field(default=None, repr=False)  # writes `output`, once it is opened

    @property
    def written(self) -> bool:
        """The output is in place: an interrupt from here on stops nothing, and must not say it did."""
        return self.output_file is not None and self.output_file.committed

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        stability = "n/a" if self.stability is None else f"{self.stability:.3f} (input {self.input_change:.3f})"
        styles = ", ".join(self.styles_used) or "none"
        return (f"rendered {self.frames} frames in {self.seconds:.1f} s ({self.fps:.2f} fps): "
                f"{self.instances} instances; {_tracks(self.tracks)}; styles used: {styles}; "
                f"temporal stability {stability} -> {self.output}")


def render(cfg: DictConfig, output: Path, on_batch: Callable[[RenderSummary], None] | None = None,
           build: Callable[..., ModelStages] | None = None, summary: RenderSummary | None = None) -> RenderSummary:
    """Renders cfg.input into `output` (already resolved); returns the summary. Raises the project's errors.

    `on_batch(summary)` runs on the encode thread after each written batch (benchmarks sample memory there);
    `build` replaces `build_stages` (same signature), e.g. to measure decode → encode alone; `summary`, where given,
    is the one filled and returned (the CLI's signal handler reads it while the render runs).
    """
    _check_present(cfg)
    threads = whole(cfg.get("stage_threads", 2), "stage_threads", 1, 3)
    operator_threads = cfg.get("torch_threads", "auto")
    if operator_threads != "auto" and (isinstance(operator_threads, bool) or not isinstance(operator_threads, int)
                                       or operator_threads < 1):
        raise PipelineConfigError(f"torch_threads must be auto or a positive integer, got {operator_threads!r}")
    for key in ("batch_size", "queue_size", "segment_every"):
        whole(cfg.get(key, 1), key, 1)
    if URL.match(str(cfg.input)):  # made a path, it was "input not found: /cwd/https:/host/clip.mp4"
        raise InputError(f"input {cfg.input} is a URL: the render reads local files; download it first")
    source = Path(str(cfg.input)).expanduser().absolute()
    target = check_output(output, input=source, overwrite=flag(cfg.overwrite, "overwrite"), suffixes=VIDEO_SUFFIXES,
                          kind="video container")
    dump = dump_dir(cfg, target)
    if dump is not None and dump in (target, source):
        raise PipelineConfigError(f"debug.dir {dump} is the {'output' if dump == target else 'input'} file: "
                                  "give the dump a folder of its own")
    if dump is not None and dump.resolve() in target.resolve().parents:  # its check would find the video there
        raise PipelineConfigError(f"debug.dir {dump} holds the output {target}: give the dump a folder of its own")
    device = resolve_device(str(cfg.device))
    if summary is None:
        summary = RenderSummary(output=target)
    summary.output = target
    with _torch_threads(operator_threads, device):
        return _render(cfg, source, target, device, threads, on_batch, build, summary)


def _check_present(cfg: DictConfig) -> None:
    """Every key and group the render reads is in `cfg`, each group a group of settings, and no key it does not
    read."""
    check_settings([key for key in cfg if key not in (*REQUIRED_GROUPS, "debug", "hydra")], RENDER_KEYS, "top-level")
    for key in (*REQUIRED_KEYS, *REQUIRED_GROUPS):
        if key not in cfg:
            what = f"{key} group" if key in REQUIRED_GROUPS else key
            raise PipelineConfigError(f"no {what} in the config: the render needs it (drop ~{key} from the command)")
    for group in REQUIRED_GROUPS:
        if not isinstance(cfg[group], Mapping):
            raise PipelineConfigError(f"{group} must be a group of settings ({group}.KEY=VALUE), got {cfg[group]!r}")


@contextmanager
def _torch_threads(setting: int | str, device: torch.device) -> Iterator[None]:
    """torch's CPU operator threads for the render, restored after it. `auto` on a GPU is 1: there the host's
    tensor work is small (the tracker's matching, the host copies), and a pool of one thread per core waits on
    cores that decode, encode and the stage threads keep busy (H200 machine, 16 cores, R50 at 1080p with
    stage_threads=1, measured as OMP_NUM_THREADS=1: track 21.5 → 3.6 ms per frame, 16.6 → 24.0 fps). On a CPU
    `auto` keeps torch's default."""
    count = (1 if device.type == "cuda" else None) if setting == "auto" else int(setting)
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _render(cfg: DictConfig, source: Path, target: Path, device: torch.device, threads: int,
            on_batch: Callable[[RenderSummary], None] | None, build: Callable[..., ModelStages] | None,
            summary: RenderSummary) -> RenderSummary:
    reader = VideoReader.from_config(source, cfg.decode, int(cfg.batch_size), device)
    print(f"input: {reader.info.path} ({reader.info.describe()})", file=sys.stderr)
    stages = None
    try:
        # The stages check their settings (a style name, a checkpoint) before the output's folders and temp file exist
        stages = (build or build_stages)(cfg, device, reader, target)
        summary.output_file = AtomicOutput(target, overwrite=bool(cfg.overwrite))
        with ExitStack() as placing:
            with summary.output_file as temp:
                writer = VideoWriter(temp, reader.info, cfg.encode)  # opens the encoder before any frame: fails fast
                try:
                    _stream(reader, split_stages(stages.run, threads), writer, summary, int(cfg.queue_size), on_batch)
                    writer.close()
                    stages.finish(summary)
                except BaseException:
                    writer.abort()
                    raise
                # no stop between the video's rename and its side outputs' (the debug dump): they appear together
                placing.enter_context(HeldStopSignals())
            stages.place()
    except BaseException:
        if stages is not None:
            stages.abort()
        raise
    return summary


@dataclass
class ModelStages:
    """The stages between decode and encode, in order, plus what to do once the stream ends."""

    run: list[tuple[str, Stage]]
    finish: Callable[[RenderSummary], None] = lambda summary: None   # fills the summary, completes side outputs
    abort: Callable[[], None] = lambda: None       # deletes the side outputs not in place, after an error
    place: Callable[[], None] = lambda: None       # puts the side outputs in place, once the video is


def build_stages(cfg: DictConfig, device: torch.device, reader: VideoReader, target: Path) -> ModelStages:
    """segment → track → assign → stylize → composite (→ debug dump) from the config."""
    # Imported here so the I/O errors (missing input, bad output) answer before any model code loads.
    from pipeline.assign import StyleAssigner, listed
    from pipeline.composite import Compositor
    from pipeline.debug_format import DebugDumpError
    from pipeline.segment_stage import SegmentStage
    from pipeline.stylize_stage import StylizeStage
    from pipeline.track import Tracker
    from segment.checkpoint import load_segmenter
    from stylize.bank import StyleBank
    from stylize.errors import StyleError

    # The render's device wins over the segment group's own `device` setting.
    model = load_segmenter({**OmegaConf.to_container(cfg.segment, resolve=True), "device": str(device)})
    class_names = list(model.config.class_names)
    bank_file = cfg.style.get("bank")  # ~ is the user's home here as in input, output and segment.checkpoint
    bank = StyleBank.load(None if bank_file is None else Path(str(bank_file)).expanduser())
    for extra in listed(cfg.style.get("extra_styles")):  # stylize.train mode=new_style checkpoints
        try:
            bank.add_from_checkpoint(Path(str(extra)).expanduser())
        except StyleError as error:  # it names the file; the setting that gave it is what to fix
            raise StyleError(f"style.extra_styles: {one_line(error)}") from None
    bank.network.to(device)
    tracker = Tracker.from_config(cfg.track)
    assigner = StyleAssigner.from_config(cfg.style, bank, class_names, tracker.horizon(cfg.get("segment_every", 1)))
    compositor = Compositor.from_config(cfg.composite)
    stylizer = StylizeStage.from_config(cfg.style, bank, feather_px=compositor.feather_px)
    reach = stylizer.margin * stylizer.downsample  # the crop's margin in the frame's pixels
    if compositor.feather_px > reach:  # the stylized pixels end there: a seam, or with margin 0 no feather at all
        raise PipelineConfigError(f"composite.feather_px={compositor.feather_px} reaches past the crops' margin "
                                  f"({reach} px: style.margin x style.downsample): raise style.margin or lower "
                                  "composite.feather_px")
    if cfg.style.get("propagate", False) is True and cfg.get("segment_every", 1) == 1:
        print("note: style.propagate acts only on frames the segmenter skips: with segment_every=1 there are none",
              file=sys.stderr)
    run: list[tuple[str, Stage]] = [
        ("segment", SegmentStage(model, cfg.segment.get("score_threshold", 0.5), cfg.get("segment_every", 1),
                                 cfg.get("scene_cut"))),
        ("track", tracker),
        ("assign", assigner),
        ("stylize", stylizer),
        ("composite", compositor),
    ]
    dumper = None
    dump = dump_dir(cfg, target)
    if dump is not None:
        from pipeline.debug import DebugDumper

        # the dump shows what the composite blended (its threshold) and what painted each object (the background)
        dumper = DebugDumper.from_config({**cfg.debug, "dir": str(dump)}, class_names, video_info=reader.info,
                                         overwrite=flag(cfg.overwrite, "overwrite"),
                                         mask_threshold=compositor.threshold, feather_px=compositor.feather_px,
                                         smooth_masks=compositor.smooth, background_style=stylizer.background)
        run.append(("debug", _writes(dumper)))

    def finish(summary: RenderSummary) -> None:
        if dumper is not None:
            dumper.complete()
        summary.tracks = tracker.summary()
        summary.styles_used = sorted(str(s) for s in assigner.styles_used)
        summary.stability, summary.input_change = compositor.stability(), compositor.input_change()

    def place() -> None:
        if dumper is None:
            return
        try:
            dumper.publish()
        except DebugDumpError as error:
            raise DebugDumpError(f"{one_line(error)}; the video {target} is written, without it") from None
        print(f"debug dump: {dumper.dir}", file=sys.stderr)

    def abort() -> None:
        if dumper is not None:
            dumper.abort()

    return ModelStages(run, finish=finish, abort=abort, place=place)


def _writes(dumper) -> Stage:
    def stage(batch: list[FrameRecord]) -> list[FrameRecord]:
        dumper.write(batch)
        return batch
    return stage


def split_stages(stages: list[tuple[str, Stage]], threads: int) -> list[list[tuple[str, Stage]]]:
    """The stages in consecutive groups, one per thread: all in one; (stage_threads=2) those before stylize and
    the rest; (3) composite and what follows it on a third. Two balance the groups on the benchmarks (H200, R50 at
    1080p, two threads: segment + track + assign 24.0 ms per frame, stylize + composite 29.1; this 2-core CPU at
    480p: 58 and 62 ms); a third takes the composite off the slower group."""
    names = [name for name, _ in stages]
    cuts = [names.index(name) for name in THREAD_STARTS[:threads - 1] if name in names[1:]]
    bounds = [0, *cuts, len(stages)]
    return [stages[start:end] for start, end in zip(bounds, bounds[1:])]


def _stream(reader: VideoReader, groups: list[list[tuple[str, Stage]]], writer: VideoWriter,
            summary: RenderSummary, queue_size: int, on_batch: Callable[[RenderSummary], None] | None = None) -> None:
    progress = tqdm(total=reader.info.frame_count or None, unit="frame", desc="render", dynamic_ncols=True,
                    file=sys.stderr, mininterval=0.5)

    def steps(stages: list[tuple[str, Stage]]) -> Callable[[list[FrameRecord]], list[FrameRecord]]:
        def process(batch: list[FrameRecord]) -> list[FrameRecord]:
            for _, stage in stages:
                batch = stage(batch)
            return batch
        stream = ThreadStream(reader.device)  # each group's thread queues its GPU work on a stream of its own
        return lambda batch: stream.run(process, batch)

    def sink(batch: list[FrameRecord]) -> None:
        writer.write(batch)
        for record in batch:
            summary.instances += 0 if record.instances is None else len(record.instances)
            for stage, seconds in record.timings.items():
                summary.timings[stage] = summary.timings.get(stage, 0.0) + seconds
        summary.frames += len(batch)
        progress.update(len(batch))
        if on_batch is not None:
            on_batch(summary)

    started = time.perf_counter()
    try:
        run_streaming(reader, [steps(group) for group in groups], sink, queue_size=queue_size)
    finally:
        summary.seconds = time.perf_counter() - started
        progress.close()


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/render.yaml with command-line style overrides, for scripts that call `render` in-process; a bad one is
    one line, as on the render's own command line."""
    return compose_checked(CONF_DIR, "render", overrides, PipelineConfigError)


def output_path(cfg: DictConfig) -> Path:
    """cfg.output against the user's cwd; in multirun mode, the same file name inside this run's sweep folder."""
    output = Path(str(cfg.output)).expanduser()
    if in_sweep():
        return Path(HydraConfig.get().runtime.output_dir) / output.name
    return output.absolute()


def dump_dir(cfg: DictConfig, target: Path) -> Path | None:
    """The debug dump's folder (None: no dump): debug.dir against the user's cwd, else `<output stem>_debug/` beside
    the output; in multirun mode, a debug.dir's name inside this run's sweep folder, as for the output."""
    debug = cfg.get("debug")
    if debug is None:
        return None
    check_settings(debug, DEBUG_KEYS, "debug")
    if not flag(debug.get("dump", False), "debug.dump"):
        if debug.get("dir") is not None:  # was ignored: the render ended with no dump where one was asked for
            raise PipelineConfigError(f"debug.dir={debug.dir} writes nothing without debug.dump=true: add it, or drop "
                                      "debug.dir")
        return None
    if debug.get("dir") is None:
        return target.with_name(f"{target.stem}_debug")
    directory = Path(str(debug.dir)).expanduser()
    if in_sweep():
        return Path(HydraConfig.get().runtime.output_dir) / directory.name
    return directory.absolute()


def _stop_on_signals(summary: RenderSummary, late: list[int]) -> None:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed, the ssh link dropped) stop the render. One that comes once
    the output is in place stops nothing: its number goes into `late`. An ignored signal (nohup) stays ignored.
    SIGQUIT keeps its core dump: it is how a hung process is examined."""
    on_stop_signals(stop_until(lambda: summary.written, late))


def _tracks(value: object) -> str:
    """Tracker.summary() (a dict of figures) as `tracks=12, active=3, ...`."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "tracks: none"
    return f"tracks: {'n/a' if value is None else value}"


# settings whose values are file names, spelt as the user's files are
PATH_KEYS = ("input", "output", "debug.dir", "style.bank", "segment.checkpoint")


def main() -> None:
    """The `python -m pipeline.render` entry: Hydra parses sys.argv once paths it cannot read are quoted."""
    sys.argv[1:] = hydra_readable(sys.argv[1:], PATH_KEYS)
    exit_on_bad_overrides(CONF_DIR, "render", sys.argv[1:])
    _main()


@hydra.main(config_path=str(CONF_DIR), config_name="render", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    late: list[int] = []  # the stop signals that came once the output was complete
    try:
        _job(cfg, late)
    finally:
        if in_sweep():  # until the next job's render: the jobs so far are done, their outputs complete
            on_stop_signals(stop_later)
    if late:
        if in_sweep():  # the sweep stops before its next job, if there is one
            stop_later(late[0], None)
        else:  # it changes nothing
            print(f"note: {signal.Signals(late[0]).name} came once the output was complete: it is kept",
                  file=sys.stderr)


def _job(cfg: DictConfig, late: list[int]) -> None:
    for key in ("input", "output"):
        # not given, deleted (~input), null, or empty (`input=`: Path("") is the working folder, "a folder" misled)
        if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] is None or str(cfg[key]) == "":
            print(f"error: no {key} given: pass {key}=PATH (e.g. input=clip.mp4 output=out.mp4)", file=sys.stderr)
            sys.exit(2)
    summary = RenderSummary(output=Path(str(cfg.output)))
    try:
        _stop_on_signals(summary, late)  # in place of the start-up's handlers, which only leave
        if in_sweep() and (signum := pending_stop()) is not None:  # it came as this job started
            raise Stopped(signum)
        render(cfg, output_path(cfg), summary=summary)
    except UserError as error:  # expected, user-fixable: one line, exit 2, no traceback
        if in_sweep():  # the other jobs still run; the sweep exits 2 at its end
            failed(one_line(error))
            if summary.written:  # the video is in place, what failed came after it (its debug dump's rename)
                completed(summary.output)
            return
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        if not summary.written:
            if in_sweep():
                leave(stop_signal(interrupt), in_job=True)
            print("error: interrupted: no output written", file=sys.stderr)
            sys.stderr.flush()
            # The temp file is gone and the threads are stopped by now. Under load a plain sys.exit(130) sometimes
            # ended as "killed by SIGINT" (-2): CPython re-raises SIGINT at exit when it counts the interrupt as
            # unhandled. Leave with the status we mean.
            os._exit(exit_status(interrupt))
        late.append(stop_signal(interrupt))
    if in_sweep():
        completed(summary.output)
    print(summary.line())
    print(f"output: {summary.output}")


if __name__ == "__main__":
    main()
