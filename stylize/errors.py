"""The one error type of the stylize package: expected user mistakes (bad path, unknown style, bad file)."""


class StyleError(Exception):
    """A one-line, user-facing problem with a style, a style bank, a checkpoint or a training input."""
