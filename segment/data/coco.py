"""COCO-format instance segmentation dataset (pycocotools): images + polygon / RLE masks -> training targets.

Crowd annotations (iscrowd=1) are never training targets; their boxes travel in `target["crowd_boxes"]` so a
loss could ignore detections on them. Annotations whose box or mask is empty are dropped.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

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
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({e.strerror or e})") from None
    check_entries(path, dataset)
    coco = COCO()  # given no file, it neither reads nor prints
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except TypeError as e:  # e.g. an id that is a list
        raise DatasetError(f"{path} is not a COCO instances file (problem with {e!r})") from None
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


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Polygon list, uncompressed RLE (counts list) or compressed RLE -> one compressed RLE (pycocotools)."""
    if isinstance(segmentation, list):
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
    drop_empty: leave out images with no usable (non-crowd) annotation, as training usually does.
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
        if drop_empty:
            image_ids = [i for i in image_ids if any(self._is_target(a) for a in self.coco.imgToAnns.get(i, []))]
            if not image_ids:
                raise DatasetError(f"none of the {len(self.coco.imgs)} images of {annotation_file} has an annotation "
                                   f"(not a crowd) of the categories used, {self.category_ids}")
        self.image_ids = image_ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def get_height_and_width(self, index: int) -> tuple[int, int]:
        """From the annotation file, without decoding the image (for aspect-ratio grouping)."""
        info = self.coco.imgs[self.image_ids[index]]
        return int(info["height"]), int(info["width"])

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def load_image(self, index: int) -> Tensor:
        """uint8 (3, H, W) RGB (grey, palette and RGBA files converted), checked against the annotated size."""
        path = self.image_path(index)
        if not path.is_file():
            raise DatasetError(f"image file not found: {path}")
        try:
            with Image.open(path) as file:
                pixels = np.array(file.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"cannot decode image {path} ({str(e).strip().splitlines()[0][:100]})") from None
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        expected = self.get_height_and_width(index)
        if tuple(image.shape[1:]) != expected:
            raise DatasetError(f"{path} is {tuple(image.shape[1:])} (H, W) but its annotation says {expected}")
        return image

    def _is_target(self, ann: dict) -> bool:
        return not ann.get("iscrowd", 0) and ann["category_id"] in self.category_id_to_label

    def load_target(self, index: int) -> Target:
        image_id = self.image_ids[index]
        height, width = self.get_height_and_width(index)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if a["category_id"] in self.category_id_to_label]
        targets = [a for a in anns if not a.get("iscrowd", 0)]
        crowds = [a for a in anns if a.get("iscrowd", 0)]
        boxes = _xywh_to_xyxy([a["bbox"] for a in targets], height, width)
        masks = self._masks(targets, image_id, height, width)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & masks.flatten(1).amax(1).bool()
        labels = torch.tensor([self.category_id_to_label[a["category_id"]] for a in targets], dtype=torch.int64)
        return {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "masks": masks[keep],
            "crowd_boxes": _xywh_to_xyxy([a["bbox"] for a in crowds], height, width),
            "image_id": int(image_id),
            "orig_size": (height, width),
        }

    def _masks(self, anns: list[dict], image_id: int, height: int, width: int) -> Tensor:
        if not anns:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        try:
            rles = [segmentation_to_rle(a["segmentation"], height, width) for a in anns]
            masks = mask_utils.decode(rles)  # (H, W, G) Fortran order
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"image {image_id}: malformed segmentation in an annotation ({e!r})") from None
        return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image = self.load_image(index).float().div_(255)
        target = self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _xywh_to_xyxy(boxes: list, height: int, width: int) -> Tensor:
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    return b
