"""Tiny, randomly initialised model files for render tests and soak runs: a narrow version of
conf/segment/r18_fpn.yaml's segmenter and a 26-style bank of 8-channel networks. They exercise every stage
quickly on a CPU; their outputs mean nothing."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["__background__", "circle", "square", "triangle", "star", "ring"]  # the demo data's classes
STYLE_NAMES = tuple(f"style_{i:02d}" for i in range(26))  # the imported bank's names, which conf/style uses
# Narrower than r18_fpn.yaml: the render is told to take these from the checkpoint (overrides set to null).
TINY_WIDTHS = {"fpn_channels": 32, "representation_size": 64, "mask_head_channels": 32, "mask_head_layers": 1,
               "num_classes": len(CLASS_NAMES), "class_names": CLASS_NAMES}
# Settings that do not change weight shapes: small inputs, few detections, every detection kept.
SEGMENT_RUNTIME = {"min_size": 64, "max_size": 128, "score_threshold": 0.0, "detections_per_img": 4,
                   "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20}


def tiny_segmenter(path: str | Path, seed: int = 0) -> Path:
    """conf/segment/r18_fpn.yaml's segmenter at TINY_WIDTHS with random weights, saved with save_checkpoint."""
    from segment.checkpoint import save_checkpoint
    from segment.config import SegmenterConfig
    from segment.model import build_model

    group = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "segment" / "r18_fpn.yaml"))
    group = {k: v for k, v in group.items() if k not in ("checkpoint", "device")}
    config = SegmenterConfig.from_dict({**group, **TINY_WIDTHS, **SEGMENT_RUNTIME})
    torch.manual_seed(seed)
    return save_checkpoint(build_model(config).eval(), path)


def segment_overrides(checkpoint: Path) -> list[str]:
    """Hydra overrides running `checkpoint` through the r18_fpn group, its widths and classes taken from the file
    (load_segmenter lets a checkpoint's value stand wherever the group's is null)."""
    return ["segment=r18_fpn", f"segment.checkpoint={checkpoint}", *(f"segment.{k}=null" for k in TINY_WIDTHS),
            *(f"segment.{k}={v}" for k, v in SEGMENT_RUNTIME.items())]


def tiny_bank(path: str | Path, names: tuple[str, ...] = STYLE_NAMES, seed: int = 0) -> Path:
    """A random MultiStyleNet (8 channels, 1 residual block) holding `names`, saved as a style bank file."""
    from stylize.bank import StyleBank, StyleInfo
    from stylize.network import MultiStyleNet

    torch.manual_seed(seed)
    network = MultiStyleNet(num_styles=len(names), channels=8, num_residual=1, expand_channels=(8, 4))
    return StyleBank(network, [StyleInfo(name, "random test weights") for name in names]).save(path)


def distinct_styles(bank, seed: int = 0):
    """`bank` with each style given its own random scales and shifts (a fresh network's styles are all the identity
    norm, so every style would look alike); the bank itself, changed in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in bank.network.named_parameters():
            if ".norm." in name:
                param.copy_(param + 0.5 * torch.randn(param.shape, generator=g))
    return bank
