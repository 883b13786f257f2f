"""VGG16 feature extractor for the perceptual losses, built from a local torchvision state_dict file."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

from stylize.errors import StyleError

# Index of each ReLU inside torchvision's vgg16().features.
LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}
VGG_HINT = ("pass vgg=/path/to/vgg16-397923af.pth (torchvision's ImageNet vgg16 state_dict, "
            "loaded with weights_only=True)")


class VGG16Features(nn.Module):
    """Frozen VGG16 conv body up to relu4_3; forward(x float B×3×H×W in [0,1]) → {layer name: features}."""

    def __init__(self):
        super().__init__()
        self.features = make_layers(cfgs["D"])[: LAYERS["relu4_3"] + 1]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path | None) -> "VGG16Features":
        if path is None or not Path(path).is_file():
            raise StyleError(f"VGG16 weights {'not given' if path is None else f'not found at {path}'}: {VGG_HINT}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise StyleError(f"cannot read VGG16 weights {path}: {type(exc).__name__}; {VGG_HINT}") from None
        model = cls()
        # torchvision's full vgg16 file also holds the classifier, which the losses never use.
        wanted = {k: v for k, v in state.items() if k.startswith("features.")} if isinstance(state, dict) else {}
        missing = [k for k in model.state_dict() if k.startswith("features.") and k not in wanted]
        if missing:
            raise StyleError(f"{path} is not a torchvision vgg16 state_dict (missing {missing[0]}); {VGG_HINT}")
        model.features.load_state_dict({k.removeprefix("features."): v for k, v in wanted.items()
                                        if int(k.split(".")[1]) <= LAYERS["relu4_3"]})
        return model

    def train(self, mode: bool = True) -> "VGG16Features":
        return super().train(False)  # always in eval mode: a fixed feature extractor

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = (x - self.mean) / self.std
        out, names = {}, {i: name for name, i in LAYERS.items()}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in names:
                out[names[i]] = x
        return out
