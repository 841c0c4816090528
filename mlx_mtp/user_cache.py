"""Where mlx_mtp keeps what it caches for the user (the default model, the
calibration tables): one root, one rule.

The root is ``$MLX_MTP_CACHE``, else ``$XDG_CACHE_HOME/mlx_mtp``, else
``~/.cache/mlx_mtp``. An empty variable counts as unset, and so does a
relative ``$XDG_CACHE_HOME`` (the XDG base directory specification says to
ignore one).
"""

import os
from pathlib import Path
from typing import Union

NAME = "mlx_mtp"  # the directory under the user's cache


def cache_root(override: Union[str, Path, None] = None) -> Path:
    """The cache root: ``override`` if given, else the environment's (module
    docstring)."""
    if override is not None:
        return Path(override)
    own = os.environ.get("MLX_MTP_CACHE")
    if own:
        return Path(own)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / NAME
    return Path.home() / ".cache" / NAME
