"""The errors a user can cause, and the exit status every CLI ends with for them.

Each is a ``ValueError`` whose message is one line naming what is wrong (the
file, the argument, the tensor); CLIs print it as ``error: <message>`` on
stderr and exit with :data:`USER_ERROR_EXIT`, never with a traceback.
"""

USER_ERROR_EXIT = 2  # argparse's own status for bad arguments, so all user errors share it


class MTPError(ValueError):
    """Base class of the errors a user can cause (bad file, argument or model)."""


class AdapterError(MTPError):
    """An adapter that cannot be used with this model (or at all)."""


class DataError(MTPError):
    """Training data that cannot be read or used."""


class ModelLoadError(MTPError):
    """The model (or the default model) cannot be loaded."""
