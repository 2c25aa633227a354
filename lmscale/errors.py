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


def one_line(source: BaseException | str, limit: int | None = None) -> str:
    """What went wrong, on one line (at most ``limit`` characters): the one formatter of lmscale's messages.

    - an ``OSError``: its reason and errno ("No space left on device (errno 28)");
    - an error re-raised from a DataLoader worker, which carries the worker's traceback ("Caught LmscaleError in
      DataLoader worker process 0. Original Traceback ..."): the original message, on its last line;
    - another error: its message's lines joined (its type's name when it has none);
    - a tool's output (``str``: sbatch's, a converter's stderr): its last non-blank line, where tools say why.
    """
    if isinstance(source, str):
        lines = [line.strip() for line in source.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else "no output"
    elif isinstance(source, OSError) and source.strerror:
        text = f"{source.strerror} (errno {source.errno})"
    else:
        lines = str(source).strip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught "):
            text = lines[-1].split(": ", 1)[-1]
        else:
            text = " ".join(line.strip() for line in lines) or type(source).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
