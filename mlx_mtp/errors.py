"""The errors a user can cause, and the exit status every CLI ends with for them.

Each is a ``ValueError`` whose message is one line naming what is wrong (the
file, the argument, the tensor); CLIs print it as ``error: <message>`` on
stderr and exit with :data:`USER_ERROR_EXIT`, never with a traceback.
"""

import os
import sys

USER_ERROR_EXIT = 2  # argparse's own status for bad arguments, so all user errors share it


class MTPError(ValueError):
    """Base class of the errors a user can cause (bad file, argument or model)."""


class AdapterError(MTPError):
    """An adapter that cannot be used with this model (or at all)."""


class DataError(MTPError):
    """Training data (or another JSONL file) that cannot be read or used."""


class ModelLoadError(MTPError):
    """The model (or the default model) cannot be loaded."""


class ConversionError(MTPError):
    """A GGUF file, PyTorch checkpoint or default model that cannot be converted."""


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its class name if it has none):
    what a CLI prints after ``error:`` for an error raised by a library."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def unexpected_error(error: Exception) -> int:
    """What a CLI does with an error no check foresaw: re-raise it when
    ``MLX_MTP_DEBUG`` is set (for the traceback), otherwise print it in one
    line on stderr. Returns the exit status, 1."""
    if os.environ.get("MLX_MTP_DEBUG"):
        raise error
    print(f"error: {type(error).__name__}: {one_line(error)} (set MLX_MTP_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1


class WriteError(MTPError):
    """A file that cannot be written (disk full, read-only directory); the
    file it was to replace is left as it was. ``reason`` is the system's
    word for the failure (e.g. "No space left on device")."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message
