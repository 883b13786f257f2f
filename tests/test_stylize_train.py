"""stylize.train on tiny data: a random VGG16 file stands in for torchvision's, 48 px images, a few steps."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from stylize.bank import StyleBank, StyleInfo, sample_photo
from stylize.network import MultiStyleNet
from stylize.vgg import VGG16Features

ROOT = Path(__file__).resolve().parents[1]


def _png(image: torch.Tensor, size: tuple[int, int], path: Path) -> Path:
    small = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0].round()
    Image.fromarray(small.to(torch.uint8).permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stylize_train")
    torch.manual_seed(0)
    vgg = VGG16Features()  # random weights, saved under torchvision's key names
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, root / "vgg16.pth")
    content = root / "content"
    content.mkdir()
    photo = sample_photo("astronaut")
    for i, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        _png(photo[:, y:y + 256, x:x + 256], (48, 48), content / f"{i}.png")
    styles = [_png(sample_photo(n), (48, 64), root / f"{n}.png") for n in ("coffee", "rocket")]
    network = MultiStyleNet(num_styles=3)
    with torch.no_grad():
        for norm in network.norms().values():
            norm.scale.normal_(1, 0.2)
            norm.shift.normal_(0, 0.2)
    bank = StyleBank(network, [StyleInfo(f"s{i}", "test") for i in range(3)]).save(root / "bank.pt")
    return {"root": root, "vgg": root / "vgg16.pth", "content": content, "styles": styles, "bank": bank}


def config(files, **overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "stylize_train.yaml")
    del cfg["hydra"]
    cfg.merge_with({"style_image": str(files["styles"][0]), "content": str(files["content"]), "vgg": str(files["vgg"]),
                    "bank": str(files["bank"]), "steps": 12, "batch_size": 4, "image_size": 48, "style_size": 48,
                    "lr": 0.02, "log_every": 1, "device": "cpu", **overrides})
    return cfg


def test_new_style_learns_only_its_norms(files):
    from stylize.train import train

    result = train(config(files, out=str(files["root"] / "coffee_style.pt")))
    # 4 content images of exactly 48 px: every step sees the same batch, so the losses are comparable
    assert result.history[-1]["style"] < 0.8 * result.history[0]["style"]

    original = StyleBank.load(files["bank"]).network
    trained = result.network.state_dict()
    for key, value in original.state_dict().items():
        kept = trained[key][:3] if ".norm." in key else trained[key]   # other styles' rows, every conv
        assert torch.equal(kept, value), key

    bank = StyleBank.load(files["bank"])
    assert bank.add_from_checkpoint(result.out) == "coffee" and bank.names[-1] == "coffee"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ours = bank.network(x, bank.weights_for("coffee").expand(2, -1))
        assert torch.equal(ours, result.network(x, torch.eye(4)[[3, 3]]))
        assert not torch.allclose(ours, bank.network(x, bank.weights_for("s0").expand(2, -1)))
    assert bank.styles[-1].preview.shape == (3, 96, 96)


def test_full_mode_writes_a_bank(files):
    from stylize.train import train

    cfg = config(files, mode="full", init="scratch", steps=3, style_image=[str(p) for p in files["styles"]],
                 out=str(files["root"] / "full.pt"))
    result = train(cfg)
    bank = StyleBank.load(result.out)
    assert bank.names == ["coffee", "rocket"] and bank.network.num_styles == 2
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in result.history)


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylize.train", *args, f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_missing_vgg_is_one_line_and_exit_status_2(files, tmp_path):
    done = _cli(tmp_path, f"style_image={files['styles'][0]}", f"content={files['content']}", f"bank={files['bank']}")
    assert done.returncode == 2  # as the render and segment.train (it was 1)
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: VGG16 weights not given") and "vgg=" in message and "vgg16-397923af.pth" in message


@pytest.mark.parametrize("missing", ["style_image", "content"])
def test_a_missing_input_is_one_line(files, tmp_path, missing):
    """They were omegaconf's MissingMandatoryValue traceback."""
    given = {"style_image": files["styles"][0], "content": files["content"]}
    done = _cli(tmp_path, *(f"{key}={value}" for key, value in given.items() if key != missing),
                f"vgg={files['vgg']}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: no {missing} given: pass {missing}=PATH"


def test_bad_settings_and_outputs_are_refused_before_training(files, tmp_path, monkeypatch):
    """Each a one-line user error before any step runs (a step would fail the test): an existing output without
    overwrite=true, an output that is a folder or whose folder cannot be made, numbers out of range, a GPU that
    is not there. They surfaced after the training, or as tracebacks."""
    from stylize import train as train_module
    from common.errors import UserError
    from stylize.train import train

    monkeypatch.setattr(train_module.PerceptualLoss, "__call__", lambda *args: pytest.fail("a step ran"))
    existing = tmp_path / "coffee.pt"
    existing.write_bytes(b"the user's")
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    cases = [({"out": str(existing)}, "already exists: pass overwrite=true"),
             ({"out": str(existing), "overwrite": "no"}, "overwrite must be true or false"),
             ({"out": str(tmp_path)}, "is a folder"),
             ({"out": str(blocked / "x.pt")}, "cannot create output folder"),
             ({"log_every": 0}, "log_every must be a whole number >= 1, got 0"),
             ({"steps": -3}, "steps must be a whole number >= 1, got -3"),
             ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
             ({"style_weight": -1.0}, "style_weight must be a finite number >= 0, got -1.0"),
             ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N, got 'gpu'")]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, "device=cuda asked for, but CUDA is not available here"))
    for overrides, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            train(config(files, **overrides))
    assert existing.read_bytes() == b"the user's"


def test_overwrite_replaces_an_existing_output(files, tmp_path):
    from stylize.train import train

    existing = tmp_path / "coffee.pt"
    existing.write_bytes(b"old")
    result = train(config(files, out=str(existing), overwrite=True, steps=1))
    assert result.out == existing and StyleBank.load(files["bank"]).add_from_checkpoint(existing) == "coffee"


def test_interrupt_is_one_line_and_writes_nothing(files, tmp_path):
    """Ctrl-C mid-training: `error: interrupted`, exit 130, no output (it is written only at the end)."""
    import signal
    import time

    out = tmp_path / "styles" / "coffee.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stylize.train", f"style_image={files['styles'][0]}", f"content={files['content']}",
         f"bank={files['bank']}", f"vgg={files['vgg']}", f"out={out}", "steps=100000", "image_size=48",
         "style_size=48", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "run").glob("*.log")):
        time.sleep(0.2)
    time.sleep(3)  # into the training loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: interrupted: nothing written"
    assert not list(out.parent.glob("*"))  # no output, no temp file
