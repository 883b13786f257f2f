"""Errors users can cause (bad files, bad settings); each carries a one-line message naming the culprit."""
from common.errors import SettingError, UserError


class SegmentError(UserError):
    """Base of the segment package's user-facing errors."""


class CheckpointError(SegmentError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


class ConfigError(SegmentError, SettingError):
    """A segment setting has an invalid value."""


class FrameSizeError(SegmentError, ValueError):
    """A frame the model cannot read: no pixels, or too thin to keep a row or a column once resized."""
