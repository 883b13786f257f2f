"""The one error type of the stylize package: expected user mistakes (bad path, unknown style, bad file)."""
from common.errors import UserError


class StyleError(UserError):
    """A one-line, user-facing problem with a style, a style bank, a checkpoint or a training input."""
