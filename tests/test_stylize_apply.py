"""stylize.apply: crop boxes, batched/padded crops vs one crop alone, whole frames, one-hot styles."""
import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import stylize.apply
from stylize.apply import (batch_plan, crop_boxes, crop_factors, pad_bottom_right, run_network, stylize_frames,
                           stylize_regions)
from stylize.bank import sample_photo
from stylize.inference import _interleave_phases, _phase_weight, instance_norm
from stylize.network import INSTANCE_NORM_EPS, MultiStyleNet
from tests.stylize_fixtures import bank, bank_path  # noqa: F401


@pytest.fixture(scope="module")
def frames():
    photo = sample_photo("coffee")                      # 400×600
    small = F.interpolate(photo[None].float(), size=(120, 180), mode="bilinear", antialias=True)
    return torch.cat([small, small.flip(-1)]).round().to(torch.uint8)   # 2 frames, 120×180


def alone(network, frames, index, box, weights):
    """Reference: the crop by itself, padded only to the multiple of 4 the net needs."""
    x1, y1, x2, y2 = box
    crop = frames[index:index + 1, :, y1:y2, x1:x2].float() / 255
    h, w = crop.shape[-2:]
    padded = pad_bottom_right(crop, max(16, -(-h // 4) * 4), max(16, -(-w // 4) * 4))
    return run_network(network, padded, weights[None])[0, :, :h, :w]


def test_crop_boxes_clip_and_snap():
    boxes = torch.tensor([[-5.0, -5.0, 10.0, 10.0], [70.2, 50.0, 79.5, 63.2], [30.5, 20.0, 30.6, 20.1]])
    assert crop_boxes(boxes, height=64, width=80, margin=4) == [(0, 0, 16, 16), (64, 44, 80, 64), (24, 16, 36, 28)]
    boxes = torch.rand(200, 4) * torch.tensor([120.0, 90, 120, 90]) - 10
    boxes[:, 2:] = boxes[:, :2] + torch.rand(200, 2) * 60
    for (bx1, by1, bx2, by2), (x1, y1, x2, y2) in zip(boxes.tolist(), crop_boxes(boxes, 90, 120, 16)):
        assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 90
        assert x1 % 4 == 0 and y1 % 4 == 0 and (x2 % 4 == 0 or x2 == 120) and (y2 % 4 == 0 or y2 == 90)
        assert x1 <= max(0, math.floor(bx1) - 16) and y1 <= max(0, math.floor(by1) - 16)
        assert x2 >= min(120, bx2 + 16) - 1e-6 and y2 >= min(90, by2 + 16) - 1e-6


def test_crop_boxes_snap_to_a_coarser_grid_for_a_downsampled_net():
    boxes = torch.tensor([[-5.0, -5.0, 10.0, 10.0], [70.2, 50.0, 79.5, 63.2], [30.5, 20.0, 30.6, 20.1]])
    want = [(0, 0, 16, 16), (64, 40, 80, 64), (24, 16, 40, 32)]
    assert crop_boxes(boxes, height=64, width=80, margin=4, grid=8) == want


def downsampled_alone(network, image, weights, downsample):
    """Reference for downsample N: the image (1×3×h×w float) averaged over N×N blocks (⌈h/N⌉×⌈w/N⌉, area), padded
    to the multiple of 4 the net needs, stylized, cut, and scaled back to h×w (bilinear)."""
    h, w = image.shape[-2:]
    small = F.interpolate(image, size=(math.ceil(h / downsample), math.ceil(w / downsample)), mode="area")
    sh, sw = small.shape[-2:]
    padded = pad_bottom_right(small, max(16, -(-sh // 4) * 4), max(16, -(-sw // 4) * 4))
    out = network(padded, weights[None])[:, :, :sh, :sw]
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("downsample", [2, 3])
def test_downsampled_crops_and_frames_go_through_the_net_small_and_come_back_full_size(bank, frames, downsample):
    weights = torch.eye(26)[STYLES]
    results = stylize_regions(bank.network, frames, INDEX, BOXES, weights, margin=8, bucket=4, precision="fp32",
                              downsample=downsample)
    with torch.no_grad():
        for k, (box, pixels) in enumerate(results):
            x1, y1, x2, y2 = box
            assert x1 % (4 * downsample) == 0 and y1 % (4 * downsample) == 0  # the net's phase, at its resolution
            bx1, by1, bx2, by2 = BOXES[k].tolist()
            assert x1 <= max(0, bx1 - 8 * downsample) and x2 >= min(180, bx2 + 8 * downsample)  # the net's margin
            assert y1 <= max(0, by1 - 8 * downsample) and y2 >= min(120, by2 + 8 * downsample)
            assert pixels.shape == (3, y2 - y1, x2 - x1)
            crop = frames[int(INDEX[k]):int(INDEX[k]) + 1, :, y1:y2, x1:x2].float() / 255
            want = downsampled_alone(bank.network, crop, weights[k], downsample)
            torch.testing.assert_close(pixels, want, rtol=0, atol=1e-5)
        whole = stylize_frames(bank.network, frames, weights[:2], precision="fp32", downsample=downsample)
        assert whole.shape == frames.shape
        for b in range(2):
            want = downsampled_alone(bank.network, frames[b:b + 1].float() / 255, weights[b], downsample)
            torch.testing.assert_close(whole[b], want, rtol=0, atol=1e-5)
    full = stylize_frames(bank.network, frames, weights[:2], precision="fp32")
    assert (whole - full).abs().mean() > 0.01  # a different texture scale, not the same picture


BOXES = torch.tensor([[20.0, 10, 70, 60], [100, 30, 150, 100], [0, 60, 40, 120], [150, 0, 180, 40], [60, 70, 64, 73]])
INDEX = torch.tensor([0, 0, 1, 1, 0])
STYLES = [3, 7, 19, 0, 12]


def smallest_fitting_factor(box, margin, max_side):
    """The definition `crop_factors` implements: the least N whose crop (margin N·margin, grid 4N) is at most
    max_side px at 1/N."""
    for factor in range(1, 100):
        x1, y1, x2, y2 = crop_boxes(box[None], 120, 180, margin * factor, grid=4 * factor)[0]
        if math.ceil(max(x2 - x1, y2 - y1) / factor) <= max_side:
            return factor, (x1, y1, x2, y2)


def test_max_side_sends_each_large_crop_through_at_the_smallest_factor_that_fits(bank, frames, monkeypatch):
    weights = torch.eye(26)[STYLES]
    shapes = []
    run = stylize.apply.run_network
    monkeypatch.setattr(stylize.apply, "run_network", lambda network, x, *a, **k: shapes.append(x.shape) or
                        run(network, x, *a, **k))
    results = stylize_regions(bank.network, frames, INDEX, BOXES, weights, margin=8, bucket=4, precision="fp32",
                              max_side=40)
    assert all(max(shape[-2:]) <= 40 for shape in shapes)
    factors = []
    with torch.no_grad():
        for k, (box, pixels) in enumerate(results):
            factor, want_box = smallest_fitting_factor(BOXES[k], 8, 40)
            factors.append(factor)
            assert box == want_box and pixels.shape == (3, box[3] - box[1], box[2] - box[0])
            x1, y1, x2, y2 = box
            crop = frames[int(INDEX[k]):int(INDEX[k]) + 1, :, y1:y2, x1:x2].float() / 255
            want = downsampled_alone(bank.network, crop, weights[k], factor)
            torch.testing.assert_close(pixels, want, rtol=0, atol=1e-5)
    assert factors[4] == 1 and max(factors) >= 3  # the 4x3 box stays at full size, the large ones shrink
    # a cap above every crop changes nothing
    uncapped = stylize_regions(bank.network, frames, INDEX, BOXES, weights, margin=8, precision="fp32")
    capped = stylize_regions(bank.network, frames, INDEX, BOXES, weights, margin=8, precision="fp32", max_side=180)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(uncapped, capped))
    whole = stylize_frames(bank.network, frames, weights[:2], precision="fp32", max_side=64)  # 180 px: 1/3
    torch.testing.assert_close(whole, stylize_frames(bank.network, frames, weights[:2], precision="fp32",
                                                     downsample=3), rtol=0, atol=0)


def test_exact_buckets_equal_each_crop_alone(bank, frames):
    weights = torch.eye(26)[STYLES]
    results = stylize_regions(bank.network, frames, INDEX, BOXES, weights, margin=8, bucket=4, max_batch=3)
    for k, (box, pixels) in enumerate(results):
        x1, y1, x2, y2 = box
        assert pixels.shape == (3, y2 - y1, x2 - x1) and pixels.dtype == torch.float32
        assert 0 <= pixels.min() and pixels.max() <= 1
        assert torch.allclose(pixels, alone(bank.network, frames, int(INDEX[k]), box, weights[k]), atol=1e-5)


def test_padded_buckets_stay_close_to_each_crop_alone(bank, frames):
    """Padding to a 32-px bucket changes this net's texture (it sees ~60 px around, and instance-norm
    statistics take in the padding): mean |Δ| was 0.07–0.14 on these 20–68 px crops. The un-padded region
    must still be the same style, aligned, and batching itself must change nothing."""
    weights = torch.eye(26)[STYLES]
    results = stylize_regions(bank.network, frames, INDEX, BOXES, weights, margin=8, bucket=32)
    for k, (box, pixels) in enumerate(results):
        reference = alone(bank.network, frames, int(INDEX[k]), box, weights[k])
        other_style = alone(bank.network, frames, int(INDEX[k]), box, torch.eye(26)[(STYLES[k] + 1) % 26])
        assert (pixels - reference).abs().mean() < 0.2
        assert (pixels - reference).abs().mean() < 0.6 * (other_style - reference).abs().mean()
        same_bucket = stylize_regions(bank.network, frames, INDEX[k:k + 1], BOXES[k:k + 1], weights[k:k + 1],
                                      margin=8, bucket=32)[0]
        assert same_bucket[0] == box and torch.allclose(same_bucket[1], pixels, atol=1e-5)


def test_one_hot_weights_pick_the_style(bank, frames):
    x = frames[:1].float() / 255
    for style in (2, 17):
        out = stylize_frames(bank.network, frames[:1], torch.eye(26)[style], precision="fp32")
        with torch.no_grad():
            expected = bank.network(x, torch.eye(26)[style][None])
        assert out.shape == (1, 3, 120, 180) and torch.allclose(out, expected, atol=1e-5)
    assert (stylize_frames(bank.network, frames[:1], torch.eye(26)[2])
            - stylize_frames(bank.network, frames[:1], torch.eye(26)[17])).abs().mean() > 0.05


def test_each_frame_keeps_its_own_style_past_the_first_batch(bank, frames):
    # three frames at max_batch 2: the second call's frame must take the third row of weights, not the first
    three = torch.cat([frames, frames[:1].flip(-2)])[:, :, :40, :60]
    weights = torch.eye(26)[[2, 17, 5]]
    out = stylize_frames(bank.network, three, weights, max_batch=2, precision="fp32")
    with torch.no_grad():
        expected = torch.cat([bank.network(three[k:k + 1].float() / 255, weights[k:k + 1]) for k in range(3)])
    assert out.shape == (3, 3, 40, 60) and (out - expected).abs().max() < 1e-5


def test_odd_frame_size_and_bf16(bank, frames):
    odd = frames[:, :, :117, :175]
    fp32 = stylize_frames(bank.network, odd, torch.eye(26)[[4, 9]], precision="fp32")
    bf16 = stylize_frames(bank.network, odd, torch.eye(26)[[4, 9]], precision="bf16")
    assert fp32.shape == bf16.shape == (2, 3, 117, 175) and bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().mean() < 0.05


def test_cpu_batches_stop_at_the_pixel_cap(bank, monkeypatch):
    # four 64x64 crops (one bucket) under a cap of two crops' pixels: two batches of two, same results
    frames = torch.randint(0, 256, (1, 3, 96, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[72.0 * k, 0, 72.0 * k + 63, 63] for k in range(4)])
    weights = torch.eye(26)[[1, 5, 9, 13]]
    uncapped = stylize_regions(bank.network, frames, torch.zeros(4, dtype=torch.long), boxes, weights, margin=0)
    sizes = []
    monkeypatch.setattr(stylize.apply, "CPU_BATCH_PIXELS", 2 * 64 * 64)
    monkeypatch.setattr(stylize.apply, "run_network", lambda net, x, *a: sizes.append(len(x)) or run_network(net, x, *a))
    capped = stylize_regions(bank.network, frames, torch.zeros(4, dtype=torch.long), boxes, weights, margin=0)
    assert sizes == [2, 2]
    for (box_a, a), (box_b, b) in zip(uncapped, capped):
        assert box_a == box_b and torch.allclose(a, b, atol=1e-5)


def test_batch_plan_groups_by_padded_size_and_splits_at_the_batch_limit():
    # (h, w) at the net's resolution; bucket 64: 30 and 64 both pad to 64, 65 to 128; sides below 16 pad to 16
    sizes = [(30, 64), (64, 20), (65, 64), (10, 10), (64, 64), (60, 1)]
    assert batch_plan(sizes, 64, max_batch=16, cpu=False) == [((64, 64), [0, 1, 3, 4, 5]), ((128, 64), [2])]
    assert batch_plan(sizes, 64, max_batch=2, cpu=False) == [((64, 64), [0, 1]), ((64, 64), [3, 4]),
                                                             ((64, 64), [5]), ((128, 64), [2])]
    assert batch_plan(sizes, 4, max_batch=16, cpu=False) == [((32, 64), [0]), ((64, 20), [1]), ((68, 64), [2]),
                                                             ((16, 16), [3]), ((64, 64), [4]), ((60, 16), [5])]
    # a CPU's calls hold at most CPU_BATCH_PIXELS padded pixels (4 x 128²): 64² crops 16 at a time, 208² alone
    assert batch_plan(sizes, 64, max_batch=16, cpu=True) == batch_plan(sizes, 64, max_batch=16, cpu=False)
    assert batch_plan([(200, 200)] * 3, 16, max_batch=16, cpu=True) == [((208, 208), [k]) for k in range(3)]
    assert batch_plan([(200, 200)] * 3, 16, max_batch=16, cpu=False) == [((208, 208), [0, 1, 2])]


def test_an_object_near_the_cap_keeps_its_factor_until_it_fits_with_room():
    """crop_factors' step-down rule: at factor 1, a 48x48 box with margin 8 is a 64 px crop; under a cap of 72 it
    fits (so a new object takes 1) but fills more than STEP_DOWN_FILL of the cap (so one at 2 stays at 2). A 32 px
    box (48 px crop, 0.67 of the cap) steps down; an 80 px box grows from 1 whatever it had."""
    boxes = torch.tensor([[40.0, 40, 88, 88], [40, 40, 72, 72], [40, 40, 120, 120]])
    assert 0.8 * 72 < 64 <= 72
    _, fresh = crop_factors(boxes, 200, 200, 8, 1, 72)
    _, kept = crop_factors(boxes, 200, 200, 8, 1, 72, previous=[2, 2, 1])
    assert fresh == [1, 1, 2] and kept == [2, 1, 2]
    _, from_three = crop_factors(boxes, 200, 200, 8, 1, 72, previous=[3, 3, None])
    assert from_three == [2, 1, 2]  # down as far as the room allows: 3 -> 2 for the 48 px box, 3 -> 1 for the 32
    _, uncapped = crop_factors(boxes, 200, 200, 8, 2, None, previous=[3, 3, 3])
    assert uncapped == [2, 2, 2]  # without a cap every crop takes downsample


def test_runner_and_its_cuda_graphs_compute_the_network(bank, device):
    """run_network goes through stylize.inference.StyleRunner (weights prepared once, one style-table matmul,
    CUDA graphs on a GPU): it must give what MultiStyleNet.forward gives, graph replays and padded batches included."""
    network = copy.deepcopy(bank.network).to(device)
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 64, 80, generator=generator).to(device)
    weights = torch.rand(3, 26, generator=generator).softmax(-1).to(device)
    with torch.no_grad():
        expected = network(x, weights)
    for channels_last in (False, True):  # one image goes to batch norm as it is, several through the NCHW view
        for batch in (1, 3):
            eager = run_network(network, x[:batch], weights[:batch], precision="fp32", channels_last=channels_last)
            assert (eager - expected[:batch]).abs().max() < 1e-5
    # batch 3 is captured on its second call (padded to 4), batch 2 on its second; then the two graphs, which
    # share their input and output buffers, replay in turns
    for batch in (3, 3, 3, 2, 2, 3, 2, 3, 2):
        graphed = run_network(network, x[:batch], weights[:batch], precision="fp32", graphs=True)
        assert (graphed - expected[:batch]).abs().max() < 1e-5
    bf16_eager = run_network(network, x, weights, precision="bf16")
    for _ in range(3):
        assert (run_network(network, x, weights, precision="bf16", graphs=True) - bf16_eager).abs().max() < 1e-2
    assert (bf16_eager - expected).abs().mean() < 0.02


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [(12, 10), (48, 40)])  # below and above the CPU's group-norm threshold
@pytest.mark.parametrize("channels", [8, 32])          # below and above the CPU's channels_last group-norm threshold
@pytest.mark.parametrize("batch", [1, 3])
def test_instance_norm_takes_a_scale_and_shift_per_image(device, layout, size, channels, batch):
    """Each branch of the runner's instance norm (batch norm on a GPU; on a CPU group norm of NCHW views, and for
    channels_last group norm or batch norm image by image) against float64 instance norm with each image's own
    affine."""
    generator = torch.Generator().manual_seed(batch)
    h = (torch.randn(batch, channels, *size, generator=generator) * 3 + 1).to(device).contiguous(memory_format=layout)
    scale, shift = torch.rand(2, batch * channels, generator=generator).to(device)
    expected = (F.instance_norm(h.double(), eps=INSTANCE_NORM_EPS) * scale.double().view(batch, channels, 1, 1)
                + shift.double().view(batch, channels, 1, 1))
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.05)):
        out = instance_norm(h.to(dtype), scale.to(dtype), shift.to(dtype))
        assert out.shape == h.shape and out.dtype == dtype
        if device.type == "cpu":  # a CPU keeps the layout (a GPU's batch of several goes through an NCHW view)
            assert out.is_contiguous(memory_format=layout)
        assert (out.double() - expected).abs().max() < tolerance


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7)])
def test_upsampling_by_phases_is_the_upsampled_conv(device, layout, size):
    """The runner's upsampling layers convolve four phases at the input's resolution and interleave them: in float64
    exactly (to rounding) the reflect-padded 3x3 conv of the input upsampled ×2, edges and one-pixel inputs included,
    in the layout asked for."""
    generator = torch.Generator().manual_seed(size[1])
    x = torch.randn(2, 5, *size, generator=generator, dtype=torch.float64).to(device)
    weight = torch.randn(3, 5, 3, 3, generator=generator, dtype=torch.float64).to(device)
    expected = F.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), [1] * 4, mode="reflect"), weight)
    phases = F.conv2d(F.pad(x.contiguous(memory_format=layout), [1] * 4, mode="replicate"), _phase_weight(weight))
    out = _interleave_phases(phases, layout)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=layout)
    assert (out - expected).abs().max() < 1e-12


def test_runner_follows_weight_changes(bank):
    network = copy.deepcopy(bank.network)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    one_hot = torch.eye(26)[[7]]
    before = run_network(network, x, one_hot, precision="fp32")
    with torch.no_grad():
        network.res[0][0].conv.weight.add_(0.05)  # in place, as an optimizer step changes it
    after = run_network(network, x, one_hot, precision="fp32")
    with torch.no_grad():
        assert torch.allclose(after, network(x, one_hot), atol=1e-5) and (after - before).abs().max() > 1e-3
    # a conv weight reaches a CPU fp32 runner through shared storage even from a stale runner; a style's norm
    # scale and shift (what mode=new_style trains) only through the style table a rebuilt runner makes
    with torch.no_grad():
        network.res[0][0].norm.scale.mul_(2.0)
        network.res[0][0].norm.shift.add_(0.1)
    restyled = run_network(network, x, one_hot, precision="fp32")
    with torch.no_grad():
        assert torch.allclose(restyled, network(x, one_hot), atol=1e-5) and (restyled - after).abs().max() > 1e-3
    index = network.append_style(network.style_params(2))  # new Parameter objects
    assert torch.allclose(run_network(network, x, torch.eye(27)[[index]], precision="fp32"),
                          run_network(network, x, torch.eye(27)[[2]], precision="fp32"), atol=1e-6)


@pytest.mark.parametrize("size", [(16, 10), (10, 16)])
def test_a_side_that_is_not_a_multiple_of_4_is_refused(size):
    # the two stride-2 convs and the two x2 upsamplings give back the input's size only for multiples of 4
    network = MultiStyleNet(num_styles=2, channels=8, num_residual=1)
    with pytest.raises(ValueError, match="multiples of 4"), torch.no_grad():
        network(torch.rand(1, 3, *size), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="multiples of 4"):
        run_network(network, torch.rand(1, 3, *size), torch.tensor([[1.0, 0.0]]), precision="fp32")


def test_padding_stops_at_the_frame_and_at_max_side(bank, frames, monkeypatch):
    """A bucket past the frame padded each crop past it (bucket 1024 on a 256² frame: 1024² inputs), and the
    bucket's round-up came after max_side's cap (max_side 100, bucket 64: 128² inputs). Each padded side stops at
    the frame's side at the crop's factor, and at max_side, rounded up to 4, never below what the crop needs."""
    assert batch_plan([(100, 100)], 1024, 16, cpu=False, limits=[(256, 256)]) == [((256, 256), [0])]
    assert batch_plan([(100, 100), (30, 30)], 64, 16, cpu=False, limits=[(102, 101)] * 2) == [
        ((104, 104), [0]), ((64, 64), [1])]
    assert batch_plan([(100, 100)], 64, 16, cpu=False, limits=[(50, 50)]) == [((100, 100), [0])]
    shapes = []
    run = stylize.apply.run_network
    monkeypatch.setattr(stylize.apply, "run_network", lambda network, x, *a, **k: shapes.append(x.shape[-2:]) or
                        run(network, x, *a, **k))
    weights = torch.eye(26)[STYLES]
    for bucket, downsample, max_side, frame_cap in ((1024, 1, None, (120, 180)), (1024, 2, None, (60, 92)),
                                                    (64, 1, 50, (52, 52)), (64, 2, 34, (36, 36))):
        shapes.clear()
        results = stylize_regions(bank.network, frames, INDEX, BOXES, weights, margin=8, bucket=bucket,
                                  precision="fp32", downsample=downsample, max_side=max_side)
        assert shapes and all(h <= frame_cap[0] and w <= frame_cap[1] for h, w in shapes), (bucket, shapes)
        assert all(pixels.shape[-2:] == (y2 - y1, x2 - x1) for (x1, y1, x2, y2), pixels in results)


def test_running_the_module_says_it_is_a_library():
    # `python -m stylize.apply --help` printed nothing and exited 0
    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run([sys.executable, "-m", "stylize.apply", "--help"], capture_output=True, text=True,
                           timeout=120, cwd=root)
    assert shown.returncode == 0 and "A library, not a command" in shown.stdout, shown
    assert "pipeline/stylize_stage.py" in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "stylize.apply"], capture_output=True, text=True, timeout=120,
                             cwd=root)
    assert refused.returncode == 2 and "error: nothing to run: this is a library" in refused.stderr, refused
