"""Every architectural and inference setting of the Mask R-CNN, in one typed place.

Defaults are torchvision's `maskrcnn_resnet50_fpn` (v1) values, so a default config plus a torchvision
state_dict reproduces torchvision's model. Hydra's `segment` group is turned into this with `from_dict`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from common.errors import SettingError
from common.settings import flag, number, whole
from segment.errors import ConfigError

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d")
NORMS = ("frozen_bn", "bn", "gn")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where the device has native bf16 (gpu/precision.py)
# settings the weights were trained with: a checkpoint of ours carries them and they are not overridden at load
ARCHITECTURE_KEYS = (
    "backbone", "norm", "bn_eps", "num_classes", "class_names", "image_mean", "image_std", "fpn_channels",
    "representation_size", "mask_head_channels", "mask_head_layers", "anchor_sizes", "anchor_ratios",
    "bbox_reg_weights",
)


# settings whose null means "the default" or, loading a bare torchvision file, "as the file was made"
NULLABLE_KEYS = ("bn_eps", "num_classes", "class_names")
GAP_CLASS = "N/A"  # an unused index in COCO's category list, not a class
# whole-number settings: (lowest, highest)
WHOLE_RANGES = {"trainable_layers": (0, 5), "num_classes": (2, math.inf), **dict.fromkeys((
    "max_size", "size_divisible", "fpn_channels", "representation_size", "mask_head_channels", "mask_head_layers",
    "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image", "box_batch_size_per_image", "detections_per_img", "paste_chunk_size"), (1, math.inf))}
FRACTIONS = ("rpn_nms_thresh", "rpn_score_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "rpn_positive_fraction",
             "box_fg_iou_thresh", "box_bg_iou_thresh", "box_positive_fraction", "score_threshold", "nms_threshold")
NON_NEGATIVE = ("bn_eps", "rpn_min_size", "box_min_size")
# list settings: (values needed, None for one or more; whether each must be > 0, not only finite)
LISTS = {"image_mean": (3, False), "image_std": (3, True), "anchor_sizes": (5, True), "anchor_ratios": (None, True),
         "bbox_reg_weights": (4, True)}
LIST_MEANING = {"image_mean": " (R, G, B)", "image_std": " (R, G, B)", "anchor_sizes": " (one per FPN level P2..P6)"}


def coco_class_names() -> list[str]:
    """The 91 COCO category names torchvision's detection weights use (index 0 is background, 'N/A' are gaps)."""
    from torchvision.models._meta import _COCO_CATEGORIES

    return list(_COCO_CATEGORIES)


def real_class_names(class_names: list[str]) -> list[str]:
    """The names of the classes a model can detect: neither the background (index 0) nor COCO's 'N/A' gaps."""
    return [name for name in class_names[1:] if name != GAP_CLASS]


@dataclass
class SegmenterConfig:
    # backbone
    backbone: str = "resnet50"
    norm: str = "frozen_bn"
    bn_eps: float = 1e-5  # torchvision's COCO v1 weights run with FrozenBatchNorm eps 0.0 (see checkpoint.py)
    trainable_layers: int = 3  # 0..5 stages trainable counted from layer4; 3 keeps stem + layer1 frozen
    # classes (num_classes includes background at index 0)
    num_classes: int = 91
    class_names: list[str] = field(default_factory=list)
    # input transform
    min_size: int | list[int] = 800  # a list means a random choice per image in training (last one at test)
    max_size: int = 1333
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    size_divisible: int = 32
    # widths
    fpn_channels: int = 256
    representation_size: int = 1024
    mask_head_channels: int = 256
    mask_head_layers: int = 4
    # anchors: one size per FPN level (P2..P6), the same ratios (h/w) on every level
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # RPN
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_score_thresh: float = 0.0
    rpn_min_size: float = 1e-3
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    # RoI heads
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    # inference
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_img: int = 100
    box_min_size: float = 1e-2
    paste_chunk_size: int = 64  # instances pasted per batched matmul; bounds temporaries (tens of MB at 1080p), not the output
    precision: str = "fp32"
    channels_last: bool = True  # NHWC convs: measured faster for inference on CPU (R50 and R18-GN), no slower in training
    cuda_graphs: bool = True  # on a GPU, predict replays the fixed-shape front (transform → RPN top-k) as a CUDA graph

    def __post_init__(self) -> None:
        try:
            self._check()
        except ConfigError:
            raise
        except SettingError as error:  # common.settings' checks, named as this package's error
            raise ConfigError(str(error)) from None

    def _check(self) -> None:
        """Each setting's type and range, so that a bad value is one line here, not a wrong render or a deep error."""
        self._check_choice("backbone", BACKBONES)
        self._check_choice("norm", NORMS)
        self._check_choice("precision", PRECISIONS)
        for name in ("channels_last", "cuda_graphs"):
            flag(getattr(self, name), f"segment.{name}")
        for name, (low, high) in WHOLE_RANGES.items():
            whole(getattr(self, name), f"segment.{name}", low, high)
        for name in FRACTIONS:
            setattr(self, name, number(getattr(self, name), f"segment.{name}", 0, 1))
        for name in NON_NEGATIVE:
            setattr(self, name, number(getattr(self, name), f"segment.{name}", 0))
        for name, (count, positive) in LISTS.items():
            setattr(self, name, self._numbers(name, count, positive))
        for stage in ("rpn", "box"):
            low, high = f"{stage}_bg_iou_thresh", f"{stage}_fg_iou_thresh"
            if getattr(self, low) > getattr(self, high):
                raise ConfigError(f"segment.{low} ({getattr(self, low)}) must not exceed segment.{high} "
                                  f"({getattr(self, high)})")
        self._check_min_size()
        self._check_class_names()

    def _numbers(self, name: str, count: int | None, positive: bool) -> list:
        values = getattr(self, name)
        if not isinstance(values, (list, tuple)) or (len(values) != count if count else not values):
            need = f"{count} values{LIST_MEANING.get(name, '')}" if count else "at least one value"
            raise ConfigError(f"segment.{name} needs {need}, got {values!r}")
        for value in values:
            number(value, f"segment.{name}", 0 if positive else -math.inf, low_open=positive)
        return list(values)

    def _check_min_size(self) -> None:
        sizes = self.min_size if isinstance(self.min_size, (list, tuple)) else [self.min_size]
        if not sizes:
            raise ConfigError("segment.min_size must be a whole number >= 1 or a non-empty list of them, got []")
        for size in sizes:
            whole(size, "segment.min_size", 1)
        if isinstance(self.min_size, tuple):
            self.min_size = list(self.min_size)

    def _check_class_names(self) -> None:
        if not self.class_names:
            self.class_names = (
                coco_class_names() if self.num_classes == 91 else
                ["__background__"] + [f"class_{i}" for i in range(1, self.num_classes)]
            )
        if not isinstance(self.class_names, (list, tuple)) or not all(isinstance(n, str) for n in self.class_names):
            raise ConfigError(f"segment.class_names must be a list of names, got {self.class_names!r}")
        self.class_names = list(self.class_names)
        if len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"segment.class_names has {len(self.class_names)} names but num_classes is {self.num_classes}"
            )

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(f"segment.{name}={value!r} is not one of {', '.join(choices)}")

    @property
    def min_sizes(self) -> tuple[int, ...]:
        return tuple(self.min_size) if isinstance(self.min_size, (list, tuple)) else (int(self.min_size),)

    @classmethod
    def from_dict(cls, data: Any) -> SegmenterConfig:
        """From a plain dict or an OmegaConf DictConfig; keys that are not config fields are an error."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(data, DictConfig):
                data = OmegaConf.to_container(data, resolve=True)
        except ImportError:  # omegaconf is a dependency, but plain dicts need nothing from it
            pass
        data = dict(data or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown segment config keys: {', '.join(unknown)}")
        data = {k: v for k, v in data.items() if not (k in NULLABLE_KEYS and v is None)}
        if "num_classes" not in data and isinstance(data.get("class_names"), (list, tuple)) and data["class_names"]:
            # the names alone say how many: num_classes' default (COCO's 91) refused the checkpoint's own 3 names
            data["num_classes"] = len(data["class_names"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **overrides: Any) -> SegmenterConfig:
        return SegmenterConfig.from_dict({**self.to_dict(), **overrides})
