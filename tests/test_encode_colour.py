"""pipeline.colour.rgb_to_packed_yuv420 (RGB → yuv420p planes in torch) against swscale's own rgb24 → yuv420p,
the path it replaces in the encoder; VideoWriter with the torch conversion, encoded losslessly and decoded back."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from pipeline.colour import packed_planes_to_rgb, rgb_to_packed_yuv420
from pipeline.decode import probe
from pipeline.encode import SWSCALE_ROUNDING, VideoWriter
from common.errors import SettingError
from pipeline.record import FrameRecord
from tests.helpers_video import exact_rgb, lossless_clip, pattern_frames, psnr

LOSSLESS_420 = {"codec": "libx264", "qp": 0, "preset": "ultrafast", "pix_fmt": "yuv420p"}


def smooth_image(height: int = 64, width: int = 96) -> np.ndarray:
    """Gentle gradients (at most ~2 levels a pixel), the kind of picture 4:2:0 chroma loses almost nothing of."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([30 + 1.5 * xx, 30 + 2 * yy, 128 + 60 * np.sin((xx + yy) / 30)], axis=-1)
    return np.clip(image.round(), 0, 255).astype(np.uint8)


def swscale_yuv420(image: np.ndarray, full_range: bool) -> np.ndarray:
    """swscale's rgb24 -> yuv420p as the encoder asks for it (accurate rounding)."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    return frame.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="JPEG" if full_range else "MPEG",
                          interpolation=SWSCALE_ROUNDING).to_ndarray()


def plane_differences(got: np.ndarray, want: np.ndarray, height: int, width: int) -> dict[str, tuple[int, float]]:
    """{plane: (max, mean) absolute difference} of two packed yuv420p arrays."""
    difference = np.abs(got.astype(int) - want.astype(int)).ravel()
    size = height * width
    planes = {"Y": difference[:size], "U": difference[size:size * 5 // 4], "V": difference[size * 5 // 4:]}
    return {name: (int(d.max()), float(d.mean())) for name, d in planes.items()}


def hwc_to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


# Measured against FFmpeg 8.0's swscale (libswscale 9.5) with accurate rounding on these images, limited range,
# (max, mean) per plane (without it swscale's U and V truncate: means 0.037-0.078):
#   noise:    Y (1, 0.0075)  U (1, 0.0007)  V (1, 0.0039)
#   gradient: Y (1, 0.0091)  U (1, 0.0007)  V (1, 0.0020)
#   photo:    Y (1, 0.0070)  U (1, 0.0022)  V (1, 0.0038)
# Full range the same for Y, but U and V sit ~0.45-0.51 from ours on average (0.54-0.62 without accurate
# rounding): swscale's full-range chroma is about half a code off the formula. The encoder writes limited range.
LIMITS = {False: {"Y": 0.012, "U": 0.01, "V": 0.01}, True: {"Y": 0.012, "U": 0.55, "V": 0.55}}


@pytest.mark.parametrize("full_range", [False, True])
@pytest.mark.parametrize("kind", ["noise", "gradient", "photo"])
def test_matches_swscale(kind, full_range, real_photos, device):
    image = {
        "noise": lambda: np.random.default_rng(7).integers(0, 256, (64, 96, 3), dtype=np.uint8),
        "gradient": lambda: pattern_frames(1, 96, 64)[0],
        "photo": lambda: real_photos["astronaut"].permute(1, 2, 0).numpy(),
    }[kind]()
    height, width = image.shape[:2]
    got = rgb_to_packed_yuv420(hwc_to_tensor(image).to(device), colorspace=1, full_range=full_range)
    assert got.shape == (height * 3 // 2, width) and got.dtype == torch.uint8 and got.device.type == device.type
    differences = plane_differences(got.cpu().numpy(), swscale_yuv420(image, full_range), height, width)
    for plane, (largest, mean) in differences.items():
        # a plain 2x2 chroma mean instead of swscale's filter misses by up to ~25 levels on the noise
        assert largest <= 1 and mean <= LIMITS[full_range][plane], (plane, differences)


def test_a_plain_2x2_chroma_mean_would_fail_the_test_above():
    # swscale filters chroma over more than the 2x2 block, so the thresholds above do notice the difference
    image = np.random.default_rng(7).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    r, g, b = hwc_to_tensor(image).double().reshape(3, 32, 2, 48, 2).mean((2, 4))
    luma = 0.2126 * r + 0.7152 * g + 0.0722 * b
    u = ((b - luma) / 1.8556 * 224 / 255 + 128).round()
    swscale_u = swscale_yuv420(image, full_range=False)[64:64 + 16].reshape(32, 48)
    assert (u - torch.from_numpy(swscale_u).double()).abs().max() > 5


@pytest.mark.parametrize("colorspace", [1, 5])
@pytest.mark.parametrize("full_range", [False, True])
def test_round_trip_through_yuv_to_rgb(colorspace, full_range, device):
    image = smooth_image()
    planes = rgb_to_packed_yuv420(hwc_to_tensor(image).to(device), colorspace, full_range)
    back = packed_planes_to_rgb(planes, "yuv420p", colorspace, full_range).cpu()
    difference = (back.int() - hwc_to_tensor(image).int()).abs()
    # measured: max 4, mean 0.79-0.85 (chroma is shared by 2x2 pixels and read back without interpolation)
    assert difference.max() <= 4 and difference.float().mean() < 1.0, (difference.max(), difference.float().mean())


def test_uniform_colours_are_exact():
    # one colour everywhere: the chroma filter cannot blur anything, so the result is the standard's formula
    image = torch.tensor([200, 30, 90], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 6)
    planes = rgb_to_packed_yuv420(image).int()
    r, g, b = 200 / 255, 30 / 255, 90 / 255
    luma = 0.2126 * r + 0.7152 * g + 0.0722 * b
    want_y, want_u, want_v = (round(luma * 219 + 16), round((b - luma) / 1.8556 * 224 + 128),
                              round((r - luma) / 1.5748 * 224 + 128))
    assert planes[:4].unique().tolist() == [want_y]
    assert planes[4:5].unique().tolist() == [want_u] and planes[5:].unique().tolist() == [want_v]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="even"):
        rgb_to_packed_yuv420(torch.zeros(3, 5, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="even"):
        rgb_to_packed_yuv420(torch.zeros(3, 4, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        rgb_to_packed_yuv420(torch.zeros(4, 4, 4, dtype=torch.uint8))


def writer_for(tmp_path, frames, cfg=LOSSLESS_420, colour="auto", name="out.mp4"):
    info = probe(lossless_clip(tmp_path / f"src-{name}.mkv", frames[:1]))
    return VideoWriter(tmp_path / name, info, cfg, colour=colour)


def encode(writer, images: list[torch.Tensor]):
    writer.write([FrameRecord(index=i, pts=i, time_base=writer.info.time_base, image=image)
                  for i, image in enumerate(images)])
    writer.close()
    with av.open(str(writer.path)) as container:
        decoded = list(container.decode(video=0))
    return decoded


@pytest.mark.parametrize("width, height", [(64, 48), (65, 47)])
def test_writer_with_torch_conversion_round_trips(tmp_path, width, height):
    frames = pattern_frames(4, width, height, seed=3)
    images = [hwc_to_tensor(f) for f in frames]
    writer = writer_for(tmp_path, frames, colour="device")
    assert writer.converts_in_torch(images[0])   # on CPU tensors, so this test exercises the GPU's code path
    decoded = encode(writer, images)
    assert len(decoded) == 4
    even_w, even_h = width + width % 2, height + height % 2
    for frame, image in zip(decoded, images):
        assert (frame.width, frame.height, frame.format.name) == (even_w, even_h, "yuv420p")
        assert (frame.colorspace, frame.color_range) == (1, 1)   # BT.709, limited range, as the stream is tagged
        # qp 0 is lossless: the decoded planes are exactly what the torch conversion of the padded frame gave
        padded = torch.from_numpy(np.pad(image.permute(1, 2, 0).numpy(), ((0, even_h - height), (0, even_w - width),
                                                                          (0, 0)), mode="edge")).permute(2, 0, 1)
        np.testing.assert_array_equal(frame.to_ndarray(), rgb_to_packed_yuv420(padded).numpy())
        # and as RGB they are the input but for what 4:2:0 chroma loses at the edge of pattern_frames' saturated
        # blob. Measured: max 17, mean 1.94, PSNR 39.8 dB (the swscale path: 17, 1.96, 39.7 dB)
        rgb = frame.to_ndarray(format="rgb24")[:height, :width]
        difference = np.abs(rgb.astype(int) - image.permute(1, 2, 0).numpy().astype(int))
        assert difference.max() <= 18 and difference.mean() < 2.05, (difference.max(), difference.mean())
        assert psnr(rgb, image.permute(1, 2, 0).numpy()) > 39.5


def test_torch_and_swscale_paths_encode_the_same_pixels(tmp_path):
    frames = pattern_frames(3, 64, 48, seed=5)
    images = [hwc_to_tensor(f) for f in frames]
    torch_frames = encode(writer_for(tmp_path, frames, colour="device", name="torch.mp4"), images)
    swscale_frames = encode(writer_for(tmp_path, frames, colour="cpu", name="swscale.mp4"), images)
    for a, b in zip(torch_frames, swscale_frames):
        np.testing.assert_allclose(a.to_ndarray().astype(int), b.to_ndarray().astype(int), atol=1, rtol=0)


def test_frames_of_both_paths_carry_the_same_tags(tmp_path):
    frames = pattern_frames(1, 64, 48)
    writer = writer_for(tmp_path, frames)
    try:
        image = hwc_to_tensor(frames[0])
        ours, theirs = writer._torch_frame(image), writer._swscale_frame(image)
        tags = lambda f: (f.format.name, f.width, f.height, f.colorspace, f.color_range,  # noqa: E731
                          f.color_primaries, f.color_trc)
        assert tags(ours) == tags(theirs) == ("yuv420p", 64, 48, 1, 1, 2, 2)
    finally:
        writer.abort()


def test_which_frames_convert_in_torch(tmp_path, device):
    frames = pattern_frames(1, 64, 48)
    image = hwc_to_tensor(frames[0])
    checks = [("auto", LOSSLESS_420, image, False),                                   # CPU frames keep swscale
              ("device", LOSSLESS_420, image, True),
              ("device", {**LOSSLESS_420, "pix_fmt": "yuv444p"}, image, False),       # only yuv420p is written
              ("device", {**LOSSLESS_420, "codec": "libx264rgb", "pix_fmt": "rgb24"}, image, False)]
    if device.type == "cuda":
        checks += [("auto", LOSSLESS_420, image.to(device), True), ("cpu", LOSSLESS_420, image.to(device), False)]
    for i, (colour, cfg, tensor, expected) in enumerate(checks):
        writer = writer_for(tmp_path, frames, cfg, colour, name=f"{i}.mkv")
        try:
            assert writer.converts_in_torch(tensor) is expected, (colour, cfg, tensor.device)
        finally:
            writer.abort()
    with pytest.raises(SettingError, match="colour"):
        writer_for(tmp_path, frames, colour="gpu")


def test_colour_device_says_which_formats_it_leaves_to_swscale(tmp_path, capfd):
    """encode.colour=device with encode.pix_fmt=yuv444p went through swscale without a word."""
    frames = pattern_frames(1, 64, 48)
    yuv444 = {**LOSSLESS_420, "pix_fmt": "yuv444p"}
    for i, (colour, cfg, said) in enumerate([("device", yuv444, True), ("device", LOSSLESS_420, False),
                                             ("auto", yuv444, False), ("cpu", yuv444, False)]):
        writer = writer_for(tmp_path, frames, cfg, colour, name=f"{i}.mkv")
        writer.abort()
        notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("note:")]
        expected = ["note: encode.colour=device converts to yuv420p only: yuv444p goes through swscale"]
        assert notes == (expected if said else []), (colour, cfg)


def test_writer_on_the_device_matches_the_torch_path_on_cpu(tmp_path, device):
    if device.type != "cuda":
        pytest.skip("needs `pytest --device cuda`: on the CPU the test above covers the same code")
    frames = pattern_frames(3, 65, 47, seed=2)
    images = [hwc_to_tensor(f) for f in frames]
    on_device = encode(writer_for(tmp_path, frames, name="gpu.mp4"), [i.to(device) for i in images])
    on_cpu = encode(writer_for(tmp_path, frames, colour="device", name="cpu.mp4"), images)
    for a, b in zip(on_device, on_cpu):
        # same formula, but float rounding on the GPU may land a few values on the other side of .5
        assert np.abs(a.to_ndarray().astype(int) - b.to_ndarray().astype(int)).max() <= 1


@pytest.mark.parametrize("colour, pix_fmt", [("cpu", "yuv420p"), ("device", "yuv420p"), ("cpu", "yuv444p")])
def test_rgb_to_yuv_rounds_without_a_bias(tmp_path, colour, pix_fmt):
    # Flat colour blocks through a lossless encode, read back by the exact formula, come back unshifted. swscale's
    # default rgb24 -> yuv420p truncated its chroma: R, G, B came back -0.32, +0.12, -0.36 (the encoder now asks
    # for accurate rounding). Measured: shifts within ±0.05, the largest difference inside the blocks 1.53 levels
    # (half a code of Y and of V, rounded the same way).
    blocks = np.random.default_rng(4).integers(16, 240, (3, 6, 8, 3), dtype=np.uint8)
    frames = [np.ascontiguousarray(b.repeat(16, 0).repeat(16, 1)) for b in blocks]
    decoded = encode(writer_for(tmp_path, frames, {**LOSSLESS_420, "pix_fmt": pix_fmt}, colour),
                     [hwc_to_tensor(f) for f in frames])
    # away from the blocks' edges, where the chroma filter mixes neighbours
    inside = np.zeros((96, 128), bool)
    inside[np.arange(96) % 16 >= 3, :] = True
    inside[:, np.arange(128) % 16 < 3] = False
    inside[np.arange(96) % 16 >= 13, :] = False
    inside[:, np.arange(128) % 16 >= 13] = False
    difference = np.stack([exact_rgb(frame)[inside] - image[inside] for frame, image in zip(decoded, frames)])
    shift = difference.reshape(-1, 3).mean(0)
    assert np.abs(shift).max() < 0.1 and np.abs(difference).max() < 1.6, (shift, np.abs(difference).max())
