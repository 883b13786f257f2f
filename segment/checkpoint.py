"""Loading and saving segmenter weights: our own checkpoint format and torchvision's maskrcnn_resnet50_fpn files.

Nothing is downloaded: every loader takes a local path and says which file to pass when it is missing.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from common.device import resolve_device
from common.torch_save import atomic_save
from segment.backbone import ARCHS
from segment.config import ARCHITECTURE_KEYS, SegmenterConfig
from segment.errors import CheckpointError
from segment.model import MaskRCNN, build_model

FORMAT = "instyle-segment-v1"
TORCHVISION_HINT = "segment.checkpoint=/path/to/maskrcnn_resnet50_fpn_coco.pth"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# torchvision's maskrcnn_resnet50_fpn inference defaults; the BatchNorm eps and class count come from the file
TORCHVISION_DEFAULTS: dict[str, Any] = {
    "backbone": "resnet50", "norm": "frozen_bn", "min_size": 800, "max_size": 1333, "score_threshold": 0.05,
    "nms_threshold": 0.5, "detections_per_img": 100,
}
# torchvision runs its COCO v1 weights, and so the models fine-tuned from them, with FrozenBatchNorm eps 0; a model
# it builds without them (weights=None, weights_backbone=None) has trainable BatchNorm, eps 1e-5, and only that
# one's state_dict holds BatchNorm's step counters (`num_batches_tracked`)
COCO_V1_BN_EPS = 0.0
BUILT_BN_EPS = 1e-5
CLASS_SCORES = "roi_heads.box_predictor.cls_score.weight"
# the segment group with the widths of torchvision's detection models for bottleneck (ResNet-50 and up) backbones,
# and the one for basic-block backbones
BACKBONE_GROUPS = {True: ("r50_fpn", "resnet50"), False: ("r18_fpn", "resnet18")}
DDP_PREFIX = "module."


def read_file(path: str | os.PathLike) -> Any:
    """A checkpoint file's contents, loaded weights-only on the CPU; a missing or unreadable file is one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        # torchvision's reference training scripts store their argparse options beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - garbage makes the unpickler fail in many ways; all mean "not a checkpoint"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_unreadable(e)})") from None


def _unreadable(error: Exception) -> str:
    """Why torch.load failed, in one line: torch's messages open with advice on `weights_only` and close with a
    link, the cause in between (a refused global, an unpickler error) or in a miniz error about the zip's end."""
    text = str(error)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return f"Unsupported global: GLOBAL {refused[1]}; a weights-only load reads tensors and plain data only"
    if isinstance(error, EOFError) or "failed finding central directory" in text:
        return "not a complete checkpoint: the file is truncated or empty"
    cause = text.split("WeightsUnpickler error:")[-1].strip()
    return f"{type(error).__name__}: {cause.splitlines()[0]}" if cause else type(error).__name__


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _bare_weights(state: Any) -> dict | None:
    """The state_dict of a file of bare weights: the file's own dict, or its 'model' entry (torchvision's reference
    training scripts save {'model', 'optimizer', 'lr_scheduler', 'args', 'epoch'}), with the 'module.' that a
    DistributedDataParallel or DataParallel model puts before every key taken off; None for anything else."""
    if isinstance(state, dict) and _is_state_dict(state.get("model")):
        state = state["model"]
    if not _is_state_dict(state):
        return None
    if all(k.startswith(DDP_PREFIX) for k in state):
        return {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return state


def _file_backbone(state: dict) -> tuple[str, str] | None:
    """The ResNet (an ARCHS name) a state_dict with torchvision's names was made with, and the evidence: bottleneck
    blocks have a conv3, the depth shows in layer3's block count, ResNeXt in its grouped conv2's weight shape."""
    blocks = {int(k.split(".")[3]) for k in state if re.match(r"backbone\.body\.layer3\.\d+\.", k)}
    conv2 = state.get("backbone.body.layer1.0.conv2.weight")
    if not blocks or conv2 is None or conv2.dim() != 4:
        return None
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state
    depth, grouped = max(blocks) + 1, conv2.shape[1] != conv2.shape[0]
    for name, (block, layers, groups, _) in ARCHS.items():
        if (block.expansion > 1) == bottleneck and layers[2] == depth and (groups > 1) == grouped:
            return name, f"{depth} {'bottleneck' if bottleneck else 'basic'} blocks in layer3"
    return None


def segment_group_hint(backbone: str) -> str:
    """How to run weights of `backbone` (an ARCHS name): the segment group with the widths its block type comes with,
    and the backbone itself where it is not that group's."""
    group, group_backbone = BACKBONE_GROUPS[ARCHS[backbone][0].expansion > 1]
    extra = "" if backbone == group_backbone else f" segment.backbone={backbone}"
    return f"add segment={group}{extra} to the command (or the segment config it was trained with)"


def _torchvision_config(state: dict, path: str | os.PathLike, overrides: dict[str, Any]) -> SegmenterConfig:
    """What a bare state_dict runs with: torchvision's inference defaults, the BatchNorm eps and class count it was
    made with, and the caller's settings (null ones left out), unless the file contradicts them."""
    settings = {**TORCHVISION_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    found = _file_backbone(state)
    if found and found[0] != settings["backbone"]:
        name, evidence = found
        raise CheckpointError(f"{path} holds a {name} backbone ({evidence}) but the segment config is for "
                              f"{settings['backbone']}: {segment_group_hint(name)}")
    steps = any(k.endswith("num_batches_tracked") for k in state)
    settings.setdefault("bn_eps", BUILT_BN_EPS if steps else COCO_V1_BN_EPS)
    scores = state.get(CLASS_SCORES)
    if scores is not None and scores.dim() == 2:
        classes, names = scores.shape[0], settings.get("class_names")
        if settings.setdefault("num_classes", classes) != classes:
            raise CheckpointError(f"{path} has {classes} classes (background included), not segment.num_classes="
                                  f"{settings['num_classes']}: set segment.num_classes={classes}, or leave it null "
                                  "to take the file's")
        if isinstance(names, (list, tuple)) and len(names) != classes:
            raise CheckpointError(f"{path} has {classes} classes (background included) but segment.class_names has "
                                  f"{len(names)} names")
    return SegmenterConfig.from_dict(settings)


def weights_misfit(own: dict, state_dict: dict, shown: int = 3) -> str:
    """Why `state_dict` does not load into a model whose own is `own`, in one line ("" where it does): the keys
    missing, unexpected and of another shape (with both shapes), the first `shown` of each and their count."""
    # BatchNorm bookkeeping that FrozenBatchNorm has no use for is tolerated (FrozenBatchNorm drops it itself)
    ignorable = lambda k: k.endswith("num_batches_tracked")  # noqa: E731
    missing = [k for k in own if k not in state_dict and not ignorable(k)]
    unexpected = [k for k in state_dict if k not in own and not ignorable(k)]
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items() if k in own and v.shape != own[k].shape
    ]
    return "; ".join(
        f"{label} {', '.join(keys[:shown])}{' ...' if len(keys) > shown else ''} ({len(keys)})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys
    )


def _load_weights(model: MaskRCNN, state_dict: dict, path: str | os.PathLike, what: str = "") -> MaskRCNN:
    own = model.state_dict()
    misfit = weights_misfit(own, state_dict)
    if misfit:
        what = what or f"the {model.config.backbone} model"
        raise CheckpointError(f"{path} does not fit {what}: {misfit}")
    # every tensor of the model comes from the file (as the model's dtype: fp16 files are cast back), but for
    # BatchNorm's step counter, which older files may lack
    tensors = {k: state_dict[k].to(v.dtype) if k in state_dict else torch.zeros(v.shape, dtype=v.dtype)
               for k, v in own.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    # the file's tensors replaced the model's, and with them its memory layout
    return model.set_inference_options(channels_last=model.channels_last).eval()


def _empty_model(config: SegmenterConfig) -> MaskRCNN:
    """The model with its tensors on the meta device, for `_load_weights` to fill: random initialisation would
    be overwritten anyway, and costs 0.3 s for the demo model and 0.9 s for R50-FPN on a 2-core CPU."""
    with torch.device("meta"):
        return build_model(config)


def load_torchvision_checkpoint(path: str | os.PathLike, **overrides: Any) -> MaskRCNN:
    """A torchvision maskrcnn_resnet50_fpn (v1) state_dict file -> our model in eval mode.

    The file may be bare weights, a reference training script's checkpoint or a DDP model's ('module.' keys). It
    runs with torchvision's inference settings (800/1333, score 0.05, NMS 0.5, 100 detections) and the BatchNorm
    eps and class count it was made with (names: COCO's for 91 classes, else class_1...), unless overridden.
    """
    return _load_torchvision(read_file(path), path, overrides)


def _load_torchvision(state: Any, path: str | os.PathLike, overrides: dict[str, Any]) -> MaskRCNN:
    weights = _bare_weights(state)
    if weights is None:
        raise CheckpointError(f"{path} is not a torchvision Mask R-CNN state_dict (expected a dict of tensors)")
    model = _empty_model(_torchvision_config(weights, path, overrides))
    what = (f"the {model.config.backbone} model it was read into (a file of bare weights carries no config: "
            "torchvision's R50 unless segment settings say otherwise)")
    return _load_weights(model, weights, path, what)


def save_checkpoint(model: MaskRCNN, path: str | os.PathLike, extra: dict[str, Any] | None = None,
                    weights_dtype: torch.dtype | None = None) -> Path:
    """Writes {"format", "config", "class_names", "model", **extra} atomically (temp file beside it + rename).

    `weights_dtype=torch.float16` halves the file (floating-point tensors only); loading casts back to fp32.
    """
    if model.folded:
        raise CheckpointError("cannot save a model whose frozen BatchNorm is folded into its convs: save the "
                              "model as loaded, before fold_frozen_norms()")
    payload = {
        **(extra or {}),
        "format": FORMAT,
        "config": model.config.to_dict(),
        "class_names": list(model.config.class_names),
        "model": {k: _stored(v, weights_dtype) for k, v in model.state_dict().items()},
    }
    return atomic_save(payload, path)


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def load_checkpoint(path: str | os.PathLike, **config_overrides: Any) -> MaskRCNN:
    """Our checkpoint (config stored inside) or a torchvision state_dict file -> model in eval mode on the CPU.

    Overrides change inference settings (thresholds, sizes, precision...). Our checkpoints carry the
    architecture they were trained with, so overrides of ARCHITECTURE_KEYS apply only to raw torchvision files: on
    ours they are still checked, and those that differ from the file's are named in a note.
    """
    state = read_file(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        if not isinstance(state.get("config"), dict) or not _is_state_dict(state.get("model")):
            raise CheckpointError(f"{path} is an {FORMAT} file without a valid config / model entry")
        settings = {k: v for k, v in config_overrides.items() if k not in ARCHITECTURE_KEYS}
        config = SegmenterConfig.from_dict({**state["config"], **settings})
        # the settings as given, the file's inference ones where none is: a bad architecture value (backbone=foo,
        # bn_eps=-1) is an error even where the file's stands
        given = SegmenterConfig.from_dict({**{k: v for k, v in config.to_dict().items() if k not in ARCHITECTURE_KEYS},
                                           **config_overrides})
        _note_ignored(path, given, config, [k for k in ARCHITECTURE_KEYS if config_overrides.get(k) is not None])
        return _load_weights(_empty_model(config), state["model"], path)
    if _bare_weights(state) is not None:
        return _load_torchvision(state, path, config_overrides)
    raise CheckpointError(f"{path} is neither an {FORMAT} checkpoint nor a Mask R-CNN state_dict")


def _note_ignored(path: str | os.PathLike, given: SegmenterConfig, stored: SegmenterConfig, keys: list[str]) -> None:
    """One note naming the architecture settings given that differ from the checkpoint's, which it runs with.

    A note, not an error: the segment groups set every architecture key (for training), and a checkpoint is often
    rendered under a group it was not trained with (the default, demo); refusing would make each such render list
    segment.KEY=null for all of them. Only a setting that differs is named: the demo group's values are the demo
    checkpoint's own, so the default render says nothing."""
    ignored = [f"segment.{k}={_shown(getattr(given, k))} (the checkpoint's: {_shown(getattr(stored, k))})"
               for k in keys if getattr(given, k) != getattr(stored, k)]
    if ignored:
        print(f"note: {path} runs with the architecture it was trained with: {'; '.join(ignored)} ignored",
              file=sys.stderr)


def _shown(value: Any) -> str:
    """A setting's value for a note: a long list (91 COCO class names) by its first items and length."""
    if not isinstance(value, list):
        return str(value)
    items = value if len(value) <= 6 else [*value[:3], f"... ({len(value)} values)"]
    return f"[{', '.join(map(str, items))}]"


def load_segmenter(cfg: Any) -> MaskRCNN:
    """Hydra `segment` group (config fields + `checkpoint` path + `device`: auto | cpu | cuda) -> ready model.

    Config fields in the group override what a checkpoint stores only where they are set to non-null values.
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    cfg = dict(cfg)
    path = cfg.pop("checkpoint", None)
    device = resolve_device(cfg.pop("device", "auto"), "segment.device")
    if not path:
        hint = TORCHVISION_HINT if cfg.get("backbone", "resnet50") == "resnet50" else "segment.checkpoint=/path/to/segmenter.pt"
        raise CheckpointError(f"no segmenter checkpoint given: pass {hint}")
    overrides = {k: v for k, v in cfg.items() if v is not None}
    # load_checkpoint gives the configured memory layout, and .to keeps it
    return load_checkpoint(project_relative(path), **overrides).to(device).fold_frozen_norms()  # the render only infers


def project_relative(path: str | os.PathLike) -> Path:
    """A relative path from the directory the command runs in or, where nothing is there, from this project, which
    holds the embedded segmenter (conf/segment/demo.yaml): the default works wherever the render runs."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (PROJECT_ROOT / path).exists():
        return path
    return PROJECT_ROOT / path
