"""``python -m mlx_mtp <command> ...``: see :mod:`mlx_mtp.cli`."""

import sys

from .cli import main

sys.exit(main())
