"""The ``h5bank`` command: the click group of :mod:`pipeline.cli.main`, with one module per
family of commands (build, banks, inspection, settings) adding its commands to it.

Exit codes: 0 when it worked, 1 when the work failed (with a one-line reason
on stderr), 2 for a usage error.
"""

from pipeline.cli import banks, build, inspection, settings  # noqa: F401  (they add the commands)
from pipeline.cli.main import main

__all__ = ["main"]
