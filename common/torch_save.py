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
        try:
            torch.save(obj, file)
        except RuntimeError as error:
            # a stop signal mid-write: the zip writer's clean-up then fails ("unexpected pos") and its RuntimeError
            # would hide the KeyboardInterrupt that the command reports in one line
            if isinstance(error.__context__, KeyboardInterrupt):
                raise error.__context__ from None
            raise
    return path
