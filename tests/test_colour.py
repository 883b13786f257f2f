"""pipeline.colour (YUV → RGB in torch) against swscale (PyAV's rgb24) and against the analytic BT.601/709
forward transform; the host converter and the default CPU decode against the exact conversion; VideoReader with
colour on the device and with a stand-alone decoder context."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from pipeline.colour import coefficients, host_yuv_to_rgb, packed_planes_to_rgb, yuv_to_rgb
from pipeline.decode import VideoReader, _decode_frames, yuv_planes
from common.errors import SettingError
from tests.helpers_video import exact_rgb, pattern_frames, write_clip


def photo_clip(path, colorspace: int, color_range: int, pix_fmt: str = "yuv420p", height: int = 120):
    from skimage import data

    photo = np.ascontiguousarray(data.astronaut()[::2, ::2][:height, :160])
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 160, height, pix_fmt
        stream.codec_context.colorspace, stream.codec_context.color_range = colorspace, color_range
        frame = av.VideoFrame.from_ndarray(photo, format="rgb24")
        frame.colorspace, frame.color_range = colorspace, color_range
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("colorspace, color_range, pix_fmt", [
    (1, 1, "yuv420p"),    # BT.709, limited range (HD video)
    (5, 1, "yuv420p"),    # BT.601, limited
    (2, 0, "yuv420p"),    # untagged: BT.601 limited, as swscale assumes
    (1, 2, "yuvj420p"),   # BT.709, full range
])
@pytest.mark.parametrize("layout", ["planar", "nv12"])
def test_matches_swscale(tmp_path, colorspace, color_range, pix_fmt, layout):
    with av.open(str(photo_clip(tmp_path / "c.mp4", colorspace, color_range, pix_fmt))) as container:
        frame = next(container.decode(video=0))
    want = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).int()
    source = frame.reformat(format="nv12") if layout == "nv12" else frame
    got = packed_planes_to_rgb(torch.from_numpy(source.to_ndarray()), source.format.name, frame.colorspace,
                               frame.color_range == 2).int()
    difference = (got - want).abs()
    # swscale's fixed-point path lands about one level below the exact formula on limited-range input
    assert difference.max() <= 3 and difference.float().mean() < 1.3, (difference.max(), difference.float().mean())


def test_heights_of_4k_plus_2_rows(tmp_path):
    # 118 rows (like 270 or 1078): each chroma plane is 59 x 80 values, half a row of the packed array short
    with av.open(str(photo_clip(tmp_path / "c.mp4", 1, 1, height=118))) as container:
        frame = next(container.decode(video=0))
    want = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).int()
    got = packed_planes_to_rgb(torch.from_numpy(frame.to_ndarray()), "yuv420p", 1, False).int()
    assert got.shape == want.shape == (3, 118, 160) and (got - want).abs().max() <= 3


@pytest.mark.parametrize("colorspace", [1, 5])
@pytest.mark.parametrize("full_range", [False, True])
def test_inverts_the_analytic_forward_transform(colorspace, full_range):
    # RGB with one colour per 2x2 block (so 4:2:0 loses nothing) → exact YUV by the standard's formula → back.
    g = torch.Generator().manual_seed(colorspace)
    rgb = torch.randint(0, 256, (3, 8, 10), generator=g).float().repeat_interleave(2, 1).repeat_interleave(2, 2)
    kr, kb = coefficients(colorspace)
    r, gr, b = rgb / 255
    luma = kr * r + (1 - kr - kb) * gr + kb * b
    cb, cr = (b - luma) / (2 * (1 - kb)), (r - luma) / (2 * (1 - kr))
    if full_range:
        y, u, v = luma * 255, cb * 255 + 128, cr * 255 + 128
    else:
        y, u, v = luma * 219 + 16, cb * 224 + 128, cr * 224 + 128
    quantize = lambda p: p.round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    back = yuv_to_rgb(quantize(y), quantize(u[::2, ::2]), quantize(v[::2, ::2]), colorspace, full_range)
    assert (back.int() - rgb.int()).abs().max() <= 2   # 8-bit YUV quantisation only


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="even"):
        packed_planes_to_rgb(torch.zeros(9, 7, dtype=torch.uint8), "yuv420p", 1, False)
    with pytest.raises(ValueError, match="layout"):
        packed_planes_to_rgb(torch.zeros(6, 4, dtype=torch.uint8), "yuv444p", 1, False)


def test_reader_with_colour_on_device_matches_swscale(tmp_path, device):
    frames = pattern_frames(6, 64, 48)
    path = write_clip(tmp_path / "in.mp4", frames, pts=[0, 1, 3, 4, 7, 9], time_base=Fraction(1, 24))
    on_cpu = [r for b in VideoReader(path, batch_size=4, colour="cpu") for r in b]
    on_device = [r for b in VideoReader(path, batch_size=4, device=device, colour="device") for r in b]
    assert [r.pts for r in on_device] == [r.pts for r in on_cpu]
    assert [r.pts * r.time_base for r in on_device] == [Fraction(t, 24) for t in (0, 1, 3, 4, 7, 9)]
    for a, b in zip(on_cpu, on_device):
        assert b.image.shape == a.image.shape and b.image.dtype == torch.uint8 and b.image.device.type == device.type
        assert (a.image.int() - b.image.cpu().int()).abs().max() <= 3


def test_nvdec_decodes_what_the_software_decoder_decodes(tmp_path, device):
    if device.type != "cuda" or "h264_cuvid" not in av.codecs_available:
        pytest.skip("needs `pytest --device cuda` on an NVIDIA GPU and PyAV with h264_cuvid")
    path = write_clip(tmp_path / "in.mp4", pattern_frames(9, 64, 48), pts=[0, 1, 3, 4, 7, 9, 10, 12, 15],
                      time_base=Fraction(1, 24))
    want = [r for b in VideoReader(path, batch_size=4, device=device) for r in b]
    reader = VideoReader(path, batch_size=4, device=device, decoder="nvdec")
    got = [r for b in reader for r in b]
    assert reader.decoder_name == "h264_cuvid"
    assert [r.pts for r in got] == [r.pts for r in want] and len(got) == 9
    for a, b in zip(got, want):
        # H.264 decoding is exact, so only the two colour conversions' rounding may differ
        assert a.image.device.type == device.type and (a.image.int() - b.image.int()).abs().max() <= 2


def test_stand_alone_decoder_context_equals_the_stream_decoder(tmp_path):
    # decode.decoder=nvdec swaps in FFmpeg's *_cuvid decoder through this path; with the software h264 decoder
    # in its place it must give exactly what the stream's own decoder gives, timestamps included.
    path = write_clip(tmp_path / "in.mp4", pattern_frames(7, 64, 48), pts=[0, 2, 3, 5, 6, 8, 11],
                      time_base=Fraction(1, 24))
    with av.open(str(path)) as a, av.open(str(path)) as b:
        theirs = list(_decode_frames(a, a.streams.video[0], path))
        ours = list(_decode_frames(b, b.streams.video[0], path, "h264"))
        time_base = b.streams.video[0].time_base
    assert [f.pts for f in ours] == [f.pts for f in theirs]
    assert [f.pts * time_base for f in ours] == [Fraction(t, 24) for t in (0, 2, 3, 5, 6, 8, 11)]
    for x, y in zip(ours, theirs):
        np.testing.assert_array_equal(x.to_ndarray(format="rgb24"), y.to_ndarray(format="rgb24"))


def test_nvdec_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: NVDEC may work here")
    path = write_clip(tmp_path / "in.mp4", pattern_frames(2, 64, 48))
    with pytest.raises(SettingError, match="h264_cuvid cannot start.*NVIDIA GPU"):
        VideoReader(path, decoder="nvdec")   # refused up front, before a render creates anything


def test_unknown_decode_settings_are_refused(tmp_path):
    path = write_clip(tmp_path / "in.mp4", pattern_frames(2, 64, 48))
    with pytest.raises(SettingError, match="decode.decoder"):
        VideoReader(path, decoder="quicksync")
    with pytest.raises(SettingError, match="decode.colour"):
        VideoReader(path, colour="gpu")
    with pytest.raises(SettingError, match="unknown decode setting"):
        VideoReader.from_config(path, {"decoder": "software", "threads": 4}, 4, torch.device("cpu"))


def test_nvdec_reader_flow_with_a_software_stand_in(tmp_path, monkeypatch):
    import pipeline.decode

    path = write_clip(tmp_path / "in.mp4", pattern_frames(5, 64, 48))
    want = [r for b in VideoReader(path, batch_size=2) for r in b]
    monkeypatch.setattr(pipeline.decode, "_hardware_decoder", lambda info: "h264")
    reader = VideoReader(path, batch_size=2, decoder="nvdec")
    got = [r for b in reader for r in b]
    assert reader.decoder_name == "h264" and len(got) == 5
    for a, b in zip(got, want):
        assert a.pts == b.pts and torch.equal(a.image, b.image)


def coded_clip(path, pix_fmt: str, colorspace: int, color_range: int, width: int = 96, height: int = 64):
    """Four frames of a real photo, coded as `pix_fmt` with the given matrix and range (tagged, unless 2 / 0);
    odd sizes in FFV1 (x264 refuses odd 4:2:0), into .mkv."""
    from skimage import data

    photo = data.astronaut()
    frames = [np.ascontiguousarray(photo[40 * i:40 * i + 2 * height:2, 100:100 + 2 * width:2]) for i in range(4)]
    odd = width % 2 or height % 2
    path = path.with_suffix(".mkv") if odd else path
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1" if odd else "libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.options = {} if odd else {"crf": "12"}
        stream.codec_context.colorspace, stream.codec_context.color_range = colorspace, color_range
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format=pix_fmt, dst_colorspace=colorspace if colorspace != 2 else 5, dst_color_range=color_range)
            frame.colorspace, frame.color_range, frame.pts = colorspace, color_range, i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("pix_fmt, colorspace, color_range, width, height", [
    ("yuv420p", 1, 1, 96, 64),      # HD video: BT.709, limited
    ("yuv420p", 2, 0, 96, 64),      # untagged: BT.601, limited (the demo clip)
    ("yuvj420p", 1, 2, 96, 64),     # full range
    ("yuv420p", 1, 1, 65, 47),      # odd size: the last chroma column and row cover one pixel
    ("yuv422p", 5, 1, 96, 64),
    ("yuv444p", 1, 1, 96, 64),
    ("yuv420p10le", 1, 1, 96, 64),  # swscale: about two levels dark
    ("yuv420p10le", 9, 2, 96, 64),  # BT.2020, full range
    ("yuv420p", 7, 1, 96, 64),      # SMPTE 240M
    ("yuv420p", 4, 1, 96, 64),      # FCC
])
def test_cpu_decode_is_the_exact_conversion_rounded(tmp_path, pix_fmt, colorspace, color_range, width, height):
    # swscale's yuv420p -> rgb24 truncates: this test measured R, G, B shifts of -0.95, -1.47, -0.98 levels
    # (yuv420p10le: -2.0, -1.5, -1.8; odd sizes: chroma interpolated, up to 29 levels off) before the decoder
    # converted on the host itself
    path = coded_clip(tmp_path / "c.mp4", pix_fmt, colorspace, color_range, width, height)
    with av.open(str(path)) as container:
        want = np.stack([exact_rgb(frame) for frame in container.decode(video=0)])
    got = np.stack([r.image.permute(1, 2, 0).numpy() for b in VideoReader(path, batch_size=4) for r in b])
    difference = got.astype(float) - want
    shift = difference.reshape(-1, 3).mean(0)
    # measured: shifts within ±0.031, largest difference 0.515 (a sum within 1/32 of a half rounds either way)
    assert np.abs(shift).max() < 0.1 and np.abs(difference).max() < 0.55, (shift, np.abs(difference).max())


@pytest.mark.parametrize("layout", ["nv12", "nv21"])  # swscale interleaves the chroma as U, V / as V, U
def test_nv12_planes_are_read_as_yuv420p(tmp_path, layout):
    path = coded_clip(tmp_path / "c.mp4", "yuv420p", 1, 1)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    planar = host_yuv_to_rgb(*yuv_planes(frame)[:3], 8, 1, False)
    semi = frame.reformat(format=layout)
    y, u, v, bits = yuv_planes(semi)
    assert bits == 8 and u.shape == v.shape == (32, 48)
    np.testing.assert_array_equal(host_yuv_to_rgb(y, u, v, bits, 1, False), planar)


@pytest.mark.parametrize("colorspace", [1, 5, 9])
@pytest.mark.parametrize("full_range", [False, True])
@pytest.mark.parametrize("bits", [8, 10])
def test_host_converter_agrees_with_the_torch_one(colorspace, full_range, bits):
    # every code value, with chroma at 4:2:0: the integer host path and the float torch path are the same formula
    g = torch.Generator().manual_seed(bits)
    top = 2 ** bits
    y = torch.randint(0, top, (64, 1024), generator=g)
    y[0] = torch.arange(top).repeat(1024 // top)   # each code, luma
    u, v = torch.randint(0, top, (2, 32, 512), generator=g)
    u[0], v[0] = torch.arange(512) % top, torch.arange(511, -1, -1) % top
    dtype = np.uint8 if bits == 8 else np.uint16
    host = host_yuv_to_rgb(*(p.numpy().astype(dtype) for p in (y, u, v)), bits, colorspace, full_range)
    if bits == 8:
        want = yuv_to_rgb(y.to(torch.uint8), u.to(torch.uint8), v.to(torch.uint8), colorspace, full_range).numpy()
        assert np.abs(host.astype(int) - want.astype(int)).max() <= 1
    # against float64: the exact value rounded, but for sums within 1/32 of a half
    kr, kb = coefficients(colorspace)
    if full_range:
        luma, cb, cr = y / (top - 1), (u - top // 2) / (top - 1), (v - top // 2) / (top - 1)
    else:
        scale = top // 256
        luma, cb, cr = (y / scale - 16) / 219, (u / scale - 128) / 224, (v / scale - 128) / 224
    cb, cr = (c.repeat_interleave(2, 0).repeat_interleave(2, 1).double() for c in (cb, cr))
    red, blue = luma + 2 * (1 - kr) * cr, luma + 2 * (1 - kb) * cb
    exact = torch.stack([red, (luma - kr * red - kb * blue) / (1 - kr - kb), blue]).mul(255).clamp(0, 255).numpy()
    difference = host - exact
    assert np.abs(difference).max() < 0.535 and np.abs(difference.reshape(3, -1).mean(1)).max() < 0.02
