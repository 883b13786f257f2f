"""torch.save of a whole file at once: written beside its target and renamed, with the same bytes every time."""
from __future__ import annotations

from pathlib import Path

import torch

from common.outputs import AtomicOutput


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temp file beside `path`, then rename: readers never see half a file (it replaces `path`).

    Through a file object: given a path, torch.save names the zip's entries after the random temp file
    (`.bank.1a2b3c4d.partial/data.pkl`), so the same object saved twice differed in its bytes."""
    path = Path(path)
    with AtomicOutput(path, overwrite=True) as temp, open(temp, "wb") as file:
        torch.save(obj, file)
    return path
