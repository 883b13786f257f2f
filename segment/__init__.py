"""Our own Mask R-CNN: `build_model(config)`, `load_segmenter(cfg)`, `MaskRCNN.predict(frames) -> list[Instances]`."""
from segment.checkpoint import load_checkpoint, load_segmenter, load_torchvision_checkpoint, save_checkpoint
from segment.config import SegmenterConfig
from segment.errors import CheckpointError, ConfigError, SegmentError
from segment.model import MaskRCNN, build_model
from segment.structures import Instances

__all__ = [
    "CheckpointError", "ConfigError", "Instances", "MaskRCNN", "SegmentError", "SegmenterConfig", "build_model",
    "load_checkpoint", "load_segmenter", "load_torchvision_checkpoint", "save_checkpoint",
]
