"""Perceptual losses (Johnson et al. 2016): Gram-matrix style loss, feature content loss, total variation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stylize.vgg import VGG16Features

STYLE_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
CONTENT_LAYER = "relu2_2"


def gram(features: Tensor) -> Tensor:
    """B×C×H×W → B×C×C, divided by C·H·W so image size does not set the loss scale."""
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def total_variation(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class PerceptualLoss(nn.Module):
    """loss(stylized, content, style_index) for a fixed set of style images (one Gram target set each)."""

    def __init__(self, vgg: VGG16Features, style_images: list[Tensor], content_weight: float = 1.0,
                 style_weight: float = 1e5, tv_weight: float = 1e-4):
        super().__init__()
        self.vgg = vgg
        self.weights = {"content": content_weight, "style": style_weight, "tv": tv_weight}
        with torch.no_grad():
            targets = [self.vgg(image[None]) for image in style_images]
        for layer in STYLE_LAYERS:  # (num_styles, C, C) per layer
            self.register_buffer(f"gram_{layer}", torch.cat([gram(t[layer]) for t in targets]))

    def forward(self, stylized: Tensor, content: Tensor, style_index: Tensor) -> dict[str, Tensor]:
        out = self.vgg(stylized)
        with torch.no_grad():
            content_features = self.vgg(content)[CONTENT_LAYER]
        losses = {
            "content": F.mse_loss(out[CONTENT_LAYER], content_features),
            "style": sum(F.mse_loss(gram(out[layer]), getattr(self, f"gram_{layer}")[style_index])
                         for layer in STYLE_LAYERS),
            "tv": total_variation(stylized),
        }
        losses["total"] = sum(self.weights[k] * v for k, v in losses.items())
        return losses
