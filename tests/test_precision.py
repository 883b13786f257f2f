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
