"""stylize.content: training images as they are meant to be seen, and video frames sampled within bounded memory."""
import numpy as np
import pytest
import torch
from PIL import Image

from stylize import content as content_module
from stylize.content import ContentImages, read_image
from stylize.errors import StyleError


def _grey_value(path) -> list[int]:
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 12)
    return sorted(set(image.flatten().tolist()))


@pytest.mark.parametrize("array, name, expected", [
    (np.full((8, 12), 32768, np.uint16), "g16.png", 128),        # I;16: was 255 (saturated)
    (np.full((8, 12), 65535, np.uint16), "g16.tif", 255),
    (np.full((8, 12), 60000, np.uint16), "g60000.png", 233),    # 60000/257 = 233.46; /256 would give 234
    (np.full((8, 12), 32768, np.int32), "i32.tif", 128),          # I in 0..65535: 16-bit range; was 255
    (np.full((8, 12), 0.5, np.float32), "half.tif", 128),         # F in 0..1; was 0 (black)
    (np.full((8, 12), 1.0, np.float32), "one.tif", 255),          # 1.0 is the top of 0..1, not 1 of 0..255
    (np.full((8, 12), 200.0, np.float32), "f200.tif", 200),       # F over 1: 0..255
    (np.full((8, 12), 1e6, np.float32), "fbig.tif", 255),         # ... clipped
])
def test_high_bit_depth_grey_is_scaled_by_its_range(tmp_path, array, name, expected):
    Image.fromarray(array).save(tmp_path / name)
    assert _grey_value(tmp_path / name) == [expected]


def test_32_bit_grey_beyond_16_bits_is_stretched_over_its_range(tmp_path):
    array = np.zeros((8, 12), np.int32)
    array[:, 6:] = 1 << 20
    Image.fromarray(array).save(tmp_path / "wide.tif")
    assert _grey_value(tmp_path / "wide.tif") == [0, 255]


def test_image_suffixes_match_in_any_case(tmp_path):
    """Cameras name their files IMG_0001.JPG."""
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "A.JPG", format="JPEG")
    assert len(ContentImages(tmp_path, 16)) == 1


def test_transparency_is_composited_over_white(tmp_path):
    """A transparent pixel hides whatever colour it has (often black): a viewer shows the page behind it."""
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[:, 6:] = (255, 0, 0, 128)                               # half-covering red over white: pink
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert image[:, 0, 0].tolist() == [255, 255, 255]
    assert image[:, 0, 11].tolist() == [255, 127, 127]

    Image.fromarray(np.zeros((8, 12, 2), np.uint8), "LA").save(tmp_path / "la.png")
    assert _grey_value(tmp_path / "la.png") == [255]
    palette = Image.new("P", (12, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(tmp_path / "p.png", transparency=0)
    assert _grey_value(tmp_path / "p.png") == [255]


def test_exif_orientation_turns_the_image_upright(tmp_path):
    pixels = np.zeros((8, 12, 3), np.uint8)
    pixels[:, :6] = 255                                          # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                             # "rotate 90° clockwise to view"
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
    image = read_image(tmp_path / "turned.png")
    assert image.shape == (3, 12, 8)
    assert image[:, 0].float().mean() > 200 and image[:, -1].float().mean() < 50   # the white half is on top


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_an_image_over_the_decompression_bomb_limit_is_read_shrunk(tmp_path, monkeypatch, suffix):
    """It was PIL's DecompressionBombError traceback (e.g. a 14000x13000 scan); a limit lowered to 1000 px stands in
    for PIL's 89 megapixels."""
    pixels = np.zeros((80, 100, 3), np.uint8)
    pixels[:, :50] = (200, 40, 40)
    Image.fromarray(pixels).save(tmp_path / f"big{suffix}")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = read_image(tmp_path / f"big{suffix}")
    assert image.shape[1] * image.shape[2] <= 1000 and image.shape[1] >= 8   # 100x80 by 3 (a JPEG by 4)
    # (a TIFF is checked again as it decodes)
    assert (image[:, 5, 2].int() - torch.tensor([200, 40, 40])).abs().max() <= 12
    assert image[:, 5, -2].max() <= 12
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's limit is back as it was

    monkeypatch.setattr(content_module, "MAX_PIXELS", 4000)       # beyond what is read at all: one line
    with pytest.raises(StyleError, match=r"big\.\w+ is 100x80 pixels, more than the 4,000 this reads: shrink it first"):
        read_image(tmp_path / f"big{suffix}")


def _video(path, frames: int = 40, codec: str = "libx264"):
    """Frame i is a flat grey of 6·i, so a decoded frame tells its index."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 6 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_video_frames_are_spread_over_the_whole_clip(tmp_path, monkeypatch, suffix):
    """Matroska declares no frame count: every frame was decoded and held, then the first few kept."""
    path = _video(tmp_path / f"clip{suffix}")
    decoded = prepared = 0
    decode, resize = content_module._decoded, content_module.resize_shorter

    def counting_decode(*args):
        nonlocal decoded
        for item in decode(*args):
            decoded += 1
            yield item

    def counting_resize(*args):
        nonlocal prepared
        prepared += 1
        return resize(*args)

    monkeypatch.setattr(content_module, "_decoded", counting_decode)
    monkeypatch.setattr(content_module, "resize_shorter", counting_resize)
    images = ContentImages(path, 32, max_video_frames=5).images
    assert [round(float(im.mean()) * 255 / 6) for im in images] == [0, 8, 16, 24, 32]
    assert prepared == 5 and decoded == 33   # no frame past the last one wanted is decoded, none more held


def test_a_video_of_unknown_length_is_thinned_as_it_goes(monkeypatch):
    import weakref

    class Frame:
        def __init__(self, index):
            self.index = index

    alive, most = weakref.WeakSet(), 0

    def prepare(frame):
        nonlocal most
        alive.add(frame)
        most = max(most, len(alive))
        return frame

    monkeypatch.setattr(content_module, "_to_tensor", Frame)
    kept = content_module._thinned(((None, i) for i in range(100)), 8, prepare)
    assert [frame.index for frame in kept] == [0, 16, 32, 48, 64, 80, 96]   # evenly over all 100
    assert most <= 8                                                        # never more held


def test_bad_videos_are_one_line(tmp_path):
    import av

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(StyleError, match="garbage.mp4 is not a readable video"):
        ContentImages(garbage, 32)

    audio = tmp_path / "song.mp4"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(StyleError, match="song.mp4 has no video stream"):
        ContentImages(audio, 32)


def test_the_shorter_side_is_scaled_to_the_size():
    from stylize.content import resize_shorter

    assert resize_shorter(torch.zeros(3, 48, 96, dtype=torch.uint8), 32).shape == (3, 32, 64)
    assert resize_shorter(torch.zeros(3, 96, 48, dtype=torch.uint8), 32).shape == (3, 64, 32)


def _offsets(crop: torch.Tensor, images: list[torch.Tensor], size: int) -> set[tuple[int, int, int]]:
    """(image, top, left) of every place in `images` whose size x size window equals `crop`."""
    return {(i, top, left) for i, image in enumerate(images) for top in range(image.shape[1] - size + 1)
            for left in range(image.shape[2] - size + 1)
            if torch.equal(image[:, top:top + size, left:left + size], crop)}


@pytest.mark.parametrize("height, width", [(32, 40), (40, 32)])
def test_crops_are_windows_at_every_offset_of_either_axis(tmp_path, height, width):
    """Each crop is a window of its image, the offsets drawn along each axis over that axis' own length: a wide image's
    crops start anywhere across its width, a tall one's anywhere down its height."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)  # no window alike
    Image.fromarray(pixels).save(tmp_path / "a.png")
    content = ContentImages(tmp_path, 32)
    [image] = content.images
    assert image.shape == (3, height, width)
    # 200 draws of 9 offsets: each offset drawn with near certainty (and the seed fixes the draws)
    crops = content.batch(200, torch.Generator().manual_seed(0))
    assert crops.shape == (200, 3, 32, 32)
    found = set()
    for crop in crops:
        [place] = _offsets(crop, [image], 32)
        found.add(place[1:])
    assert found == {(top, left) for top in range(height - 31) for left in range(width - 31)}


def test_a_batch_larger_than_the_images_repeats_them(tmp_path):
    """batch(8) of 4 images: 8 crops, each image twice (every image once before any twice)."""
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    content = ContentImages(tmp_path, 32)
    crops = content.batch(8, torch.Generator().manual_seed(0))
    assert crops.shape == (8, 3, 32, 32)
    used = [_offsets(crop, content.images, 32) for crop in crops]
    assert all(len(places) == 1 for places in used)
    picks = [next(iter(places))[0] for places in used]
    assert sorted(picks[:4]) == [0, 1, 2, 3] and sorted(picks) == [0, 0, 1, 1, 2, 2, 3, 3]
