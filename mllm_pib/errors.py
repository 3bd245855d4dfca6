"""Errors the user can fix: the CLI prints them as one clear paragraph, without a traceback."""


class UserError(Exception):
    """Bad input, configuration or environment; the message says what, where and how to fix."""

    label = "error"
    exit_code = 2


class Interrupted(UserError):
    """The user stopped a command (Ctrl-C); the message says what was kept and how to go on."""

    label = "interrupted"
    exit_code = 130  # 128 + SIGINT, as shells report it
