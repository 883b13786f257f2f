"""precision=auto: bf16 exactly where the device has bf16 arithmetic units, for the segmenter and the style network."""
import pytest
import torch

import gpu.precision
from gpu.precision import resolve_precision
from segment.config import SegmenterConfig
from segment.model import build_model
from stylize.apply import run_network
from stylize.network import MultiStyleNet

CPU = torch.device("cpu")


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                        (False, True, "bf16"), (True, True, "bf16")])
def test_auto_follows_the_cpus_bf16_units(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert resolve_precision("auto", CPU) == expected
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, CPU) == explicit


def test_auto_on_a_gpu_asks_that_gpu_not_the_current_one(monkeypatch):
    """A machine with an A100 (cuda:0, current) and a V100 (cuda:1, no bf16 units): device=cuda:1 is fp32.
    torch.cuda.is_bf16_supported answers for the current GPU whatever the device."""
    from types import SimpleNamespace

    majors = {0: 8, 1: 7}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=majors[torch.device(device).index or 0]))
    assert [resolve_precision("auto", torch.device(name)) for name in ("cuda:0", "cuda:1")] == ["bf16", "fp32"]


def test_a_torch_without_the_cpu_probes_keeps_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert resolve_precision("auto", CPU) == "fp32"


def same_detections(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.boxes, b.boxes), (a.scores, b.scores), (a.labels, b.labels),
                                              (a.masks, b.masks))) if len(a) == len(b) else False


@pytest.mark.parametrize("native", [False, True])
def test_segmenter_auto_runs_what_it_resolves_to(real_photos, monkeypatch, native):
    monkeypatch.setattr(gpu.precision, "native_bf16", lambda device: native)
    torch.manual_seed(0)
    model = build_model(SegmenterConfig(
        backbone="resnet18", norm="gn", fpn_channels=64, representation_size=128, mask_head_channels=64,
        num_classes=3, min_size=128, max_size=192, score_threshold=0.0, detections_per_img=20)).eval()
    frames = [real_photos["coffee"]]
    auto = model.set_inference_options(precision="auto").predict(frames)[0]
    resolved, other = ("bf16", "fp32") if native else ("fp32", "bf16")
    assert same_detections(auto, model.set_inference_options(precision=resolved).predict(frames)[0])
    # the two precisions do give different detections, so the equality above tells them apart
    assert not same_detections(auto, model.set_inference_options(precision=other).predict(frames)[0])


def test_segmenter_features_of_a_narrow_frame_match_fp32_on_a_cpu():
    """oneDNN's bf16 stride-2 convs with a one-pixel-wide output come out wrong on x86 CPUs (torch 2.14.1): a frame
    whose padded batch is 32 px wide got features 10-40 % off fp32 in bf16, or NaN. The segmenter runs such a
    batch's backbone in fp32 on a CPU, and a wider one still in bf16."""
    torch.manual_seed(0)
    model = build_model(SegmenterConfig(
        backbone="resnet18", norm="gn", fpn_channels=64, representation_size=128, mask_head_channels=64,
        num_classes=3, min_size=128, max_size=192)).eval()

    def features(frame, precision):
        model.set_inference_options(precision=precision)
        with torch.inference_mode():
            batch = model.transform.uint8_batch(frame[None])
            return batch.tensors.shape[-1], model._dense(batch)[0]

    narrow = torch.randint(0, 256, (3, 1200, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    width, bf16 = features(narrow, "bf16")
    _, fp32 = features(narrow, "fp32")
    assert width == 32
    for level in fp32:
        assert torch.isfinite(bf16[level]).all()
        assert (bf16[level].float() - fp32[level]).abs().max() <= 0.05 * fp32[level].abs().max(), level
        # a CPU whose bf16 convs are right passes the bound above in bf16 too: the fp32 run itself is what is asked
        assert bf16[level].dtype == torch.float32 and torch.equal(bf16[level], fp32[level]), level
    wide = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    width, bf16 = features(wide, "bf16")
    assert width > 32 and bf16["0"].dtype == torch.bfloat16


def test_segmenter_runs_proposals_and_roi_heads_in_bf16():
    torch.manual_seed(0)
    model = build_model(SegmenterConfig(
        backbone="resnet18", norm="gn", fpn_channels=64, representation_size=128, mask_head_channels=64,
        num_classes=3, min_size=128, max_size=192, score_threshold=0.0)).eval()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.dtype
        return hook

    model.roi_heads.box_head.fc6.register_forward_hook(record("box head"))
    model.roi_heads.mask_head.register_forward_hook(record("mask head"))
    frame = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert len(model.set_inference_options(precision="bf16").predict(frame)[0]) > 0  # the mask head ran
    assert seen == {"box head": torch.bfloat16, "mask head": torch.bfloat16}


def test_segmenter_refuses_an_unknown_precision():
    model = build_model(SegmenterConfig(backbone="resnet18", norm="gn", fpn_channels=32, representation_size=32,
                                        mask_head_channels=32, num_classes=2))
    with pytest.raises(ValueError, match=r"^precision must be auto, fp32, bf16 or fp16, got 'bf61'$"):
        model.set_inference_options(precision="bf61")
    assert model.precision == SegmenterConfig().precision


@pytest.mark.parametrize("native", [False, True])
def test_style_network_auto_runs_what_it_resolves_to(monkeypatch, native):
    monkeypatch.setattr(gpu.precision, "native_bf16", lambda device: native)
    torch.manual_seed(0)
    network = MultiStyleNet(num_styles=4).eval()
    x = torch.rand(2, 3, 32, 48)
    weights = torch.eye(4)[[1, 3]]
    auto = run_network(network, x, weights, precision="auto")
    resolved, other = ("bf16", "fp32") if native else ("fp32", "bf16")
    assert torch.equal(auto, run_network(network, x, weights, precision=resolved))
    assert not torch.equal(auto, run_network(network, x, weights, precision=other))
