"""The errors a user can cause, and the exit status every CLI ends with for them.

Each is a ``ValueError`` whose message is one line naming what is wrong (the
file, the argument, the tensor); CLIs print it as ``error: <message>`` on
stderr and exit with :data:`USER_ERROR_EXIT`, never with a traceback.
:func:`cli_main` is the one wrapper that does so for every CLI's ``main``.
"""

import functools
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Type

USER_ERROR_EXIT = 2  # argparse's own status for bad arguments, so all user errors share it
INTERRUPTED_EXIT = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


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


def user_error_message(error: BaseException) -> str:
    """What a CLI prints after ``error:`` for a user error: the message's first
    line, or for an ``OSError`` the file and the system's reason."""
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return where + (error.strerror or one_line(error))
    return one_line(error)


CliMain = Callable[[Optional[Sequence[str]]], int]


def cli_main(
    main: Optional[CliMain] = None,
    *,
    user_errors: Tuple[Type[BaseException], ...] = (MTPError, OSError),
    interrupted: str = "interrupted",
    interrupted_exit: int = INTERRUPTED_EXIT,
    out_of_memory: Optional[str] = None,
):
    """Wrap a CLI's ``main(argv) -> int`` (as ``@cli_main`` or
    ``@cli_main(...)``) so that every way it can fail ends in one line on
    stderr and a known exit status:

    - ``user_errors`` (an :class:`MTPError`, a file that cannot be read or
      written): ``error: <message>``, :data:`USER_ERROR_EXIT`;
    - Ctrl-C: ``error: <interrupted>``, ``interrupted_exit``;
    - ``MemoryError``, where ``out_of_memory`` says what to try:
      ``error: out of memory; <out_of_memory>``, :data:`USER_ERROR_EXIT`;
    - anything else: :func:`unexpected_error` (status 1, or the traceback
      under ``MLX_MTP_DEBUG``).

    ``SystemExit`` (argparse's usage errors, ``sys.exit``) passes through.
    """

    def wrap(main: CliMain) -> CliMain:
        @functools.wraps(main)
        def wrapped(argv: Optional[List[str]] = None) -> int:
            try:
                return main(argv)
            except user_errors as e:
                print(f"error: {user_error_message(e)}", file=sys.stderr)
                return USER_ERROR_EXIT
            except KeyboardInterrupt:
                print(f"error: {interrupted}", file=sys.stderr)
                return interrupted_exit
            except MemoryError as e:
                if out_of_memory is None:
                    return unexpected_error(e)
                print(f"error: out of memory; {out_of_memory}", file=sys.stderr)
                return USER_ERROR_EXIT
            except Exception as e:
                return unexpected_error(e)

        return wrapped

    return wrap if main is None else wrap(main)
