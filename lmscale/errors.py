"""Errors a user can act on: the CLI prints them as one line instead of a traceback."""


class LmscaleError(Exception):
    """A problem with the user's input or environment (exit code 1)."""

    exit_code = 1


class UsageError(LmscaleError):
    """Bad command-line usage or configuration (exit code 2)."""

    exit_code = 2


class AgreedError(LmscaleError):
    """An error every rank of the job raises together, after agreeing on it through a collective: rank 0
    reports it and the others exit with the same code in silence, so the console shows it once."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.quiet = rank != 0


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. An error re-raised from a DataLoader worker carries the worker's
    traceback ("Caught LmscaleError in DataLoader worker process 0. Original Traceback ..."): its last line
    holds the original message."""
    lines = str(err).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)
