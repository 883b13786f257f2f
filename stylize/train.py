"""Train styles with perceptual losses: `python -m stylize.train style_image=... content=... vgg=...`.

mode=new_style: one more style for an existing bank. Only the new style's instance-norm scales/shifts learn
  (all convolutions and the other styles' rows are frozen), so it is quick and the result is a small style
  checkpoint that `StyleBank.add_from_checkpoint` appends to that bank.
mode=full: every weight of a network for N style images (from scratch, or starting from the bank's convs);
  the result is a new style bank file (`StyleBank.load`). See conf/stylize_train.yaml.

Every `checkpoint_every` steps the training state (network, optimizer, data RNG, step) goes to `<out>.resume.pt`;
`resume=true` continues from it as if never stopped, and it is removed once `out` is written.

A stop signal (Ctrl-C, SIGTERM, SIGHUP) is one "error: ..." line naming the resume state in place, or that nothing
was written, and exit status 128 + its number; one that comes once `out` is in place is a note, the output kept,
exit 0. A sweep (`-m lr=1e-3,1e-4 ...`) trains job N into Hydra's folder for it, multirun/<date>/<time>/N/, under
`out`'s file name (SweepJob), every job even when some fail (the sweep then exits 2 naming them: common/sweep.py).
A stop signal in a job stops the sweep with that job's line and the sweep's resume command; between two jobs it stops
it before the next, and after the last job it is a note.
"""
from __future__ import annotations

import sys

from common.signals import exit_status, leaving, on_stop_signals, stop_signal, stop_until  # light: the rest is not

if __name__ == "__main__":  # `python -m stylize.train`; modules importing this one keep their handlers
    # a stop signal while torch and Hydra load and Hydra composes the config: one line, not a traceback from inside
    # an import, nor (SIGTERM, SIGHUP) a silent end
    on_stop_signals(leaving(b"error: interrupted before training began: nothing written\n"))

import math
import signal
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from common.device import resolve_device
from common.errors import OutputError, SettingError, UserError, one_line
from common.hydra_cli import exit_on_bad_overrides, hydra_readable
from common.leftovers import note_removed_leftovers, remove_dead
from common.outputs import HeldStopSignals, check_output, leftover_temp_files, same_file
from common.settings import flag, number, whole
from common.sweep import completed, discard_job_folder, failed, in_sweep, leave, pending_stop, stop_later
from stylize.bank import (BANK_FORMAT, DEFAULT_BANK, OUT_SUFFIXES, STYLE_FORMAT, StyleBank, StyleInfo, atomic_save,
                          check_style_names, load_file, make_previews)
from stylize.content import IMAGE_SUFFIXES, ContentImages, read_image, resize_shorter
from stylize.errors import StyleError
from stylize.losses import PerceptualLoss
from stylize.network import MultiStyleNet
from stylize.vgg import VGG16Features

RESUME_FORMAT = "instyle-stylize-resume-v1"
RESUME_SUFFIX = ".resume.pt"
# settings whose values are file names, spelt as the user's files are (hydra_readable quotes them for Hydra)
PATH_KEYS, PATH_LIST_KEYS = ("content", "vgg", "bank", "out"), ("style_image",)  # style_image: one, or a list
# what `out` may end in: a torch.save file (the style checkpoint or bank), as export_segmenter's output; out=a.txt
# wrote one under a name that passes it off as text
# The least image_size / style_size: two stride-2 convs leave the net a 4x4 map, VGG's three poolings relu4_3 a
# 2x2 one (a Gram matrix over fewer pixels says little about a style).
MIN_SIZE = 16
ADAM_BETA1 = 0.9  # torch's default, which the optimizer is built with
# Adam's first step is lr / (1 - beta1), a float32 scalar in its kernel: a larger lr was a RuntimeError traceback
MAX_LR = torch.finfo(torch.float32).max * (1 - ADAM_BETA1)
# What a resume state must share with the run that continues it: they set the data, the losses, the optimizer
# or the network trained. steps, checkpoint_every, log_every, device, name and out may change.
RESUME_KEYS = ("mode", "init", "init_style", "bank", "style_image", "content", "vgg", "batch_size", "image_size",
               "style_size", "lr", "content_weight", "style_weight", "tv_weight", "max_video_frames", "seed")


@dataclass
class TrainResult:
    out: Path
    network: MultiStyleNet
    # per step: the content/style/tv losses unweighted, the total weighted (the bar shows the terms weighted)
    history: list[dict[str, float]] = field(default_factory=list)
    late_signal: int | None = None  # a stop signal that came once `out` was in place: it stopped nothing


@dataclass(frozen=True)
class SweepJob:
    """A job of a sweep (`-m`): it trains into Hydra's folder for it (multirun/<date>/<time>/N), under `out`'s file
    name; one `out` for every job made the second refuse the first's output, or with overwrite=true replace it."""
    number: int
    folder: Path
    sweep_folder: Path

    @classmethod
    def current(cls) -> SweepJob | None:
        """The sweep job that runs now; None outside a sweep."""
        if not in_sweep():
            return None
        hydra_config = HydraConfig.get()
        return cls(int(hydra_config.job.num), Path(hydra_config.runtime.output_dir),
                   Path(str(hydra_config.sweep.dir)).absolute())

    @property
    def continuation(self) -> str:
        return (f"the same sweep command with resume=true hydra.sweep.dir={self.sweep_folder} continues the sweep "
                "(its complete jobs kept)")

    def finished_earlier(self, cfg: DictConfig) -> Path | None:
        """With resume=true (and no overwrite=true), this job's `out` where it is in place without a resume state:
        the sweep's earlier run finished the job, and it is kept, not trained again; refused where it was trained
        with other settings (a resumed sweep of other values kept outputs that its record then misnamed)."""
        if (not flag(cfg.get("resume", False), "resume") or flag(cfg.get("overwrite", False), "overwrite")
                or OmegaConf.is_missing(cfg, "style_image")):  # `train` refuses the last
            return None
        style_paths = _style_paths(cfg)
        out = _out_path(cfg, style_paths, self.folder)
        if not out.is_file() or out.with_name(out.name + RESUME_SUFFIX).exists():
            return None
        saved = load_file(out, STYLE_FORMAT if cfg.mode == "new_style" else BANK_FORMAT).get("settings", {})
        changed = _changed(saved, _output_settings(cfg, style_paths), (*RESUME_KEYS, "steps"))
        if changed:
            raise StyleError(f"{out} was trained with other settings: {', '.join(changed)}; pass overwrite=true to "
                             "train it again")
        return out


@dataclass
class TrainingRun:
    """What a training has on disk so far, for what a stop signal says (`train` fills it in)."""
    steps: int = 0
    state_path: Path | None = None
    saved: int = 0         # the step of the resume state in place (0: none)
    written: bool = False  # `out` is in place: the training is done, a stop signal stops nothing

    def interrupted(self, job: SweepJob | None = None) -> str:
        """The one line for a stop signal that came before `out` was in place."""
        if job is None:
            if not self.saved:
                return "interrupted: nothing written"
            return (f"interrupted: the state of step {self.saved} of {self.steps} is in {self.state_path}; the same "
                    "command with resume=true continues from it")
        left = (f"its state of step {self.saved} of {self.steps} is in {self.state_path}" if self.saved
                else "nothing written for it")
        return f"interrupted in sweep job {job.number}: {left}; {job.continuation}"


class Interrupted(KeyboardInterrupt):
    """A stop signal during training; its message says what is left to continue from."""

    def __init__(self, message: str, interrupt: BaseException):
        super().__init__(message)
        self.signum = stop_signal(interrupt)  # the exit status stays the signal's


def _check_settings(cfg: DictConfig) -> None:
    """The settings, before any file is read: one line for a bad one instead of a traceback mid-training."""
    for key in ("steps", "batch_size", "max_video_frames", "log_every"):
        whole(cfg[key], key, 1)
    for key in ("image_size", "style_size"):
        whole(cfg[key], key, MIN_SIZE)
    if cfg.image_size % 4:  # MultiStyleNet halves the crops twice and doubles them back
        raise SettingError(f"image_size must be a multiple of 4, got {cfg.image_size}")
    whole(cfg.seed, "seed", 0, 2 ** 64 - 1)  # torch.Generator's range; 1.5 and text are not seeds
    whole(cfg.get("checkpoint_every", 0), "checkpoint_every", 0)
    for key in ("overwrite", "resume"):
        flag(cfg.get(key, False), key)
    if number(cfg.lr, "lr", 0, low_open=True) > MAX_LR:
        raise SettingError(f"lr must be at most {MAX_LR:.3g} (Adam's float32 step), got {cfg.lr!r}")
    weights = {key: number(cfg[key], key, 0) for key in ("content_weight", "style_weight", "tv_weight")}
    # With neither the content nor the style term the run trained for hours and wrote a "trained" style that was its
    # starting row (tv alone only smooths it). mode=full may train on the content alone: an auto-encoder whose
    # convolutions another run can start from (init=bank); in new_style only the style's row trains, so without the
    # style term it would learn nothing of its style image.
    if not weights["content_weight"] and not weights["style_weight"]:
        raise SettingError("content_weight and style_weight are both 0: nothing but tv_weight's smoothing would "
                           "train; give style_weight (and content_weight) a value > 0")
    if cfg.mode == "new_style" and not weights["style_weight"]:
        raise SettingError("style_weight=0 in mode=new_style: nothing would learn the style image's style (the new "
                           "style would only redo its content); give style_weight a value > 0")


def _style_paths(cfg: DictConfig) -> list[Path]:
    paths = list(cfg.style_image) if isinstance(cfg.style_image, (list, ListConfig)) else [cfg.style_image]
    if cfg.mode == "new_style" and len(paths) != 1:
        raise StyleError(f"mode=new_style trains one style; got {len(paths)} style images")
    if not paths:
        raise StyleError("style_image=[] lists no style image: mode=full needs at least one")
    return [Path(str(p)) for p in paths]


def _check_style_names(cfg: DictConfig, style_paths: list[Path]) -> None:
    """The names the output will give its styles, checked by the bank's rules now rather than after the training
    (a bank refuses to be made with them)."""
    if cfg.mode == "new_style":
        name = cfg.name if cfg.name is not None else style_paths[0].stem
        try:
            check_style_names([name])
        except StyleError as exc:
            fix = "pass another name=" if cfg.name is not None else f"rename {style_paths[0]} or pass name=NAME"
            raise StyleError(f"{exc}; {fix}") from None
        return
    stems = [p.stem for p in style_paths]
    for count, path in enumerate(style_paths, 1):  # the first file whose name the bank's rules refuse
        try:
            check_style_names(stems[:count])
        except StyleError as exc:
            raise StyleError(f"{exc}; mode=full names each style after its file: rename {path}") from None


def _new_style_network(cfg: DictConfig, bank: StyleBank) -> tuple[MultiStyleNet, int]:
    """The bank's network with one more style row, where only that row can change."""
    network = bank.network
    if cfg.init_style is not None:
        start = network.style_params(bank.index(cfg.init_style))
    else:
        start = {k: torch.stack([network.style_params(i)[k] for i in range(len(bank))]).mean(0)
                 for k in network.style_params(0)}
    index = network.append_style(start)

    def new_row_only(grad: torch.Tensor) -> torch.Tensor:
        # Made from the gradient itself: the hook outlives moves of the network to another device or dtype.
        kept = torch.zeros_like(grad)
        kept[index] = grad[index]
        return kept  # other styles' rows stay bit-identical

    for name, p in network.named_parameters():
        p.requires_grad_(".norm." in name)
        if ".norm." in name:
            p.register_hook(new_row_only)
    return network, index


def train(cfg: DictConfig, run: TrainingRun | None = None, folder: Path | None = None) -> TrainResult:
    """Trains as `cfg` says, into `out` (with `folder`, a sweep job's, `out`'s file name in that folder), filling in
    `run` as it goes."""
    run = TrainingRun() if run is None else run
    for key in ("style_image", "content"):
        if OmegaConf.is_missing(cfg, key):
            raise StyleError(f"no {key} given: pass {key}=PATH")
    if cfg.mode not in ("new_style", "full"):
        raise StyleError(f"mode={cfg.mode}: use new_style or full")
    if cfg.mode == "full" and cfg.init not in ("bank", "scratch"):
        raise StyleError(f"init={cfg.init}: use bank or scratch")
    _check_settings(cfg)
    run.steps = int(cfg.steps)
    device = resolve_device(cfg.device)
    style_paths = _style_paths(cfg)
    _check_style_names(cfg, style_paths)
    vgg = VGG16Features.from_file(cfg.vgg)               # first of the files: the one people forget
    out = _output(cfg, style_paths, folder)              # refused now, not after the training
    state_path = run.state_path = out.with_name(out.name + RESUME_SUFFIX)
    settings = _resume_settings(cfg, style_paths)
    resume = _resume_state(cfg, state_path, settings)    # its settings checked before the data is read
    if resume is not None:  # from here a stop signal's message must name it: it is what a resume continues from
        run.saved = int(resume["step"])
    bank = None
    if cfg.mode == "new_style":
        bank = StyleBank.load(cfg.bank)
        try:
            bank.check_new_name(cfg.name or style_paths[0].stem)   # before training, not after
        except StyleError as exc:
            raise StyleError(f"{exc}; pass another name=" if cfg.name else f"{exc}; pass name=NAME") from None
    steps, seed = run.steps, int(cfg.seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    content = ContentImages(str(cfg.content), int(cfg.image_size), int(cfg.max_video_frames))
    style_images = [resize_shorter(read_image(p), int(cfg.style_size)).to(device) for p in style_paths]
    criterion = PerceptualLoss(vgg.to(device), style_images, cfg.content_weight, cfg.style_weight, cfg.tv_weight)

    if bank is not None:
        network, new_index = _new_style_network(cfg, bank)
        network_rows = torch.full((int(cfg.batch_size),), new_index)   # the new row of the network
        style_rows = torch.zeros(int(cfg.batch_size), dtype=torch.long)  # ... trained towards style image 0
    elif cfg.init == "bank":  # full, starting from the bank's convolutions and fresh norms
        donor = StyleBank.load(cfg.bank).network
        network = MultiStyleNet(**{**donor.hparams, "num_styles": len(style_paths)})
        network.load_state_dict({k: v for k, v in donor.state_dict().items() if ".norm." not in k}, strict=False)
    else:
        network = MultiStyleNet(num_styles=len(style_paths))
    network.to(device).train()
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=float(cfg.lr), betas=(ADAM_BETA1, 0.999))

    history: list[dict[str, float]] = []
    start = run.saved
    if resume is not None:
        network.load_state_dict(resume["network"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        history = list(resume["history"])
        print(f"resumed from {state_path} at step {start}")
    else:  # an earlier run's state (overwrite=true) must not be taken for this run's
        state_path.unlink(missing_ok=True)
        # a killed run's temp states; not a live one's (another run of this out), which would lose its write
        note_removed_leftovers(remove_dead(leftover_temp_files(state_path)))
    every = int(cfg.get("checkpoint_every", 0))
    late_signal = None
    try:
        bar = tqdm(range(start, steps), desc=f"stylize.train {cfg.mode}", unit="step", initial=start, total=steps)
        for step in bar:
            x = content.batch(int(cfg.batch_size), generator).to(device)
            if bank is None:  # full: each sample trains a random one of the N styles
                style_rows = network_rows = torch.randint(len(style_paths), (x.shape[0],), generator=generator)
            weights = F.one_hot(network_rows, network.num_styles).float().to(device)
            losses = criterion(network(x, weights), x, style_rows.to(device))
            history.append({k: float(v.detach()) for k, v in losses.items()})
            if not math.isfinite(history[-1]["total"]):
                raise _diverged(cfg, run, f"at step {step} the loss became {history[-1]['total']}")
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            if step % int(cfg.log_every) == 0:
                bar.set_postfix_str(_progress(history[-1], criterion.weights))
            if every and (step + 1) % every == 0 and step + 1 < steps:
                _check_finite(cfg, run, trainable, step)
                # a stop signal during the write comes after its rename (AtomicOutput holds it back): `saved` must
                # count that state, or the message names the step before (or "nothing written") beside it
                with HeldStopSignals():
                    _save_state(state_path, settings, step + 1, network, optimizer, generator, history)
                    run.saved = step + 1
        _check_finite(cfg, run, trainable, steps - 1)
        network.eval().cpu()
        # A signal during the write comes once `out` is in place: `written` must say so. The state goes in the same
        # block: a signal between the two stopped a finished training as "nothing written", and left a resume state
        # that a later resume=true would have trained again from.
        with HeldStopSignals():
            _save(cfg, network, bank, style_paths, out)
            run.written = True
            state_path.unlink(missing_ok=True)
    except KeyboardInterrupt as interrupt:
        if not run.written:
            raise Interrupted(run.interrupted(), interrupt) from None
        late_signal = stop_signal(interrupt)
    return TrainResult(out, network, history, late_signal)


def _progress(losses: dict[str, float], weights: dict[str, float]) -> str:
    """The bar's losses as they enter the total. Unweighted, the style term read 5e-7 against the content's 0.02
    while, weighted, it was 3x the content's: people raised style_weight for a style that already dominated."""
    terms = " ".join(f"{key}={weight * losses[key]:.3g}" for key, weight in weights.items())
    return f"weighted: {terms} total={losses['total']:.3g}"


def _diverged(cfg: DictConfig, run: TrainingRun, what: str) -> StyleError:
    # Its resume state goes too: resumed with the same lr (a resume refuses another) it would diverge again. Held: a
    # stop signal right after the removal named the state as the one to continue from.
    with HeldStopSignals():
        run.state_path.unlink(missing_ok=True)
        run.saved = 0
    return StyleError(f"training diverged: {what}; lower lr (now {cfg.lr}), or style_weight / content_weight; "
                      "nothing written")


def _check_finite(cfg: DictConfig, run: TrainingRun, params: list[torch.Tensor], step: int) -> None:
    """A step's update can overflow the weights while its loss was still finite: such weights are never written."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise _diverged(cfg, run, f"step {step} made the network's weights infinite or NaN")


def _out_path(cfg: DictConfig, style_paths: list[Path], folder: Path | None = None) -> Path:
    """`out`, or its default; with `folder` (a sweep job's), its file name in that folder."""
    default = (f"outputs/styles/{cfg.name or style_paths[0].stem}.pt" if cfg.mode == "new_style"
               else f"outputs/styles/bank_{len(style_paths)}styles.pt")
    out = Path(str(cfg.out or default)).expanduser()
    return out if folder is None else folder / out.name


def _output(cfg: DictConfig, style_paths: list[Path], folder: Path | None = None) -> Path:
    """The file the training will write (`_out_path`), refused up front where it is a folder, exists without
    overwrite=true, its folder cannot be made, it (or the resume state beside it) is one of the training's own
    inputs, which overwrite=true would otherwise replace, or its name does not end in an OUT_SUFFIXES suffix."""
    out = check_output(_out_path(cfg, style_paths, folder), overwrite=flag(cfg.get("overwrite", False), "overwrite"))
    inputs = [("vgg", cfg.vgg), *(("style_image", p) for p in style_paths), ("content", cfg.content)]
    if cfg.mode == "new_style" or cfg.init == "bank":
        inputs.append(("bank", cfg.bank or DEFAULT_BANK))
    for target, what in ((out, "out="), (out.with_name(out.name + RESUME_SUFFIX), "the resume state ")):
        for key, path in inputs:
            if same_file(Path(str(path)), target):
                raise OutputError(f"{what}{target} is the {key} file: it would replace the training's own input; "
                                  "choose another out")
        content = Path(str(cfg.content))
        if content.is_dir() and target.suffix.lower() in IMAGE_SUFFIXES and same_file(content, target.parent) \
                and target.exists():
            raise OutputError(f"{what}{target} is one of the content images: it would replace the training's own "
                              "input; choose another out")
    if out.suffix.lower() not in OUT_SUFFIXES:  # after the inputs: replacing one of them is the graver mistake
        written = "style checkpoint" if cfg.mode == "new_style" else "style bank"
        raise OutputError(f"out={out.name}: the {written} is a PyTorch file: end its name in "
                          f"{' or '.join(OUT_SUFFIXES)}")
    return out


def _resume_settings(cfg: DictConfig, style_paths: list[Path]) -> dict:
    """The RESUME_KEYS settings of this run, paths resolved (a resume from another folder names the same files);
    those this mode does not read are left out."""
    def resolved(path) -> str:
        return str(Path(str(path)).expanduser().resolve())

    settings = {key: cfg[key] for key in RESUME_KEYS
                if key not in ("style_image", "content", "vgg", "bank", "init", "init_style")}
    settings.update(mode=cfg.mode, style_image=[resolved(p) for p in style_paths], content=resolved(cfg.content),
                    vgg=resolved(cfg.vgg))
    if cfg.mode == "new_style":
        settings.update(bank=resolved(cfg.bank or DEFAULT_BANK), init_style=cfg.init_style)
    else:
        settings.update(init=cfg.init, **({"bank": resolved(cfg.bank or DEFAULT_BANK)} if cfg.init == "bank" else {}))
    return settings


def _output_settings(cfg: DictConfig, style_paths: list[Path]) -> dict:
    """What an output records of its training (`_save`), for a resumed sweep to tell whether it is this job's."""
    return {**_resume_settings(cfg, style_paths), "steps": int(cfg.steps)}


def _changed(saved: dict, settings: dict, keys: tuple[str, ...]) -> list[str]:
    return [f"{key}={saved.get(key)!r} (now {settings.get(key)!r})" for key in keys
            if saved.get(key) != settings.get(key)]


def _resume_state(cfg: DictConfig, path: Path, settings: dict) -> dict | None:
    """The state to continue from (resume=true), None to start afresh; refused where it would not continue the
    same training, or where a fresh start would silently drop an interrupted run's state."""
    if not flag(cfg.get("resume", False), "resume"):
        if path.exists() and not cfg.get("overwrite", False):
            raise OutputError(f"{path} holds an interrupted training of this out: pass resume=true to continue it, "
                              "or overwrite=true to start over")
        return None
    if not path.is_file():
        print(f"resume=true but no {path} yet: starting from step 0")
        return None
    state = load_file(path, RESUME_FORMAT)
    changed = _changed(state["settings"], settings, RESUME_KEYS)
    if changed:
        raise StyleError(f"{path} was trained with other settings: {', '.join(changed)}; resume with those, or pass "
                         "resume=false overwrite=true to start over")
    if int(state["step"]) > int(cfg.steps):
        raise StyleError(f"{path} is at step {state['step']}, past steps={cfg.steps}: pass steps={state['step']} or "
                         "more")
    return state


def _save_state(path: Path, settings: dict, step: int, network: MultiStyleNet, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, history: list[dict[str, float]]) -> None:
    """What `resume=true` needs to take the same steps as an uninterrupted run: every weight, Adam's moments, and
    the data RNG (crops and style picks) as it stands after `step` steps."""
    atomic_save({"format": RESUME_FORMAT, "step": step, "settings": settings,
                 "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
                 "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "history": history}, path)


def _save(cfg: DictConfig, network: MultiStyleNet, bank: StyleBank | None, style_paths: list[Path], out: Path) -> None:
    """The style checkpoint (new_style) or bank (full), with the settings it was trained with (`_output_settings`)."""
    sources = [f"stylize.train mode={cfg.mode} style_image={p.name} steps={cfg.steps}" for p in style_paths]
    settings = _output_settings(cfg, style_paths)
    if bank is not None:
        index = network.num_styles - 1
        atomic_save({"format": STYLE_FORMAT, "name": cfg.name or style_paths[0].stem, "source": sources[0],
                     "conv_fingerprint": network.conv_fingerprint(), "params": network.style_params(index),
                     "preview": make_previews(network, [index])[0], "settings": settings}, out)
        return
    previews = make_previews(network, list(range(network.num_styles)))
    styles = [StyleInfo(p.stem, s, previews[i]) for i, (p, s) in enumerate(zip(style_paths, sources))]
    atomic_save({**StyleBank(network, styles, licence="trained with stylize.train").to_dict(), "settings": settings},
                out)


@hydra.main(version_base="1.3", config_path="../conf", config_name="stylize_train")
def main(cfg: DictConfig) -> None:
    run, late, job = TrainingRun(), [], SweepJob.current()
    # Ctrl-C, SIGTERM (a scheduler's preemption) and SIGHUP (the terminal closed) stop the training until `out` is in
    # place, and only then: in place of the start-up's handler, which only leaves (in a sweep, common.sweep's
    # stop_later, which stops nothing)
    on_stop_signals(stop_until(lambda: run.written, late))
    if job is not None and (signum := pending_stop()) is not None:  # it came as this job started
        leave(signum, in_job=False)
    try:
        kept = job.finished_earlier(cfg) if job is not None else None
        run.written = kept is not None  # in place already: a stop signal from here stops nothing
        result = None if kept else train(cfg, run, None if job is None else job.folder)
    except UserError as exc:
        if job is None:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            sys.exit(2)
        failed(one_line(exc))  # the later jobs still run; the sweep exits 2 at its end
        return
    except KeyboardInterrupt as exc:
        if job is not None:
            discard_job_folder()
        print(f"error: {run.interrupted(job)}", file=sys.stderr)
        sys.exit(exit_status(exc))
    finally:
        if job is not None:  # until the next job's main: the sweep stops as that job starts, the jobs so far complete
            on_stop_signals(stop_later)
    out = kept or result.out
    print(f"sweep job {job.number}: {out} was complete already: kept" if kept else f"wrote {out}")
    late_signal = late[0] if late else (None if result is None else result.late_signal)
    if job is not None:
        completed(out)
        if late_signal is not None:  # the sweep stops before its next job; after its last one it is a note
            stop_later(late_signal, None)
    elif late_signal is not None:
        print(f"note: {signal.Signals(late_signal).name} came once the output was complete: it is kept",
              file=sys.stderr)

if __name__ == "__main__":
    sys.argv[1:] = hydra_readable(sys.argv[1:], PATH_KEYS, PATH_LIST_KEYS)
    exit_on_bad_overrides(Path(__file__).parent.parent / "conf", "stylize_train", sys.argv[1:])
    main()
