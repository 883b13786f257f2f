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
