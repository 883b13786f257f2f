"""Our own Mask R-CNN: `build_model(config)`, `load_segmenter(cfg)`, `MaskRCNN.predict(frames) -> list[Instances]`.

The names below load their modules (and torch) when first used, not when the package is imported: `python -m
segment.train` imports this package before its own first line, where it puts its stop-signal handler in place, and
a Ctrl-C during torch's import was a traceback.
"""
import importlib

_MODULES = {
    "load_checkpoint": "segment.checkpoint", "load_segmenter": "segment.checkpoint",
    "load_torchvision_checkpoint": "segment.checkpoint", "save_checkpoint": "segment.checkpoint",
    "SegmenterConfig": "segment.config", "CheckpointError": "segment.errors", "ConfigError": "segment.errors",
    "SegmentError": "segment.errors", "MaskRCNN": "segment.model", "build_model": "segment.model",
    "Instances": "segment.structures",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'segment' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
