"""COCO-format instance segmentation dataset (pycocotools): images + polygon / RLE masks -> training targets.

Crowd annotations (iscrowd=1) are never training targets; their boxes travel in `target["crowd_boxes"]` so a
loss could ignore detections on them. Annotations whose box or mask is empty are dropped. What is left
(`CocoDetection.annotations`) is also the ground truth `segment.evaluate` scores against, so training and COCOeval
see the same objects.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from common.images import MAX_PIXELS, WIDE_GREY_MODES, grey_to_8bit, pil_limit_lifted
from segment.data.errors import DatasetError

Target = dict[str, object]
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


# every key that loading, training or COCOeval reads: a missing one was a KeyError deep in training or evaluation
REQUIRED_KEYS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "segmentation", "area", "bbox"),
    "categories": ("id", "name"),
}
ENTRY_NAMES = {"images": "image", "annotations": "annotation", "categories": "category"}
ORIENTATION = 0x0112  # the EXIF tag
TURNED = range(2, 9)  # EXIF orientations other than 1, "as stored"


def load_coco(annotation_file: str | os.PathLike) -> COCO:
    """pycocotools COCO object, without its progress prints; a one-line DatasetError for a missing, broken or
    malformed file (naming the entry and the key it lacks)."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with path.open("rb") as file:
            dataset = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise DatasetError(f"{path} is not a COCO instances file (its JSON is nested too deep to read)") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({e.strerror or e})") from None
    check_entries(path, dataset)
    check_values(path, dataset)
    coco = COCO()  # given no file, it neither reads nor prints
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_entries(path: Path, dataset: object) -> None:
    """Each image, annotation and category of a COCO file has the keys REQUIRED_KEYS lists."""
    if not isinstance(dataset, dict):
        raise DatasetError(f"{path} is not a COCO instances file (its JSON is not an object)")
    for section, keys in REQUIRED_KEYS.items():
        entries = dataset.get(section, [])
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: {section!r} is not a list")
        required = set(keys)
        for index, entry in enumerate(entries):
            if isinstance(entry, dict) and entry.keys() >= required:
                continue
            if not isinstance(entry, dict):
                raise DatasetError(f"{path}: {section} entry number {index + 1} is not a JSON object")
            name = f"{ENTRY_NAMES[section]} {entry['id']}" if "id" in entry else f"{section} entry number {index + 1}"
            missing = ", ".join(repr(k) for k in keys if k not in entry)
            raise DatasetError(f"{path}: {name} has no {missing}")


def whole_number(value: object) -> int | None:
    """An id as an int: ints, integral floats and strings of digits ("7") are numbers; anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


ID_KEYS = {"images": ("id",), "categories": ("id",), "annotations": ("id", "image_id", "category_id")}


def check_values(path: Path, dataset: dict) -> None:
    """Checks and normalises, in place, what training and COCOeval would read differently or not at all; a
    DatasetError names the first entry at fault.

    Ids become ints: pycocotools indexes by value, so "7" and 7 were different images to COCOeval while training
    read both as 7. Ids are unique: pycocotools' index keeps the last entry of an id, so duplicate annotation ids
    were one object to COCOeval and two to training, duplicate image or category ids merged images or classes.
    iscrowd becomes 0 or 1 (0 when missing, as pycocotools' COCO tools and training read it): "0" is a true
    string, a crowd to training but not to COCOeval. An annotation's category is one of the file's: training read
    another as background and COCOeval scored no category of it, so the object was silently dropped. Boxes are 4
    numbers, areas a number, and an RLE has its image's size: another size decoded to a mask of that size, unlike
    the image's."""
    for section, keys in ID_KEYS.items():
        name, seen = ENTRY_NAMES[section], set()
        for entry in dataset.get(section, []):
            for key in keys:
                number = whole_number(entry[key])
                if number is None and key == "id":
                    raise DatasetError(f"{path}: {name} {entry['id']!r} has an id that is not a whole number")
                if number is None:  # its own id, checked first, is one
                    raise DatasetError(f"{path}: {name} {entry['id']} has {key} {entry[key]!r}, not a whole number")
                entry[key] = number
            if entry["id"] in seen:
                raise DatasetError(f"{path}: {name} id {entry['id']} is used twice")
            seen.add(entry["id"])
    check_images_and_categories(path, dataset)
    images = {image["id"]: image for image in dataset.get("images", [])}
    category_ids = {category["id"] for category in dataset.get("categories", [])}
    for ann in dataset.get("annotations", []):
        if category_ids and ann["category_id"] not in category_ids:  # none at all: CocoDetection says so
            raise DatasetError(f"{path}: annotation {ann['id']} has category_id {ann['category_id']}, which is not "
                               "among the file's categories")
        check_annotation(path, ann, images.get(ann["image_id"]))


def check_images_and_categories(path: Path, dataset: dict) -> None:
    """An image's file_name is a name, its height and width whole numbers of pixels (made ints, as ids: an RLE's
    size compared with "128" was refused as another size); a category's name is text (a list was a TypeError when
    classes were mapped by name)."""
    for image in dataset.get("images", []):
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise DatasetError(f"{path}: image {image['id']} has file_name {image['file_name']!r}, not a file name")
        for key in ("height", "width"):
            number = whole_number(image[key])
            if number is None or number < 1:
                raise DatasetError(f"{path}: image {image['id']} has {key} {image[key]!r}, not a whole number of "
                                   "pixels")
            image[key] = number
    for category in dataset.get("categories", []):
        if not isinstance(category["name"], str):
            raise DatasetError(f"{path}: category {category['id']} has name {category['name']!r}, not text")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: object, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(_number(v) for v in value)


def check_annotation(path: Path, ann: dict, image: dict | None) -> None:
    """One annotation's iscrowd (normalised to 0 / 1), bbox, area and segmentation type; an RLE's size against
    its image's (`image`: None when the file has no image of its image_id, which nothing reads then)."""
    name = f"{path}: annotation {ann['id']}"
    iscrowd = ann.get("iscrowd", 0)
    if isinstance(iscrowd, str) or iscrowd not in (0, 1):
        raise DatasetError(f"{name} has iscrowd {iscrowd!r} (not 0 or 1)")
    ann["iscrowd"] = int(iscrowd)
    if not _numbers(ann["bbox"], 4):
        raise DatasetError(f"{name} has bbox {ann['bbox']!r}, not 4 numbers (x, y, width, height)")
    if not _number(ann["area"]):
        raise DatasetError(f"{name} has area {ann['area']!r}, not a number")
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
        return  # polygons: their points are read when they are rasterised (`CocoDetection.annotations`)
    if not (isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, list))
            and _numbers(segmentation.get("size"), 2)):
        raise DatasetError(f"{name} has a segmentation that is neither polygons nor an RLE (size and counts)")
    size, counts = segmentation["size"], segmentation["counts"]
    if image is not None and size != [image["height"], image["width"]]:
        raise DatasetError(f"{name} has an RLE of size {size} on image {image['id']}, which is "
                           f"[{image['height']}, {image['width']}] (height, width)")
    # runs that overrun the size would be decoded past the end of the mask (compressed ones: COCOeval's rleIou
    # looped for ever, deaf to Ctrl-C)
    runs = compressed_runs(counts) if isinstance(counts, str) else counts
    if not (runs is not None and all(_number(c) and c >= 0 for c in runs) and sum(runs) == size[0] * size[1]):
        raise DatasetError(f"{name} has an RLE whose counts are not run lengths adding up to its size {size}")


def compressed_runs(counts: str) -> list[int] | None:
    """The run lengths of a compressed RLE's counts string (COCO's: each run, from the fourth on as the difference
    from the one two before, in 5-bit groups of characters 48 + value, 0x20 marking that more follow, the last
    group's 0x10 its sign: pycocotools' rleFrString); None where the string is cut mid-run."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                return None
            group = ord(counts[position]) - 48
            value |= (group & 0x1F) << shift
            more, position, shift = bool(group & 0x20), position + 1, shift + 5
            if not more and group & 0x10:
                value |= -1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs


def _check_polygon(polygon: object, height: int, width: int) -> None:
    """A polygon is a flat list of x, y numbers, none more than the image's own size beyond it: pycocotools
    rasterises the whole polygon, and one point at 1e8 px took 23 GB (NaN crashed it)."""
    if not (isinstance(polygon, list) and all(_number(v) for v in polygon)):
        raise ValueError("a polygon that is not a flat list of finite x, y numbers")
    xs, ys = polygon[0::2], polygon[1::2]
    if any(not -width <= x <= 2 * width for x in xs) or any(not -height <= y <= 2 * height for y in ys):
        raise ValueError(f"a polygon point more than the image's size ({width}x{height}) beyond it")


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Polygon list, uncompressed RLE (counts list) or compressed RLE -> one compressed RLE (pycocotools)."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            _check_polygon(polygon, height, width)
        polygons = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points encloses nothing
        if not polygons:
            return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


class CocoDetection(torch.utils.data.Dataset):
    """`dataset[i]` -> (image float (3, H, W) in [0, 1], target) with target keys
    boxes (G, 4) float32 xyxy, labels (G,) int64 in 1..K, masks (G, H, W) uint8, crowd_boxes (C, 4) float32,
    image_id int, orig_size (H, W) of the file. `transforms(image, target)` runs last.

    category_ids: which COCO categories to use and in which order (label k = category_ids[k-1]); default all,
    sorted by id. Annotations of other categories are ignored.
    drop_empty: leave out images with no usable annotation (not a crowd, box and mask not empty: an image that
    would have no target), as training usually does.

    Every image file the dataset reads is checked to exist when it is built. Images are read up to
    common.images.MAX_PIXELS (over PIL's decompression-bomb limit too: the dataset's files are the user's own).
    Pixels are read as stored, whatever EXIF orientation a file has (as torchvision and pycocotools read them);
    the first image with a non-identity orientation gets a warning (once per dataset and process).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Transform | None = None,
        category_ids: Sequence[int] | None = None,
        drop_empty: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DatasetError(f"image directory not found: {self.image_dir}")
        self.annotation_file = Path(annotation_file)
        self.coco = load_coco(annotation_file)
        self.transforms = transforms
        self._warned_orientation = False
        # what is missing, said here: an empty set reached training as "0 images, fewer than the 1 processes"
        if not self.coco.imgs:
            raise DatasetError(f"{annotation_file} has no images")
        known = sorted(self.coco.cats)
        if not known:
            raise DatasetError(f"{annotation_file} has no categories")
        if category_ids is None:
            category_ids = known
        if len(category_ids) == 0:
            raise DatasetError(f"category_ids is an empty list: leave it null for every category of {annotation_file} "
                               f"or list at least one of {known}")
        unknown = sorted(set(category_ids) - set(known))
        if unknown:
            raise DatasetError(f"{annotation_file} has no categories with ids {unknown} (it has {known})")
        self.category_ids = [int(c) for c in category_ids]
        self.category_id_to_label = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        self.label_to_category_id = {k: cid for cid, k in self.category_id_to_label.items()}
        self.class_names = [self.coco.cats[cid]["name"] for cid in self.category_ids]
        image_ids = sorted(self.coco.imgs)
        if drop_empty:  # rasterises every annotation of the categories used: what makes a target is decided once
            image_ids = [i for i in image_ids if any(not a["iscrowd"] for a in self._annotations(i))]
            if not image_ids:
                raise DatasetError(f"none of the {len(self.coco.imgs)} images of {annotation_file} has an annotation "
                                   f"(not a crowd) of the categories used, {self.category_ids}")
        self.image_ids = image_ids
        # one stat per file, here: a missing image was found only when it was read, maybe hours into a training
        missing = [path for path in map(self.image_path, range(len(image_ids))) if not path.is_file()]
        if missing:
            raise DatasetError(f"image file not found: {missing[0]} (missing: {len(missing)} of the {len(image_ids)} "
                               f"images of {annotation_file})")

    def __len__(self) -> int:
        return len(self.image_ids)

    def get_height_and_width(self, index: int) -> tuple[int, int]:
        """From the annotation file, without decoding the image (for aspect-ratio grouping)."""
        info = self.coco.imgs[self.image_ids[index]]
        return int(info["height"]), int(info["width"])

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def load_image(self, index: int) -> Tensor:
        """uint8 (3, H, W) RGB (grey, 16-bit, 32-bit and float grey, palette and RGBA files converted), checked
        against the annotated size."""
        path = self.image_path(index)
        if not path.is_file():  # checked when the dataset was built, but it may have gone since
            raise DatasetError(f"image file not found: {path}")
        try:
            with pil_limit_lifted(), Image.open(path) as file:
                if file.width * file.height > MAX_PIXELS:
                    raise DatasetError(f"image {path} is {file.width}x{file.height} pixels, more than the "
                                       f"{MAX_PIXELS:,} this reads: shrink it (and its annotations) first")
                orientation = file.getexif().get(ORIENTATION, 1)
                pixels = _rgb(file)
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"cannot decode image {path} ({str(e).strip().splitlines()[0][:100]})") from None
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        expected = self.get_height_and_width(index)
        turned = orientation in TURNED
        if tuple(image.shape[1:]) != expected:
            # annotation tools record the size viewers show, turned by the EXIF orientation: say why they differ
            why = (f"; its EXIF orientation {orientation} turns it on display, but its pixels are read as stored "
                   "(see docs/data.md)") if turned else ""
            raise DatasetError(f"{path} is {tuple(image.shape[1:])} (H, W) but its annotation says {expected}{why}")
        if turned and not self._warned_orientation:
            self._warned_orientation = True
            warnings.warn(f"{path} (and maybe other images of {self.annotation_file}) has EXIF orientation "
                          f"{orientation}: its pixels are read as stored, not turned as viewers show them, so "
                          "annotations drawn on the turned picture do not fit it (see docs/data.md)", stacklevel=2)
        return image

    def annotations(self, index: int) -> list[dict]:
        """The image's annotations of the categories used, as training and evaluation read them, in file order:
        copies with `segmentation` as one compressed RLE of the image's size and `iscrowd` 0 or 1. Crowd regions
        are all kept; other annotations only where their box (clamped to the image) and mask are not empty."""
        return list(self._annotations(self.image_ids[index]))

    def _annotations(self, image_id: int) -> Iterator[dict]:
        # a generator: drop_empty stops at an image's first target instead of rasterising all its annotations
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann["category_id"] not in self.category_id_to_label:
                continue
            ann = {**ann, "segmentation": self._rle(ann, height, width)}
            box = _xyxy(ann["bbox"], height, width)
            if ann["iscrowd"] or (box[2] > box[0] and box[3] > box[1] and mask_utils.area(ann["segmentation"]) > 0):
                yield ann

    def _rle(self, ann: dict, height: int, width: int) -> dict:
        try:
            return segmentation_to_rle(ann["segmentation"], height, width)
        except (TypeError, ValueError, OverflowError) as e:
            raise DatasetError(f"{self.annotation_file}: annotation {ann['id']} has a malformed segmentation "
                               f"({str(e).strip()[:100]})") from None

    def load_target(self, index: int) -> Target:
        height, width = self.get_height_and_width(index)
        annotations = self.annotations(index)
        objects = [a for a in annotations if not a["iscrowd"]]
        if objects:
            masks = mask_utils.decode([a["segmentation"] for a in objects])  # (H, W, G) Fortran order
            masks = torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
        return {
            "boxes": _boxes(objects, height, width),
            "labels": torch.tensor([self.category_id_to_label[a["category_id"]] for a in objects], dtype=torch.int64),
            "masks": masks,
            "crowd_boxes": _boxes([a for a in annotations if a["iscrowd"]], height, width),
            "image_id": self.image_ids[index],
            "orig_size": (height, width),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image = self.load_image(index).float().div_(255)
        target = self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _rgb(file: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8. 16-bit, 32-bit and float grey are brought to 8 bits as stylize's content images are
    (`grey_to_8bit`): convert("RGB") clips each value at 255, which turns all but the darkest 16-bit pixels white
    and float pixels in 0..1 black. ("I" is how older Pillow opens 16-bit PNGs.)"""
    if file.mode in WIDE_GREY_MODES:
        grey = grey_to_8bit(np.asarray(file), file.mode)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(file.convert("RGB"))


def _xyxy(bbox: list, height: int, width: int) -> np.ndarray:
    """COCO xywh -> xyxy clamped to the image, in float32 like the targets' boxes (so the test for an empty box
    and the boxes trained on agree to the bit)."""
    box = np.array(bbox, dtype=np.float32)
    box[2:] += box[:2]
    return box.clip(0, np.array([width, height, width, height], dtype=np.float32))


def _boxes(annotations: list[dict], height: int, width: int) -> Tensor:
    return torch.from_numpy(np.array([_xyxy(a["bbox"], height, width) for a in annotations],
                                     dtype=np.float32).reshape(-1, 4))
