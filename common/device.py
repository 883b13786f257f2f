"""The `device` setting every entry point takes: auto, cpu, cuda or cuda:N."""
from __future__ import annotations

import torch

from common.errors import SettingError


def resolve_device(name, key: str | None = "device") -> torch.device:
    """auto is a CUDA GPU when torch sees one, else the CPU; a CUDA device this machine lacks is refused here,
    in one line, not by the first tensor moved to it. `key`: the setting's name for the message; None where the
    caller names it (argparse: "argument --device: ...")."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    given, use = (f"{key}={name}", f"{key}=auto or {key}=cpu") if key else (name, "auto or cpu")
    if device is None or device.type not in ("cpu", "cuda"):
        raise SettingError(f"{key + ' ' if key else ''}must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"{given} asked for, but CUDA is not available here: use {use}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SettingError(f"{given}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
