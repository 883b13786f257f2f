"""Train styles with perceptual losses: `python -m stylize.train style_image=... content=... vgg=...`.

mode=new_style: one more style for an existing bank. Only the new style's instance-norm scales/shifts learn
  (all convolutions and the other styles' rows are frozen), so it is quick and the result is a small style
  checkpoint that `StyleBank.add_from_checkpoint` appends to that bank.
mode=full: every weight of a network for N style images (from scratch, or starting from the bank's convs);
  the result is a new style bank file (`StyleBank.load`). See conf/stylize_train.yaml.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from common.device import resolve_device
from common.errors import UserError, one_line
from common.outputs import check_output
from common.settings import flag, number, whole
from stylize.bank import STYLE_FORMAT, StyleBank, StyleInfo, atomic_save, make_previews
from stylize.content import ContentImages, read_image, resize_shorter
from stylize.errors import StyleError
from stylize.losses import PerceptualLoss
from stylize.network import MultiStyleNet
from stylize.vgg import VGG16Features


@dataclass
class TrainResult:
    out: Path
    network: MultiStyleNet
    history: list[dict[str, float]] = field(default_factory=list)   # per step: content/style/tv/total


def _check_settings(cfg: DictConfig) -> None:
    """The numbers, before any file is read: one line for a bad one instead of a traceback mid-training."""
    for key in ("steps", "batch_size", "image_size", "style_size", "max_video_frames", "log_every"):
        whole(cfg[key], key, 1)
    number(cfg.lr, "lr", 0, low_open=True)
    for key in ("content_weight", "style_weight", "tv_weight"):
        number(cfg[key], key, 0)


def _style_paths(cfg: DictConfig) -> list[Path]:
    paths = cfg.style_image if isinstance(cfg.style_image, (list, ListConfig)) else [cfg.style_image]
    if cfg.mode == "new_style" and len(paths) != 1:
        raise StyleError(f"mode=new_style trains one style; got {len(paths)} style images")
    return [Path(p) for p in paths]


def _new_style_network(cfg: DictConfig, bank: StyleBank) -> tuple[MultiStyleNet, int]:
    """The bank's network with one more style row, where only that row can change."""
    network = bank.network
    if cfg.init_style is not None:
        start = network.style_params(bank.index(cfg.init_style))
    else:
        start = {k: torch.stack([network.style_params(i)[k] for i in range(len(bank))]).mean(0)
                 for k in network.style_params(0)}
    index = network.append_style(start)
    for name, p in network.named_parameters():
        p.requires_grad_(".norm." in name)
        if ".norm." in name:
            row = F.one_hot(torch.tensor(index), p.shape[0]).to(p)[:, None]
            p.register_hook(lambda grad, row=row: grad * row)  # other styles' rows stay bit-identical
    return network, index


def train(cfg: DictConfig) -> TrainResult:
    for key in ("style_image", "content"):
        if OmegaConf.is_missing(cfg, key):
            raise StyleError(f"no {key} given: pass {key}=PATH")
    if cfg.mode not in ("new_style", "full"):
        raise StyleError(f"mode={cfg.mode}: use new_style or full")
    _check_settings(cfg)
    device = resolve_device(cfg.device)
    vgg = VGG16Features.from_file(cfg.vgg)               # first of the files: the one people forget
    style_paths = _style_paths(cfg)
    out = _output(cfg, style_paths)                      # refused now, not after the training
    generator = torch.Generator().manual_seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    content = ContentImages(cfg.content, int(cfg.image_size), int(cfg.max_video_frames))
    style_images = [resize_shorter(read_image(p), int(cfg.style_size)).to(device) for p in style_paths]
    criterion = PerceptualLoss(vgg.to(device), style_images, cfg.content_weight, cfg.style_weight, cfg.tv_weight)

    bank = None
    if cfg.mode == "new_style":
        bank = StyleBank.load(cfg.bank)
        network, new_index = _new_style_network(cfg, bank)
        network_rows = torch.full((int(cfg.batch_size),), new_index)   # the new row of the network
        style_rows = torch.zeros(int(cfg.batch_size), dtype=torch.long)  # ... trained towards style image 0
        bank.check_new_name(cfg.name or style_paths[0].stem)   # before training, not after
    elif cfg.init == "bank":  # full, starting from the bank's convolutions and fresh norms
        donor = StyleBank.load(cfg.bank).network
        network = MultiStyleNet(**{**donor.hparams, "num_styles": len(style_paths)})
        network.load_state_dict({k: v for k, v in donor.state_dict().items() if ".norm." not in k}, strict=False)
    elif cfg.init == "scratch":
        network = MultiStyleNet(num_styles=len(style_paths))
    else:
        raise StyleError(f"init={cfg.init}: use bank or scratch")
    network.to(device).train()
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=float(cfg.lr))

    history = []
    for step in (bar := tqdm(range(int(cfg.steps)), desc=f"stylize.train {cfg.mode}", unit="step")):
        x = content.batch(int(cfg.batch_size), generator).to(device)
        if bank is None:  # full: each sample trains a random one of the N styles
            style_rows = network_rows = torch.randint(len(style_paths), (x.shape[0],), generator=generator)
        weights = F.one_hot(network_rows, network.num_styles).float().to(device)
        losses = criterion(network(x, weights), x, style_rows.to(device))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
        if step % int(cfg.log_every) == 0:
            bar.set_postfix(style=f"{history[-1]['style']:.3g}", content=f"{history[-1]['content']:.3g}")

    network.eval().cpu()
    _save(cfg, network, bank, style_paths, out)
    return TrainResult(out, network, history)


def _output(cfg: DictConfig, style_paths: list[Path]) -> Path:
    """The file the training will write (`out`, or its default), refused up front where it is a folder, exists
    without overwrite=true, or its folder cannot be made."""
    default = (f"outputs/styles/{cfg.name or style_paths[0].stem}.pt" if cfg.mode == "new_style"
               else f"outputs/styles/bank_{len(style_paths)}styles.pt")
    return check_output(cfg.out or default, overwrite=flag(cfg.get("overwrite", False), "overwrite"))


def _save(cfg: DictConfig, network: MultiStyleNet, bank: StyleBank | None, style_paths: list[Path], out: Path) -> None:
    sources = [f"stylize.train mode={cfg.mode} style_image={p.name} steps={cfg.steps}" for p in style_paths]
    if bank is not None:
        index = network.num_styles - 1
        atomic_save({"format": STYLE_FORMAT, "name": cfg.name or style_paths[0].stem, "source": sources[0],
                     "conv_fingerprint": network.conv_fingerprint(), "params": network.style_params(index),
                     "preview": make_previews(network, [index])[0]}, out)
        return
    previews = make_previews(network, list(range(network.num_styles)))
    styles = [StyleInfo(p.stem, s, previews[i]) for i, (p, s) in enumerate(zip(style_paths, sources))]
    StyleBank(network, styles, licence="trained with stylize.train").save(out)


@hydra.main(version_base="1.3", config_path="../conf", config_name="stylize_train")
def main(cfg: DictConfig) -> None:
    try:
        result = train(cfg)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted: nothing written", file=sys.stderr)  # the output is written only at the end
        sys.exit(130)
    print(f"wrote {result.out}")


if __name__ == "__main__":
    main()
