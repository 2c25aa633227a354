"""Errors a user can act on: the CLI prints them as one line instead of a traceback."""


class LmscaleError(Exception):
    """A problem with the user's input or environment (exit code 1)."""

    exit_code = 1


class UsageError(LmscaleError):
    """Bad command-line usage or configuration (exit code 2)."""

    exit_code = 2
