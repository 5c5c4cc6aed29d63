"""Running a command on a bank from someone else in a child process, so a crash of HDF5's C
library on a damaged file becomes one line, not a dead terminal command.

h5bank checks what it can before reading (:mod:`pipeline.format.trust`), but
HDF5 parses every byte of a file's metadata in C, and has crashed on crafted
files before (a long list of CVEs). ``info``, ``ls``, ``show`` and ``verify``
therefore fork: the child runs the command and writes its output as usual;
the parent waits. A child killed by a signal is reported as a damaged file
(exit code 1); an error the child raised is raised again in the parent, which
reports it as every command does.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.errors import DamagedBankError

F = TypeVar("F", bound=Callable[..., Any])

# Set to run the commands in this process (a debugger, a profiler, H5BANK_TRACEBACK's traceback).
INLINE = "H5BANK_NO_FORK"


def isolated(command: F) -> F:
    """``command`` (a click callback whose first argument is the bank), run in a forked
    child; its exceptions and exit code come back to this process."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get(INLINE) or os.environ.get("H5BANK_TRACEBACK") or not _real_streams():
            return command(*args, **kwargs)
        bank = kwargs.get("bank", args[0] if args else "the bank")
        sys.stdout.flush()
        sys.stderr.flush()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run, send an error back, never return into click
            os.close(read)
            os._exit(_child(command, args, kwargs, write))
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            sent = pipe.read()
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            raise DamagedBankError(
                f"{bank} is damaged or crafted: HDF5 crashed reading it ({name}); nothing "
                "else was affected. h5bank cannot read this file"
            )
        if sent:
            raise pickle.loads(sent)
        code = os.WEXITSTATUS(status)
        if code:
            sys.exit(code)
        return None

    return run  # type: ignore[return-value]


def _real_streams() -> bool:
    """Whether this process can fork and its output goes to real files, which a child writes
    to as well (not click's CliRunner, which captures output in memory)."""
    try:
        return hasattr(os, "fork") and sys.stdout.fileno() >= 0 and sys.stderr.fileno() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def _child(command: Callable[..., Any], args: Any, kwargs: Any, write: int) -> int:
    code = 0
    error: BaseException | None = None
    try:
        command(*args, **kwargs)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as raised:
        error = raised
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError as broken:  # `h5bank ls BANK | head`: the parent stops quietly
        error = error or broken
    if error is not None:
        try:
            sent = pickle.dumps(error)
            pickle.loads(sent)
        except Exception:
            sent = pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))
        with os.fdopen(write, "wb") as pipe:
            pipe.write(sent)
        return 1
    os.close(write)
    return code
