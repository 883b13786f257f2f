"""The render's own user errors (common/errors.py has the shared ones): each message is one line naming the file
or value at fault. The render CLI prints any UserError as `error: <message>` and exits 2.
"""
from __future__ import annotations

from common.errors import SettingError, UserError


class RenderError(UserError):
    """Base class for the render's expected, user-fixable failures."""


class InputError(RenderError):
    """The input path is missing or unreadable."""


class NotAVideoError(InputError):
    """The input opens as no container, or holds no video stream."""


class AudioOnlyError(NotAVideoError):
    """The input holds audio but no video stream."""


class EmptyVideoError(InputError):
    """The video stream decodes to zero frames."""


class TruncatedVideoError(InputError):
    """The video stream breaks off: a decoder error mid-stream, or far fewer frames than the container declares."""


class EncoderError(RenderError):
    """The chosen encoder is missing, cannot open on this machine, or rejects its settings."""


class PipelineConfigError(RenderError, SettingError):
    """A pipeline setting is out of range or names something that does not exist (an unknown class, policy...)."""


def ffmpeg_reason(error: BaseException) -> str:
    """A library error's message on one line, without the errno noise PyAV adds."""
    text = getattr(error, "strerror", None) or str(error)
    return " ".join(str(text).split()) or type(error).__name__

