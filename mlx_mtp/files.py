"""Writing files so that a crash, a full disk or a kill never leaves a half-written one."""

import os
import tempfile
from pathlib import Path
from typing import Callable, Union


def atomic_write(path: Union[str, Path], write: Callable[[str], None]):
    """Write ``path`` through ``write(tmp)`` on a temporary file in the same
    directory, then rename it over ``path``: readers see the old file or the
    new one, never a partial one. On any failure the temporary file is removed
    and the old file is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
