"""Synthetic instance-segmentation scenes: photo-textured shapes over photo backgrounds, with exact masks.

Every scene is a random crop of a real photo (skimage.data) with a few objects on top. An object is one of
CLASS_NAMES, rasterised from its geometry (centre, size, angle), filled with a colour-tinted crop of a different
photo and outlined so it stands out. Objects are painted in list order (later ones on top); each mask is the
object's *visible* part, so masks never overlap. Everything is deterministic given the seed.

`write_coco_split` writes a COCO instances file (compressed RLE masks) plus JPEG images, atomically, and replaces
only a split it wrote itself (`check_replaceable`).
"""
from __future__ import annotations

import colorsys
import itertools
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage import data as skdata
from skimage.draw import polygon as fill_polygon
from skimage.transform import resize
from tqdm import tqdm

from common.outputs import HeldStopSignals, record_output
from segment.data.errors import DatasetError

CLASS_NAMES: list[str] = ["circle", "square", "triangle", "star", "ring"]
BACKGROUND_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle",
    "camera",
)
TEXTURE_PHOTOS = ("retina", "colorwheel", "grass", "gravel", "brick", "coins", "cell", "moon")  # none of the above
TEXTURE_SIZE = 128
TEXTURES_PER_PHOTO = 4
RING_INNER = 0.55   # inner / outer radius
STAR_INNER = 0.45   # inner / outer radius of the 5-pointed star
# What tells a split of ours from a user's folder, which regenerating must never delete: a marker file in the split
# folder, beside nothing but our NNNNNN.jpg images (splits from before the marker: an annotation file of ours).
MARKER = ".instyle-synthetic"
IMAGE_NAME = re.compile(r"\d{6}\.jpg")
DESCRIPTION = "instyle synthetic shapes"
ANNOTATION_HEAD = json.dumps({"info": {"description": DESCRIPTION}})[:-2].encode()  # how our JSON files begin


@dataclass
class SceneObject:
    label: int                    # 1..K, CLASS_NAMES[label - 1]
    center: tuple[float, float]   # x, y in pixels
    size: float                   # pixels, diameter of the circumscribed circle
    angle: float                  # degrees, clockwise on screen
    texture: int                  # index into the texture list


def _photo(name: str) -> np.ndarray:
    image = getattr(skdata, name)()
    if isinstance(image, tuple):  # stereo pairs
        image = image[0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    out = resize(image, (height, width), order=1, anti_aliasing=True, preserve_range=True)
    return out.round().clip(0, 255).astype(np.uint8)


def load_backgrounds() -> list[np.ndarray]:
    """Full background photos, HxWx3 uint8 (grey photos as three equal channels)."""
    return [_photo(name) for name in BACKGROUND_PHOTOS]


def load_textures(seed: int = 0) -> list[np.ndarray]:
    """TEXTURE_SIZE² uint8 RGB textures: random crops of TEXTURE_PHOTOS, each tinted with a saturated colour
    (photo detail kept in the luminance) so objects stay visible on any background."""
    rng = np.random.default_rng(seed)
    textures = []
    for name in TEXTURE_PHOTOS:
        photo = _photo(name)
        h, w = photo.shape[:2]
        for _ in range(TEXTURES_PER_PHOTO):
            side = int(rng.uniform(0.25, 0.6) * min(h, w))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = _resize_uint8(photo[y:y + side, x:x + side], TEXTURE_SIZE, TEXTURE_SIZE).astype(np.float32) / 255
            luminance = crop.mean(axis=-1, keepdims=True)
            luminance = (luminance - luminance.min()) / max(float(np.ptp(luminance)), 1e-3)
            colour = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), 1.0), dtype=np.float32)
            tinted = colour * (0.35 + 0.65 * luminance)
            mixed = 0.7 * tinted + 0.3 * crop
            textures.append((mixed * 255).round().clip(0, 255).astype(np.uint8))
    return textures


def background_crop(photo: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of `photo` with the target aspect ratio (40-100% of the largest such crop), randomly
    mirrored, resized to height x width."""
    h, w = photo.shape[:2]
    scale = min(h / height, w / width) * rng.uniform(0.4, 1.0)
    ch, cw = max(1, int(height * scale)), max(1, int(width * scale))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return _resize_uint8(crop, height, width)


def _vertices(obj: SceneObject) -> np.ndarray | None:
    """Polygon vertices (x, y) of polygonal shapes; None for round ones."""
    name = CLASS_NAMES[obj.label - 1]
    r = obj.size / 2
    if name == "square":
        angles, radii = np.arange(4) * 90 + 45, np.full(4, r)
    elif name == "triangle":
        angles, radii = np.arange(3) * 120 - 90, np.full(3, r)
    elif name == "star":
        angles, radii = np.arange(10) * 36 - 90, np.where(np.arange(10) % 2 == 0, r, r * STAR_INNER)
    else:
        return None
    t = np.deg2rad(angles + obj.angle)
    return np.stack([obj.center[0] + radii * np.cos(t), obj.center[1] + radii * np.sin(t)], axis=1)


def shape_mask(obj: SceneObject, height: int, width: int) -> np.ndarray:
    """Exact (H, W) bool raster of the whole object: a pixel is in when its centre (integer x, y) is inside."""
    if not 1 <= obj.label <= len(CLASS_NAMES):
        raise ValueError(f"object label {obj.label} is not in 1..{len(CLASS_NAMES)}")
    mask = np.zeros((height, width), dtype=bool)
    vertices = _vertices(obj)
    if vertices is not None:
        rows, cols = fill_polygon(vertices[:, 1], vertices[:, 0], shape=(height, width))
        mask[rows, cols] = True
        return mask
    cx, cy, r = obj.center[0], obj.center[1], obj.size / 2
    y0, y1 = max(0, int(np.floor(cy - r))), min(height, int(np.ceil(cy + r)) + 1)
    x0, x1 = max(0, int(np.floor(cx - r))), min(width, int(np.ceil(cx + r)) + 1)
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dist2 = (xx - cx) ** 2 + (yy - cy) ** 2
    inside = dist2 <= r * r
    if CLASS_NAMES[obj.label - 1] == "ring":
        inside &= dist2 >= (RING_INNER * r) ** 2
    mask[y0:y1, x0:x1] = inside
    return mask


def _paint(image: np.ndarray, mask: np.ndarray, obj: SceneObject, texture: np.ndarray) -> None:
    """Texture mapped in the object's own frame (it turns with the object), then a contrasting outline."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    a = np.deg2rad(obj.angle)
    u, v = xs - obj.center[0], ys - obj.center[1]
    tu = u * np.cos(a) + v * np.sin(a)
    tv = -u * np.sin(a) + v * np.cos(a)
    side = texture.shape[0]
    tx = np.clip(((tu / obj.size + 0.5) * (side - 1)).round().astype(int), 0, side - 1)
    ty = np.clip(((tv / obj.size + 0.5) * (side - 1)).round().astype(int), 0, side - 1)
    image[ys, xs] = texture[ty, tx]
    # the outline is a band inside the mask; eroding only a 1-px padded window around the shape is the same as
    # eroding the whole frame (border_value=1 keeps shapes cut by the frame from getting an outline there)
    y0, y1 = max(0, ys.min() - 1), min(mask.shape[0], ys.max() + 2)
    x0, x1 = max(0, xs.min() - 1), min(mask.shape[1], xs.max() + 2)
    window = mask[y0:y1, x0:x1]
    band = max(1, round(obj.size / 40))
    edge = window & ~ndimage.binary_erosion(window, iterations=band, border_value=1)
    dark = texture.mean() > 110
    image[y0:y1, x0:x1][edge] = (20, 20, 20) if dark else (235, 235, 235)


def _render(background: np.ndarray, objects: Sequence[SceneObject], textures: Sequence[np.ndarray]):
    height, width = background.shape[:2]
    image = np.array(background[..., :3], dtype=np.uint8, copy=True)
    full = np.zeros((len(objects), height, width), dtype=bool)
    for i, obj in enumerate(objects):
        full[i] = shape_mask(obj, height, width)
        _paint(image, full[i], obj, textures[obj.texture % len(textures)])
    visible = full.copy()
    covered = np.zeros((height, width), dtype=bool)
    for i in range(len(objects) - 1, -1, -1):
        visible[i] &= ~covered
        covered |= full[i]
    return image, full, visible


def render_scene(
    background: np.ndarray, objects: list[SceneObject], textures: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """-> (image HxWx3 uint8, visible masks (N, H, W) bool in the order of `objects`, later objects on top)."""
    image, _, visible = _render(background, objects, textures)
    return image, visible


def random_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    textures: list[np.ndarray],
    backgrounds: list[np.ndarray],
    max_objects: int = 6,
    labels: Sequence[int] | None = None,
    size_range: tuple[float, float] = (0.12, 0.45),
    min_visible: float = 0.5,
    min_pixels: int = 64,
) -> tuple[np.ndarray, list[SceneObject], np.ndarray]:
    """1..max_objects random objects (sizes a fraction `size_range` of the shorter image side, any angle, up to a
    quarter of a shape off-frame) -> (image, objects, visible masks). Objects left with less than `min_visible`
    of their in-frame area, or fewer than `min_pixels` pixels, are removed from the scene altogether (not just
    from the annotations), so every visible object is annotated."""
    labels = list(labels) if labels is not None else list(range(1, len(CLASS_NAMES) + 1))
    background = background_crop(backgrounds[rng.integers(len(backgrounds))], height, width, rng)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        size = float(rng.uniform(*size_range) * min(height, width))
        margin = size / 4
        center = (float(rng.uniform(margin, width - margin)), float(rng.uniform(margin, height - margin)))
        objects.append(SceneObject(label=int(rng.choice(labels)), center=center, size=size,
                                   angle=float(rng.uniform(0, 360)), texture=int(rng.integers(len(textures)))))
    image, full, visible = _render(background, objects, textures)
    seen, area = visible.sum(axis=(1, 2)), full.sum(axis=(1, 2))
    keep = (seen >= min_visible * np.maximum(area, 1)) & (seen >= min_pixels)
    if not keep.all():
        # removing objects only uncovers the ones below, so the kept ones still pass
        objects = [o for o, k in zip(objects, keep) if k]
        image, full, visible = _render(background, objects, textures)
    return image, objects, visible


def write_coco_split(
    out_dir: str | os.PathLike,
    split: str,
    n_images: int,
    size: int = 256,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    max_objects: int = 6,
    progress: bool = True,
) -> Path:
    """Writes out_dir/<split>/NNNNNN.jpg and out_dir/annotations/instances_<split>.json (COCO, compressed RLE,
    category id k = CLASS_NAMES[k-1]) and returns the annotation path. Both land by rename, the JSON last, so a
    half-written split is never visible. Image i of a split depends only on (seed, split, i). A split folder or
    annotation file it did not write is never replaced (`check_replaceable`: DatasetError)."""
    classes = list(classes) if classes else list(CLASS_NAMES)
    unknown = [c for c in classes if c not in CLASS_NAMES]
    if unknown:
        raise DatasetError(f"unknown synthetic classes {unknown} (choose from {', '.join(CLASS_NAMES)})")
    if n_images < 0 or size < 32 or max_objects < 1:
        raise DatasetError(f"synthetic split {split!r} needs n_images >= 0, size >= 32 and max_objects >= 1 "
                           f"(got {n_images}, {size}, {max_objects})")
    labels = sorted(CLASS_NAMES.index(c) + 1 for c in set(classes))
    out_dir = Path(out_dir)
    check_replaceable(out_dir, split)
    annotation_file = out_dir / "annotations" / f"instances_{split}.json"
    # the folders made here, deepest first: a split that is not written takes those that stay empty away again
    made = list(itertools.takewhile(lambda folder: not folder.exists(),
                                    (annotation_file.parent, *annotation_file.parent.parents)))
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    textures, backgrounds = load_textures(seed), load_backgrounds()
    split_key = zlib.crc32(split.encode())
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=out_dir))
    try:
        (tmp / "images").mkdir()
        (tmp / "images" / MARKER).write_text("written by segment.data.synthetic, which replaces this folder when it "
                                             "regenerates the split: keep nothing else here\n")
        images, annotations = [], []
        for i in tqdm(range(n_images), desc=f"synthetic {split}", disable=not progress):
            rng = np.random.default_rng([seed, split_key, i])
            image, objects, masks = random_scene(rng, size, size, textures, backgrounds, max_objects, labels)
            file_name = f"{i:06d}.jpg"
            Image.fromarray(image).save(tmp / "images" / file_name, quality=95)
            images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size})
            for obj, mask in zip(objects, masks):
                annotations.append(_annotation(len(annotations) + 1, i + 1, obj.label, mask))
        coco = {
            "info": {"description": DESCRIPTION, "split": split, "seed": seed, "size": size},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k, "name": CLASS_NAMES[k - 1], "supercategory": "shape"} for k in labels],
        }
        (tmp / "instances.json").write_text(json.dumps(coco))
        _swap_in(tmp, out_dir / split, annotation_file)
    finally:
        with HeldStopSignals():  # a second Ctrl-C must not leave half of the temp folder
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:  # holds the split (or another's files): it stays, and so do the folders above it
                    break
    return annotation_file


def _swap_in(tmp: Path, target_images: Path, annotation_file: Path) -> None:
    """tmp/images and tmp/instances.json in place of the split's images folder and annotation file, or, on an error,
    the old ones back in place: never the new images beside the old annotations. The stop signals wait until either
    is done (the old images go to tmp/old, which the caller removes)."""
    old_images = tmp / "old"
    with HeldStopSignals():
        if target_images.exists():
            target_images.rename(old_images)
        try:
            (tmp / "images").rename(target_images)
            os.replace(tmp / "instances.json", annotation_file)
            # in the held block: a command stopped once the split is in place says so (common.arguments)
            record_output(target_images)
            record_output(annotation_file)
        except OSError:
            if not (tmp / "images").exists() and target_images.exists():  # the new images went in: out again
                target_images.rename(tmp / "images")
            if old_images.exists():
                old_images.rename(target_images)
            raise


def check_replaceable(out_dir: str | os.PathLike, split: str) -> None:
    """A DatasetError unless writing `split` into out_dir replaces only what this generator wrote: no split folder
    and annotation file yet, or ours (see MARKER) with nothing of the user's added."""
    out_dir = Path(out_dir)
    folder, annotation_file = out_dir / split, out_dir / "annotations" / f"instances_{split}.json"
    refusal = "refusing to replace it (move it away or generate into another folder)"
    our_annotations = annotation_file.is_file() and _begins_with(annotation_file, ANNOTATION_HEAD)
    if annotation_file.exists() and not our_annotations:
        raise DatasetError(f"{annotation_file} exists and was not written by the synthetic generator: {refusal}")
    if not folder.exists():
        return
    if not folder.is_dir() or not ((folder / MARKER).is_file() or our_annotations):
        raise DatasetError(f"{folder} exists and was not written by the synthetic generator: {refusal}")
    foreign = sorted(p.name for p in folder.iterdir()
                     if p.name != MARKER and not (IMAGE_NAME.fullmatch(p.name) and p.is_file()))
    if foreign:
        raise DatasetError(f"{folder} holds {foreign[0]}, which the synthetic generator did not write: {refusal}")


def _begins_with(path: Path, head: bytes) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(len(head)) == head
    except OSError:  # unreadable: not known to be ours
        return False


def _annotation(ann_id: int, image_id: int, label: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id, "image_id": image_id, "category_id": label, "iscrowd": 0,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }
