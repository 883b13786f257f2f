"""Shared pytest fixtures. Keep each fixture generic and documented; add new ones below the existing ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch


def _photo(name: str, max_side: int) -> torch.Tensor:
    """A real photo from skimage.data as a uint8 (3, H, W) tensor, shrunk so its longer side is <= max_side."""
    from skimage import data
    from skimage.transform import resize

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1.0:
        size = (round(image.shape[0] * scale), round(image.shape[1] * scale))
        image = (resize(image, size, anti_aliasing=True, preserve_range=True)).round().clip(0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="session")
def real_photos() -> dict[str, torch.Tensor]:
    """Small real photos (uint8 3xHxW, different sizes, longer side <= 256): astronaut, coffee, chelsea."""
    return {name: _photo(name, 256) for name in ("astronaut", "coffee", "chelsea")}


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the device-sensitive tests run their models: cpu (CI) or cuda (a GPU machine)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device under test (`pytest --device cuda` on a GPU machine). On CUDA, TF32 is switched off so the
    parity tests hold their fp32 tolerances: the oracle and our model would otherwise each round differently."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("--device cuda asked for, but torch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


@pytest.fixture()
def ctrl_c():
    """Ctrl-C raises KeyboardInterrupt in this process, as in a program run from a terminal, also where the test
    runner was started in the background with SIGINT ignored (HeldStopSignals leaves an ignored signal ignored)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.fixture
def unhandled():
    """Every stop signal reaches a handler that fails the test unless the command has put its own in place (a
    signal the operating system handled would end pytest); the handlers before the test are back after it."""
    import signal

    from common.signals import STOP_SIGNALS

    def fail(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached no handler of the command")

    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, fail)
    try:
        yield fail
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
