"""stylize.train on tiny data: a VGG16 file of torchvision's randomly initialised vgg16 stands in for its ImageNet
one, 48 px images, a few steps."""
import re
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
from tests.helpers_process import interruptible_popen, run_interruptible, stop_after

ROOT = Path(__file__).resolve().parents[1]


def _png(image: torch.Tensor, size: tuple[int, int], path: Path) -> Path:
    small = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0].round()
    Image.fromarray(small.to(torch.uint8).permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def torchvision_vgg() -> torch.nn.Sequential:
    """torchvision's vgg16().features with its own random initialisation (Kaiming, fan-out), which keeps the
    activations' scale with depth: every style layer's Gram term counts. PyTorch's default conv init (what the VGG
    file was) left relu4_3's Grams ~1e-8, and relu1_2 was in effect the whole style loss."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).features.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, torchvision_vgg):
    root = tmp_path_factory.mktemp("stylize_train")
    # under torchvision's key names, as its vgg16 file; without the classifier, which the losses never read (0.5 GB)
    torch.save({f"features.{k}": v for k, v in torchvision_vgg.state_dict().items()}, root / "vgg16.pth")
    torch.manual_seed(0)
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
    for hydra_key in ("hydra", "defaults"):  # Hydra's own: what the app composes them into
        cfg.pop(hydra_key, None)
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


def test_full_mode_writes_a_bank(files, monkeypatch):
    """Every style trains: each sample draws one of all N styles (12 draws of 2 here, fixed by the seed), and the
    network gets the one-hot row of the style the loss compares it with."""
    from stylize.losses import PerceptualLoss
    from stylize.train import train

    loss_rows, network_rows = [], []
    loss_forward, network_forward = PerceptualLoss.forward, MultiStyleNet.forward

    def loss_recording(self, stylized, content, style_index):
        loss_rows.append(style_index.tolist())
        return loss_forward(self, stylized, content, style_index)

    def network_recording(self, x, style_weights):
        if self.training:  # not the previews' calls after the training
            assert set(style_weights.flatten().tolist()) <= {0.0, 1.0} and style_weights.sum(1).eq(1).all()
            network_rows.append(style_weights.argmax(1).tolist())
        return network_forward(self, x, style_weights)

    monkeypatch.setattr(PerceptualLoss, "forward", loss_recording)
    monkeypatch.setattr(MultiStyleNet, "forward", network_recording)
    cfg = config(files, mode="full", init="scratch", steps=3, style_image=[str(p) for p in files["styles"]],
                 out=str(files["root"] / "full.pt"))
    result = train(cfg)
    bank = StyleBank.load(result.out)
    assert bank.names == ["coffee", "rocket"] and bank.network.num_styles == 2
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in result.history)
    assert len(loss_rows) == 3 and network_rows == loss_rows
    assert {row for step in loss_rows for row in step} == {0, 1}
    for style in range(2):  # a fresh norm's row is scale 1, shift 0
        params = bank.network.style_params(style)
        assert any(not torch.equal(v, torch.ones_like(v) if k.endswith(".scale") else torch.zeros_like(v))
                   for k, v in params.items()), style


def test_full_mode_init_bank_starts_from_the_banks_convolutions(files, tmp_path):
    """init=bank: every convolution starts as the bank's (one step at lr=1e-9 moves them by about 1e-9), the norms
    fresh for the new styles."""
    from stylize.train import train

    result = train(small(files, mode="full", init="bank", lr=1e-9, style_image=[str(p) for p in files["styles"]],
                         out=str(tmp_path / "bank.pt")))
    donor = torch.load(files["bank"], weights_only=True)["state_dict"]
    trained = result.network.state_dict()
    assert set(trained) == set(donor)
    for key, value in trained.items():
        if ".norm." in key:
            fresh = torch.ones(2, value.shape[1]) if key.endswith(".scale") else torch.zeros(2, value.shape[1])
            torch.testing.assert_close(value, fresh, rtol=0, atol=1e-6, msg=lambda text, key=key: f"{key}: {text}")
        else:
            torch.testing.assert_close(value, donor[key], rtol=0, atol=1e-6,
                                       msg=lambda text, key=key: f"{key}: {text}")


def test_the_seed_sets_the_crops(files, tmp_path):
    """Non-square content images (32x64 at image_size=32), so a crop's place depends on the data RNG: the same seed
    trains the same steps, another seed other ones. The fixture's square images fill every crop whatever the RNG."""
    import numpy as np

    from stylize.train import train

    content = tmp_path / "content"
    content.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)).save(content / f"{i}.png")

    def history(seed: int, name: str) -> list[dict[str, float]]:
        return train(small(files, content=str(content), seed=seed, out=str(tmp_path / name))).history

    first = history(1, "a.pt")
    assert history(1, "b.pt") == first
    assert history(2, "c.pt") != first


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylize.train", *args, f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_missing_vgg_is_one_line_and_exit_status_2(files, tmp_path):
    done = _cli(tmp_path, f"style_image={files['styles'][0]}", f"content={files['content']}", f"bank={files['bank']}")
    assert done.returncode == 2  # as the render and segment.train (it was 1)
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: VGG16 weights not given")
    assert "vgg=" in message and "vgg16-397923af.pth" in message


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
             ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
             ({"out": str(tmp_path / "a.txt")},   # it wrote a style checkpoint named a.txt
              "out=a.txt: the style checkpoint is a PyTorch file: end its name in .pt or .pth")]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, "device=cuda asked for, but CUDA is not available here"))
    for overrides, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            train(config(files, **overrides))
    assert existing.read_bytes() == b"the user's"


def test_an_lr_past_adams_float32_step_is_refused(files, tmp_path):
    """lr=1e39 was a RuntimeError traceback from inside Adam's first step: lr / (1 - 0.9) overflows float32."""
    from common.errors import UserError
    from stylize.train import train

    with pytest.raises(UserError, match=re.escape("lr must be at most 3.4e+37 (Adam's float32 step), got 1e+39")):
        train(config(files, lr=1e39, out=str(tmp_path / "coffee.pt")))
    train(small(files, lr=3.4e37, out=str(tmp_path / "coffee.pt"), steps=1))  # the largest allowed lr steps
    assert (tmp_path / "coffee.pt").is_file()


def test_out_is_a_pytorch_file(files, tmp_path):
    """out=a.txt is refused (above); .pth, torchvision's suffix and export_segmenter's other one, is one too."""
    from stylize.train import _output

    for name in ("a.pt", "a.pth", "A.PT"):
        assert _output(small(files, out=str(tmp_path / name)), files["styles"][:1]) == tmp_path / name


def test_a_run_writes_nothing_but_its_output(files, tmp_path):
    """Every run, a refused one too, left ./outputs/stylize_train/<date_time>/ with Hydra's .hydra/ and an empty
    train.log in the folder it ran in."""
    from tests.render_cli import cli_env

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stylize.train", f"style_image={files['styles'][0]}",
                               f"content={files['content']}", f"bank={files['bank']}", *args], cwd=tmp_path,
                              env=cli_env(), capture_output=True, text=True, timeout=300)

    refused = run()
    assert refused.returncode == 2 and refused.stderr.startswith("error: VGG16 weights not given"), refused.stderr
    assert not any(tmp_path.iterdir())
    done = run(f"vgg={files['vgg']}", "out=coffee.pt", "steps=1", "batch_size=1", "image_size=32", "style_size=32",
               "device=cpu")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["coffee.pt"]


def test_overwrite_replaces_an_existing_output(files, tmp_path):
    from stylize.train import train

    existing = tmp_path / "coffee.pt"
    existing.write_bytes(b"old")
    result = train(config(files, out=str(existing), overwrite=True, steps=1))
    assert result.out == existing and StyleBank.load(files["bank"]).add_from_checkpoint(existing) == "coffee"


def test_interrupt_is_one_line_and_writes_nothing(files, tmp_path):
    """Ctrl-C mid-training without resume states: `error: interrupted`, exit 130, no output (it is written only at
    the end)."""
    import signal
    import time

    out = tmp_path / "styles" / "coffee.pt"
    proc = interruptible_popen(
        [sys.executable, "-m", "stylize.train", f"style_image={files['styles'][0]}", f"content={files['content']}",
         f"bank={files['bank']}", f"vgg={files['vgg']}", f"out={out}", "steps=100000", "image_size=48",
         "style_size=48", "device=cpu", "checkpoint_every=0", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run").is_dir():  # Hydra makes it as it starts the job
        time.sleep(0.2)
    time.sleep(3)  # into the training loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: interrupted: nothing written"
    assert not list(out.parent.glob("*"))  # no output, no temp file


# -- the audit's findings --------------------------------------------------------------------------------------


def small(files, **overrides):
    """The fewest pixels and steps that still train: 32 px crops, one step of one image."""
    return config(files, **{"steps": 1, "batch_size": 1, "image_size": 32, "style_size": 32, **overrides})


@pytest.fixture()
def no_step(monkeypatch):
    from stylize import train as train_module

    monkeypatch.setattr(train_module.PerceptualLoss, "__call__", lambda *args: pytest.fail("a step ran"))


def test_new_style_keeps_other_rows_frozen_after_the_network_moves(files, device):
    """The gradient mask was made (`.to(p)`) while the network was still on the CPU in fp32: after `network.to(cuda)`
    the hook mixed devices at the first backward. A move to bf16 here fails the same way on a CPU; `pytest --device
    cuda` moves it to the GPU as well."""
    from stylize.train import _new_style_network

    network, index = _new_style_network(OmegaConf.create({"init_style": None}), StyleBank.load(files["bank"]))
    network.to(device, torch.bfloat16)
    x = torch.rand(1, 3, 16, 16, dtype=torch.bfloat16, device=device)
    network(x, torch.eye(4, dtype=torch.bfloat16, device=device)[[index]]).square().mean().backward()
    for name, p in network.named_parameters():
        if ".norm." in name:
            assert p.grad.dtype == torch.bfloat16 and not p.grad[:index].any() and p.grad[index].any(), name
        else:
            assert p.grad is None, name


def test_a_new_styles_row_starts_from_init_style_or_the_banks_mean(files):
    """init_style=NAME starts the new row from that style's; by default from the mean of the bank's rows (compared
    with the bank file's own tensors)."""
    from stylize.train import _new_style_network

    saved = torch.load(files["bank"], weights_only=True)["state_dict"]
    for init_style, expected in (("s1", lambda rows: rows[1]), (None, lambda rows: rows.mean(0))):
        network, index = _new_style_network(OmegaConf.create({"init_style": init_style}), StyleBank.load(files["bank"]))
        assert index == 3
        for key, value in network.state_dict().items():
            if ".norm." in key:
                torch.testing.assert_close(value[index], expected(saved[key]), rtol=0, atol=1e-6,
                                           msg=lambda text, key=key: f"init_style={init_style} {key}: {text}")


def test_a_final_step_that_makes_the_weights_infinite_writes_nothing(files, tmp_path, monkeypatch):
    """Without resume states (checkpoint_every=0) the weights are checked once, after the last step: its update can
    overflow them while every loss was finite."""
    from stylize.errors import StyleError
    from stylize.train import train

    adam_step, calls = torch.optim.Adam.step, []

    def overflowing(self, *args, **kwargs):
        done = adam_step(self, *args, **kwargs)
        calls.append(None)
        if len(calls) == 2:   # the last of 2 steps
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return done

    monkeypatch.setattr(torch.optim.Adam, "step", overflowing)
    with pytest.raises(StyleError, match=r"^training diverged: step 1 made the network's weights infinite or NaN; "
                                         r"lower lr \(now 0.02\), or style_weight / content_weight; nothing written$"):
        train(small(files, out=str(tmp_path / "coffee.pt"), steps=2, checkpoint_every=0))
    assert len(calls) == 2 and not list(tmp_path.iterdir())


def _tiny_video(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(torch.full((32, 32, 3), 50 * i, dtype=torch.uint8).numpy(), "rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("case", ["vgg", "style_image", "bank", "bank_symlink", "bank_hardlink", "content_video",
                                  "content_image", "resume_state"])
def test_an_output_that_is_an_input_is_refused(files, tmp_path, no_step, case):
    """With overwrite=true the training replaced its own bank, style image, VGG file or content."""
    import shutil

    from common.errors import UserError
    from stylize.train import train

    vgg, style, bank = (Path(shutil.copy(p, tmp_path)) for p in (files["vgg"], files["styles"][0], files["bank"]))
    content = Path(shutil.copytree(files["content"], tmp_path / "content"))
    settings = {"vgg": str(vgg), "style_image": str(style), "bank": str(bank), "content": str(content)}
    out = {"vgg": vgg, "style_image": style, "bank": bank, "content_image": content / "0.png"}.get(case)
    if case == "bank_symlink":
        out = tmp_path / "link.pt"
        out.symlink_to(bank)
    elif case == "bank_hardlink":
        out = tmp_path / "hard.pt"
        out.hardlink_to(bank)
    elif case == "content_video":
        out = _tiny_video(tmp_path / "clip.mp4")
        settings["content"] = str(out)
    elif case == "resume_state":  # the state beside out would replace the VGG file
        settings["vgg"] = str(vgg.rename(tmp_path / "w.pt.resume.pt"))
        out = tmp_path / "w.pt"
    victim = Path(settings["vgg"]) if case == "resume_state" else out
    before = victim.read_bytes()
    with pytest.raises(UserError, match="would replace the training's own input; choose another out"):
        train(small(files, **settings, out=str(out), overwrite=True))
    assert victim.read_bytes() == before


@pytest.mark.parametrize("stems, culprit", [(["coffee", "again/coffee"], "again/coffee.png"),
                                            (["my style"], "my style.png"), (["3"], "3.png"),
                                            (["rocket", "original"], "original.png")])
def test_full_mode_style_names_are_checked_before_training(files, tmp_path, no_step, stems, culprit):
    """Each style of a bank is named after its style image: a name the bank refuses surfaced after the training."""
    import shutil

    from stylize.errors import StyleError
    from stylize.train import train

    paths = []
    for stem in stems:
        (tmp_path / stem).parent.mkdir(parents=True, exist_ok=True)
        paths.append(str(shutil.copy(files["styles"][0], tmp_path / f"{stem}.png")))
    with pytest.raises(StyleError, match=f"mode=full names each style after its file: rename {tmp_path / culprit}$"):
        train(small(files, mode="full", init="scratch", style_image=paths, out=str(tmp_path / "bank.pt")))


@pytest.mark.parametrize("overrides, message", [
    ({"name": "original"}, "is reserved"),
    ({"name": "s0"}, "the bank already has a style named 's0'; pass another name="),
    ({"name": "a b"}, "must start with a letter"),
])
def test_new_style_name_is_checked_before_training(files, tmp_path, no_step, overrides, message):
    from stylize.errors import StyleError
    from stylize.train import train

    with pytest.raises(StyleError, match=message):
        train(small(files, out=str(tmp_path / "x.pt"), **overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 30}, "image_size must be a multiple of 4, got 30"),                   # was MultiStyleNet's
    ({"image_size": 8}, "image_size must be a whole number >= 16, got 8"),                # ValueError after set-up
    ({"style_size": 6}, "style_size must be a whole number >= 16, got 6"),
    ({"seed": "abc"}, "seed must be a whole number from 0 to 18446744073709551615, got 'abc'"),   # ValueError
    ({"seed": 1.5}, "seed must be a whole number from 0 to 18446744073709551615, got 1.5"),       # silently 1
    ({"batch_size": 1.5}, "batch_size must be a whole number >= 1, got 1.5"),
    ({"checkpoint_every": -1}, "checkpoint_every must be a whole number >= 0, got -1"),
    ({"resume": "yes"}, "resume must be true or false, got 'yes'"),
    ({"mode": "full", "style_image": []}, r"style_image=\[\] lists no style image: mode=full needs at least one"),
], ids=["image_size_4", "image_size_small", "style_size_small", "seed_text", "seed_fraction", "batch_size",
        "checkpoint_every", "resume", "no_style_image"])
def test_more_bad_settings_are_one_line_before_training(files, tmp_path, no_step, overrides, message):
    from common.errors import UserError
    from stylize.train import train

    with pytest.raises(UserError, match=f"^{message}$"):
        train(config(files, out=str(tmp_path / "x.pt"), **overrides))


def test_a_diverged_training_writes_nothing(files, tmp_path):
    """lr=1e30 wrote a checkpoint of NaN weights."""
    from stylize.errors import StyleError
    from stylize.train import train

    out = tmp_path / "coffee.pt"
    with pytest.raises(StyleError, match=r"^training diverged: .*; lower lr \(now 1e\+30\).*; nothing written$"):
        train(small(files, out=str(out), lr=1e30, steps=6, checkpoint_every=1))
    assert not list(tmp_path.iterdir())  # neither out nor a resume state of NaN weights, nor a temp file


def _interrupted_run(files, out: Path, monkeypatch, at_step: int, **overrides) -> str:
    """A training stopped by Ctrl-C as step `at_step` begins; its message."""
    from stylize.content import ContentImages
    from stylize.train import Interrupted, train

    batch, calls = ContentImages.batch, 0

    def interrupting(self, *args):
        nonlocal calls
        calls += 1
        if calls > at_step:
            raise KeyboardInterrupt
        return batch(self, *args)

    monkeypatch.setattr(ContentImages, "batch", interrupting)
    with pytest.raises(Interrupted) as stop:
        train(config(files, out=str(out), **overrides))
    monkeypatch.setattr(ContentImages, "batch", batch)
    return str(stop.value)


@pytest.mark.parametrize("mode", ["new_style", "full"])
def test_a_resumed_training_ends_exactly_where_an_uninterrupted_one_does(files, tmp_path, monkeypatch, mode):
    """Nothing was kept on the way: Ctrl-C after hours on a CPU lost them all. The resume state restores the weights,
    Adam's moments and the data RNG (random crops; full mode's random style per sample), so on a CPU the steps after
    a resume are the same to the bit."""
    from stylize.train import train

    extra = {"mode": "full", "init": "scratch", "style_image": [str(p) for p in files["styles"]]} if mode == "full" \
        else {}
    run = {"steps": 3, "batch_size": 2, "image_size": 32, "style_size": 32, **extra}
    whole = train(config(files, out=str(tmp_path / "whole.pt"), checkpoint_every=0, **run))

    out, state = tmp_path / "resumed.pt", tmp_path / "resumed.pt.resume.pt"
    message = _interrupted_run(files, out, monkeypatch, 2, checkpoint_every=1, **run)   # Ctrl-C in step 3
    assert message == (f"interrupted: the state of step 2 of 3 is in {state}; the same command with resume=true "
                       "continues from it")
    assert state.is_file() and not out.exists()
    resumed = train(config(files, out=str(out), checkpoint_every=1, resume=True, **run))
    assert not state.exists() and out.is_file()
    assert resumed.history == whole.history
    expected = whole.network.state_dict()
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_resume_refuses_what_would_not_continue_the_same_training(files, tmp_path, monkeypatch):
    from common.errors import UserError
    from stylize import train as train_module
    from stylize.train import train

    out, state = tmp_path / "coffee.pt", tmp_path / "coffee.pt.resume.pt"
    _interrupted_run(files, out, monkeypatch, 2, steps=3, batch_size=1, image_size=32, style_size=32,
                     checkpoint_every=1)
    monkeypatch.setattr(train_module.PerceptualLoss, "__call__", lambda *args: pytest.fail("a step ran"))
    cases = [({"resume": True, "lr": 0.01}, r"coffee.pt.resume.pt was trained with other settings: lr=0.02 \(now 0.01\)"
                                           r"; resume with those, or pass resume=false overwrite=true to start over$"),
             ({"resume": True, "steps": 1}, r"coffee.pt.resume.pt is at step 2, past steps=1: pass steps=2 or more$"),
             ({}, r"coffee.pt.resume.pt holds an interrupted training of this out: pass resume=true to continue it, "
                  "or overwrite=true to start over$")]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            train(small(files, **{"out": str(out), "steps": 3, **overrides}))
    monkeypatch.undo()
    train(small(files, out=str(out), overwrite=True))   # starts over, and its end removes the old state
    assert out.is_file() and not state.exists()


# Each RESUME_KEYS setting at a value other than `small`'s (init: in mode=full init=bank); "copy": a copy of the
# fixture's file or folder, the same contents under another path.
_OTHER_VALUES = {"mode": {"mode": "full", "init": "scratch"}, "init": {"init": "scratch"},
                 "init_style": {"init_style": "s1"}, "bank": {"bank": "copy"}, "style_image": {"style_image": "copy"},
                 "content": {"content": "copy"}, "vgg": {"vgg": "copy"}, "batch_size": {"batch_size": 2},
                 "image_size": {"image_size": 48}, "style_size": {"style_size": 48}, "lr": {"lr": 0.01},
                 "content_weight": {"content_weight": 2.0}, "style_weight": {"style_weight": 1e3},
                 "tv_weight": {"tv_weight": 1e-3}, "max_video_frames": {"max_video_frames": 100}, "seed": {"seed": 1}}


def test_each_resume_setting_has_another_value_to_test():
    from stylize.train import RESUME_KEYS

    assert set(_OTHER_VALUES) == set(RESUME_KEYS)


@pytest.mark.parametrize("key", _OTHER_VALUES)   # not RESUME_KEYS: a key dropped from it must fail here
def test_resume_refuses_another_value_of_each_resume_setting(files, tmp_path, no_step, key):
    """Each setting that makes the data, the losses, the optimizer or the network trained: a resume with another value
    of it is refused, naming it (init is compared in mode=full init=bank, the mode that reads it)."""
    import shutil

    from common.errors import UserError
    from stylize.bank import atomic_save
    from stylize.train import RESUME_FORMAT, _resume_settings, _style_paths, train

    out = tmp_path / "x.pt"
    base = {"mode": "full", "init": "bank", "style_image": [str(files["styles"][0])]} if key == "init" else {}
    before = small(files, out=str(out), **base)
    atomic_save({"format": RESUME_FORMAT, "step": 1, "settings": _resume_settings(before, _style_paths(before))},
                tmp_path / "x.pt.resume.pt")
    other = dict(_OTHER_VALUES[key])
    if other.get(key) == "copy":
        source = files["styles"][0] if key == "style_image" else files[key]
        copy = tmp_path / f"other_{key}" / Path(source).name
        copy.parent.mkdir()
        other[key] = str(shutil.copytree(source, copy) if Path(source).is_dir() else shutil.copy(source, copy))
    if key == "mode":
        other["style_image"] = [str(files["styles"][0])]
    with pytest.raises(UserError, match="x.pt.resume.pt was trained with other settings: ") as refused:
        train(small(files, out=str(out), resume=True, **{**base, **other}))
    changed = str(refused.value).split("other settings: ", 1)[1]
    assert re.match(f"(.*, )?{key}=.* \\(now .*\\)", changed), changed


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGHUP", 129)])
def test_interrupt_names_the_resume_state(files, tmp_path, signame, status):
    """Ctrl-C once a resume state is written: the one line says where it is and how to continue. SIGHUP (the
    terminal closed) killed the training outright; the exit status is the signal's."""
    import signal
    import time

    out = tmp_path / "styles" / "coffee.pt"
    state = out.with_name("coffee.pt.resume.pt")
    proc = interruptible_popen(
        [sys.executable, "-m", "stylize.train", f"style_image={files['styles'][0]}", f"content={files['content']}",
         f"bank={files['bank']}", f"vgg={files['vgg']}", f"out={out}", "steps=100000", "image_size=32",
         "style_size=32", "batch_size=1", "device=cpu", "checkpoint_every=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not state.exists():
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: interrupted: the state of step ")
    assert last.endswith(f" of 100000 is in {state}; the same command with resume=true continues from it")
    assert state.is_file() and not out.exists()


@pytest.mark.parametrize("signals_before", [1, 2])
def test_a_stop_signal_during_a_state_write_names_that_state(files, tmp_path, monkeypatch, ctrl_c, signals_before):
    """Ctrl-C while a resume state is being renamed into place comes once it is there (AtomicOutput holds it back):
    the message said "nothing written" beside the first state, and named the step before beside a later one."""
    import itertools

    from common import outputs
    from stylize.train import Interrupted, train

    placed = itertools.count(1)
    stop_after(monkeypatch, outputs.AtomicOutput, "_place", lambda output: next(placed) == signals_before)
    out = tmp_path / "coffee.pt"
    state = out.with_name("coffee.pt.resume.pt")
    with pytest.raises(Interrupted) as stop:
        train(small(files, out=str(out), steps=5, checkpoint_every=1))
    assert str(stop.value) == (f"interrupted: the state of step {signals_before} of 5 is in {state}; "
                               "the same command with resume=true continues from it")
    assert torch.load(state, weights_only=True)["step"] == signals_before and not out.exists()


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_a_stop_signal_during_the_outputs_write_keeps_it_and_says_so(files, tmp_path, monkeypatch, ctrl_c,
                                                                      checkpoint_every):
    """Ctrl-C while `out` is being renamed into place comes once it is there: the training is done (its resume
    state removed), not "interrupted: nothing written" beside a finished style whose state a resume then refused."""
    import signal

    from common import outputs
    from stylize.train import train

    out = tmp_path / "coffee.pt"
    stop_after(monkeypatch, outputs.AtomicOutput, "_place", lambda output: output.target == out)
    result = train(small(files, out=str(out), steps=3, checkpoint_every=checkpoint_every))
    assert result.late_signal == signal.SIGINT and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coffee.pt"]  # no resume state, no temp file


def test_a_stop_signal_as_the_finished_trainings_state_goes_keeps_the_output(files, tmp_path, monkeypatch, ctrl_c):
    """The resume state was removed after `out` was in place, outside the block that holds the stop signals: Ctrl-C
    there stopped a finished training as "interrupted: nothing written", beside the style and its resume state."""
    import signal

    from stylize.train import train

    out = tmp_path / "coffee.pt"
    state = out.with_name("coffee.pt.resume.pt")
    stop_after(monkeypatch, Path, "unlink", lambda path: path == state and out.exists())
    try:
        result = train(small(files, out=str(out), steps=2, checkpoint_every=1))
    except KeyboardInterrupt as stop:  # uncaught, it would end the test session
        pytest.fail(f"the finished training was stopped: {stop!r}")
    assert result.late_signal == signal.SIGINT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coffee.pt"]


def test_a_stop_signal_as_a_diverged_trainings_state_goes_names_no_state(files, tmp_path, monkeypatch, ctrl_c):
    """A diverged training removes its resume state (a resume would diverge again): Ctrl-C right after that named the
    removed state as the one to continue from."""
    import itertools

    from stylize.train import Interrupted, train

    state = tmp_path / "coffee.pt.resume.pt"
    unlinks = itertools.count(1)
    stop_after(monkeypatch, Path, "unlink", lambda path: path == state and next(unlinks) == 2)  # 1: a stale one's
    with pytest.raises(Interrupted, match="^interrupted: nothing written$"):
        train(small(files, out=str(tmp_path / "coffee.pt"), lr=1e30, steps=6, checkpoint_every=1))
    assert not list(tmp_path.iterdir())



def test_a_fresh_start_removes_only_dead_runs_temp_states(files, tmp_path):
    """A training that starts afresh removed every temp file of its resume state: a live run's too (another training
    of the same out, writing its state), whose rename then failed. Only those of runs that died go."""
    from common.outputs import AtomicOutput
    from stylize.train import train

    out = tmp_path / "coffee.pt"
    with AtomicOutput(out.with_name("coffee.pt.resume.pt")) as live:  # held (flock) by this process as a run's
        dead = tmp_path / ".coffee.pt.resume.0123abcd.partial.pt"     # a killed run's: no lock held
        dead.write_bytes(b"half of a state")
        train(small(files, out=str(out)))
        assert live.exists() and not dead.exists()


# `python -m stylize.train ARGS` with PATCH run first: Python that patches the function at a phase boundary to send
# the child `signum` (STOP_SIGNAL) once it has returned. RUN=module runs the module as `python -m` does, start-up
# included; RUN=main patches the module's own functions (`module`) and runs its `main` as Hydra's app.
DRIVER = """
import os, runpy, signal, sys
from tests.helpers_process import then_signal
signum = signal.Signals[os.environ["STOP_SIGNAL"]]
sys.argv = ["stylize.train", *sys.argv[1:]]
if os.environ["RUN"] == "module":
    exec(os.environ["PATCH"])
    runpy.run_module("stylize.train", run_name="__main__", alter_sys=True)
else:
    import stylize.train as module
    exec(os.environ["PATCH"])
    module.main.__wrapped__.__module__ = "__main__"  # Hydra finds conf/ from the file, as under `python -m`
    module.main()
"""


def run_stopped(patch: str, args: list[str], signame: str, cwd: Path, run: str = "module"
                ) -> subprocess.CompletedProcess:
    """The child DRIVER runs, its stop signals at their defaults, its output captured."""
    import textwrap

    from tests.render_cli import cli_env

    env = {**cli_env(), "PATCH": textwrap.dedent(patch), "STOP_SIGNAL": signame, "RUN": run}
    return run_interruptible([sys.executable, "-c", DRIVER, *args], cwd=cwd, env=env)


def cli_args(files, out: Path | str, *overrides: str) -> list[str]:
    """The command line of a one-step training of the fewest pixels (`small`'s)."""
    return [f"style_image={files['styles'][0]}", f"content={files['content']}", f"bank={files['bank']}",
            f"vgg={files['vgg']}", f"out={out}", "steps=1", "batch_size=1", "image_size=32", "style_size=32",
            "device=cpu", *overrides]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])  # SIGHUP takes the same handler
def test_a_stop_signal_once_train_has_returned_is_a_note(files, tmp_path, signame):
    """Between `train`'s return (the style in place) and main's last line, a stop signal said "interrupted: nothing
    written", exit 128 + n, beside the finished style."""
    out = tmp_path / "coffee.pt"
    done = run_stopped("module.train = then_signal(module.train, signum)", cli_args(files, out), signame, tmp_path,
                       run="main")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"note: {signame} came once the output was complete: it is kept"
    assert done.stdout.strip().splitlines()[-1] == f"wrote {out}"
    assert [p.name for p in tmp_path.iterdir()] == ["coffee.pt"]


def test_a_stop_signal_during_start_up_is_one_line(files, tmp_path):
    """SIGTERM as the command line's overrides were checked, before Hydra ran main, ended the process silently."""
    done = run_stopped("""
        import common.hydra_cli as cli
        cli.exit_on_bad_overrides = then_signal(cli.exit_on_bad_overrides, signum)
        """, cli_args(files, tmp_path / "coffee.pt"), "SIGTERM", tmp_path)
    assert done.returncode == 143
    assert done.stderr == "error: interrupted before training began: nothing written\n"
    assert not any(tmp_path.iterdir())


# -- the loss math audit's findings ------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _relu_names(features: torch.nn.Sequential) -> dict[int, str]:
    """Index in vgg16().features → VGG's own name for each ReLU (relu<block>_<conv>), counted from the layers, not
    taken from stylize.vgg."""
    names, block, conv = {}, 1, 0
    for index, layer in enumerate(features):
        if isinstance(layer, torch.nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(layer, torch.nn.ReLU):
            conv += 1
            names[index] = f"relu{block}_{conv}"
    return names


def _fast_neural_style(features: torch.nn.Sequential, stylized, content, styles, style_index):
    """The oracle: pytorch/examples fast_neural_style's losses, its formulas written out here (utils.gram_matrix,
    utils.normalize_batch, vgg.Vgg16's slices, neural_style.train's content 1e5 / style 1e10). Its images are in
    [0,255]: ours go in ×255. Returns (content, [style term per layer, weighted])."""
    def normalize_batch(batch):
        mean, std = batch.new_tensor(IMAGENET_MEAN).view(-1, 1, 1), batch.new_tensor(IMAGENET_STD).view(-1, 1, 1)
        return (batch / 255.0 - mean) / std

    def vgg16(x):  # relu1_2, relu2_2, relu3_3, relu4_3
        out = []
        for start, end in ((0, 4), (4, 9), (9, 16), (16, 23)):
            x = features[start:end](x)
            out.append(x)
        return out

    def gram_matrix(y):
        b, ch, h, w = y.size()
        f = y.view(b, ch, w * h)
        return f.bmm(f.transpose(1, 2)) / (ch * h * w)

    gram_style = [[gram_matrix(f) for f in vgg16(normalize_batch(style[None] * 255))] for style in styles]
    features_y, features_x = vgg16(normalize_batch(stylized * 255)), vgg16(normalize_batch(content * 255))
    content_loss = 1e5 * F.mse_loss(features_y[1], features_x[1])
    style_terms = [1e10 * F.mse_loss(gram_matrix(f), torch.cat([gram_style[i][n] for i in style_index.tolist()]))
                   for n, f in enumerate(features_y)]
    return content_loss, style_terms


def test_vgg_and_losses_equal_torchvision_and_fast_neural_style(files, torchvision_vgg):
    """No test compared the loss math with a reference. Our VGG's layers equal torchvision's vgg16().features at
    VGG's relu1_2/2_2/3_3/4_3 on ImageNet-normalised input, given the same weights, and our losses ×1e5 equal
    pytorch/examples fast_neural_style's (content 1e5, style 1e10): a dropped normalisation, a wrong layer index or
    another Gram divisor fails here. The fixture's VGG makes every style layer count (it was relu1_2 alone)."""
    from stylize.losses import PerceptualLoss

    ours = VGG16Features.from_file(files["vgg"])
    generator = torch.Generator().manual_seed(1)
    content, stylized = torch.rand(2, 3, 32, 32, generator=generator), torch.rand(2, 3, 32, 32, generator=generator)
    styles = [torch.rand(3, 40, 48, generator=generator), torch.rand(3, 32, 36, generator=generator)]
    style_index = torch.tensor([1, 0])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        features = ours(content)
        x, expected, names = (content - mean) / std, {}, _relu_names(torchvision_vgg)
        for index, layer in enumerate(torchvision_vgg):
            x = layer(x)
            if index in names:
                expected[names[index]] = x
        for name in ("relu1_2", "relu2_2", "relu3_3", "relu4_3"):   # the style layers; relu2_2 the content's too
            torch.testing.assert_close(features[name], expected[name], rtol=0, atol=2e-6,
                                       msg=lambda text, name=name: f"{name}: {text}")

        weights = {"content_weight": 1.0, "style_weight": 1e5, "tv_weight": 0.5}
        losses = PerceptualLoss(ours, styles, **weights)(stylized, content, style_index)
        content_loss, style_terms = _fast_neural_style(torchvision_vgg, stylized, content, styles, style_index)
    tv = ((stylized[..., 1:, :] - stylized[..., :-1, :]).abs().mean()
          + (stylized[..., :, 1:] - stylized[..., :, :-1]).abs().mean())
    reference = {"content": content_loss, "style": sum(style_terms),
                 "total": content_loss + sum(style_terms) + 1e5 * weights["tv_weight"] * tv}
    ours_scaled = {"content": 1e5 * weights["content_weight"] * losses["content"],
                   "style": 1e5 * weights["style_weight"] * losses["style"], "total": 1e5 * losses["total"]}
    for key, value in reference.items():
        torch.testing.assert_close(ours_scaled[key], value, rtol=1e-5, atol=0,
                                   msg=lambda text, key=key: f"{key}: {text}")
    # PyTorch's default conv init gave relu3_3 5e-7 and relu4_3 2e-8 of it
    assert all(term > 1e-3 * sum(style_terms) for term in style_terms), [float(t) for t in style_terms]


def test_a_vgg19_file_is_refused_in_one_line(tmp_path):
    """VGG19's features hold more layers under other indices (features.17 is a ReLU there): it is not taken for
    VGG16's."""
    from torchvision.models.vgg import cfgs, make_layers

    from stylize.errors import StyleError
    from stylize.vgg import VGG_HINT

    path = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}, path)
    with pytest.raises(StyleError) as refused:
        VGG16Features.from_file(path)
    assert str(refused.value) == (f"{path} is not a torchvision vgg16 state_dict (missing features.17.weight); "
                                  f"{VGG_HINT}")


def test_the_progress_bar_shows_the_weighted_losses(files, tmp_path, capsys):
    """The bar showed the unweighted terms (content=0.0173 style=5.4e-07 while the weighted style term was 3x the
    content's), and users raised style_weight. It shows each term as it enters the total, and the total."""
    from stylize.train import train

    weights = {"content": 2.0, "style": 3e5, "tv": 0.5}
    result = train(small(files, out=str(tmp_path / "x.pt"), steps=2, content_weight=weights["content"],
                         style_weight=weights["style"], tv_weight=weights["tv"]))
    bar = capsys.readouterr().err
    shown = re.findall(r"weighted: content=(\S+) style=(\S+) tv=(\S+) total=([-+.e\d]+)", bar)
    assert shown, bar
    last = result.history[-1]   # the unweighted terms and the weighted total of the last step
    expected = [weights[key] * last[key] for key in ("content", "style", "tv")] + [last["total"]]
    assert [float(v) for v in shown[-1]] == pytest.approx(expected, rel=5e-3)
    assert sum(expected[:3]) == pytest.approx(expected[3], rel=1e-5)


def test_weights_that_would_train_nothing_are_refused_before_any_work(files, tmp_path, monkeypatch):
    """content_weight=0 style_weight=0 trained for the whole run and wrote its starting row as a "trained" style;
    so did style_weight=0 in mode=new_style, where only the new style's row trains. mode=full may train on the
    content alone (an auto-encoder's convolutions for init=bank), and either mode on the style alone."""
    from common.errors import UserError
    from stylize import train as train_module
    from stylize.train import train

    class Started(Exception):
        """The first step began: the settings were accepted."""

    def started(*args):
        raise Started

    monkeypatch.setattr(train_module.PerceptualLoss, "__call__", started)
    both = "content_weight and style_weight are both 0: nothing but tv_weight's smoothing would train; give " \
           r"style_weight \(and content_weight\) a value > 0$"
    new_style = r"style_weight=0 in mode=new_style: nothing would learn the style image's style \(the new style " \
                r"would only redo its content\); give style_weight a value > 0$"
    full = {"mode": "full", "init": "scratch"}
    no_vgg = str(tmp_path / "missing_vgg.pth")   # the VGG file is the first read: the refusals come before it
    for overrides, message in [({"content_weight": 0, "style_weight": 0}, both),
                               ({"content_weight": 0.0, "style_weight": 0.0, "tv_weight": 1.0, **full}, both),
                               ({"style_weight": 0}, new_style), ({"style_weight": 0.0, "tv_weight": 0}, new_style)]:
        with pytest.raises(UserError, match=f"^{message}"):
            train(small(files, vgg=no_vgg, out=str(tmp_path / "x.pt"), **overrides))
    for overrides in ({"content_weight": 0}, {"content_weight": 0, **full}, {"style_weight": 0, **full}):
        with pytest.raises(Started):
            train(small(files, out=str(tmp_path / "x.pt"), **overrides))
    assert not list(tmp_path.iterdir())

    done = _cli(tmp_path, f"style_image={files['styles'][0]}", f"content={files['content']}", f"vgg={no_vgg}",
                "style_weight=0")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert re.fullmatch(f"error: {new_style}", done.stderr.strip()), done.stderr
