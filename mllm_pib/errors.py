"""Errors the user can fix: the CLI prints them as one clear paragraph, without a traceback."""


class UserError(Exception):
    """Bad input, configuration or environment; the message says what, where and how to fix."""
