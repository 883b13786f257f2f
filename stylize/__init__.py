"""Neural styles: a multi-style conditional-instance-norm network, its style bank, fast region inference, training."""
from stylize.errors import StyleError

__all__ = ["StyleError"]
