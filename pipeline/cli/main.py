"""The ``h5bank`` click group, and what several of its commands share.

Exit codes: 0 when it worked, 1 when the work failed (with a one-line reason
on stderr), 2 for a usage error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import warnings
from typing import TYPE_CHECKING, Any

import click

from pipeline.errors import H5BankError
from pipeline.format.partial import BankFiles
from pipeline.terminal import printable
from pipeline.urls import hide_secrets, is_url, scrub

if TYPE_CHECKING:
    from pipeline.bank.typedfile import TypedFile
    from pipeline.buildconfig import BuildConfig


class _Command(click.Group):
    """Turns any error into one line on stderr and exit code 1.

    ``H5BANK_TRACEBACK=1`` shows the traceback of errors h5bank did not
    expect (those are a bug, or a crash such as a worker killed for memory).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:
            # The reader of stdout went away (`h5bank ls BANK | head`): stop quietly, and keep
            # Python from reporting it again when it flushes stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        except Exception as error:
            # ImportError: an optional extra is missing (its message says which to install)
            expected = isinstance(error, (H5BankError, OSError, ValueError, ImportError))
            if not expected and os.environ.get("H5BANK_TRACEBACK"):
                raise
            # Errors may quote URLs with credentials, settings holding secrets, and ids, names
            # and file names from a bank or a source (control characters shown escaped).
            message = hide_secrets(str(error))
            message = " ".join(line.strip() for line in message.splitlines() if line.strip())
            hint = "" if expected else " (H5BANK_TRACEBACK=1 shows where)"
            click.echo(
                f"h5bank: error: {type(error).__name__}: {printable(message)}{hint}", err=True
            )
            sys.exit(1)


class _Bank(click.ParamType):
    """A bank: an existing local file, or an fsspec URL (credentials from the environment
    or the ``h5bank.storage-options`` setting)."""

    name = "bank"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        text = str(value)
        if is_url(text):
            return text
        return click.Path(exists=True, dir_okay=False).convert(text, param, ctx)


BANK = _Bank()
"""The click type of a BANK argument: an existing local file, or an fsspec URL."""


@click.group(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="h5bank")
def main() -> None:
    """Build many small raw files into one HDF5 bank, and read it back."""
    warnings.showwarning = _warning_line


def _warning_line(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
    """A warning as the commands print it: one line on stderr, no source line, no secret."""
    text = printable(hide_secrets(" ".join(str(message).split())))
    click.echo(f"h5bank: warning: {category.__name__}: {text}", err=True)


SCHEDULER_HELP = (
    "Where to build: 'auto' (the default: threads for few or large local files, else an "
    "embedded local cluster), 'local' (an embedded local cluster), 'threads', 'sync', "
    "tcp://host:port, or 'slurm' (dask-jobqueue, configs/jobqueue.yaml)."
)
"""The help of the ``--scheduler`` option of the commands that build."""


class _Stopped(BaseException):
    """SIGTERM (Slurm's scancel, a time limit, kill) turned into an exception the build unwinds."""


def _stopper(partial: str | None) -> Any:
    """The handler of SIGTERM and SIGINT during a build: say at once that the build stops (Slurm
    sends SIGKILL a few seconds after SIGTERM, maybe before the cluster is closed and the last
    line said), then unwind it."""

    def stop(signum: int, frame: Any) -> None:
        # The cluster is torn down while the build unwinds; its errors are noise now.
        for name in [*logging.root.manager.loggerDict, "asyncio"]:
            if name.split(".")[0] in ("distributed", "asyncio", "tornado"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        where = f"; what it committed stays in {printable(partial)}" if partial else ""
        line = f"\nh5bank: {signal.Signals(signum).name} received: stopping the build{where}\n"
        with contextlib.suppress(OSError, ValueError):  # a raw write: the handler may have
            os.write(sys.stderr.fileno(), line.encode(errors="replace"))  # cut a print short
        raise _Stopped(signum)

    return stop


def run_build(
    build_config: BuildConfig, resume: bool, overwrite: bool, quiet: bool, resume_with: str
) -> TypedFile:
    """Run a build config (``buildconfig.BuildConfig``) as the build commands do; the bank, open.

    Refuses to replace a bank or a stopped build unless told (``resume``,
    ``overwrite``). SIGTERM (scancel, a time limit) or Ctrl-C stops the build
    and says what it kept and that ``resume_with`` continues it.
    """
    partial = _refuse_to_replace(build_config, resume, overwrite)
    stop = _stopper(partial)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return build_config.run(mode="a" if resume else "w", progress=not quiet)
    except _Stopped as stop:
        kept = (
            f"{printable(partial)} keeps every source committed so far: resume with "
            f"{printable(resume_with)}"
            if partial and os.path.exists(partial)
            else "nothing was committed"
        )
        name = signal.Signals(stop.args[0]).name
        click.echo(f"h5bank: error: stopped by {name} before the build finished; {kept}", err=True)
        sys.exit(128 + stop.args[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _refuse_to_replace(build_config: BuildConfig, resume: bool, overwrite: bool) -> str | None:
    """Refuse to replace the bank or a stopped build unless told to; the partial file's path."""
    import dask

    from pipeline import config

    with dask.config.set(build_config.settings):
        storage_options = config.storage_options()
    if is_url(build_config.output):
        from pipeline.files.remote import remote_fs

        fs, path = remote_fs(build_config.output, storage_options)
        if not overwrite and fs.exists(path):
            raise FileExistsError(
                f"{scrub(build_config.output)} exists: --overwrite builds it again (a remote bank cannot "
                "be appended to: copy it here, build with --resume, upload it)"
            )
        return None
    files = BankFiles.at(os.path.abspath(build_config.output))
    files.refuse_to_replace(resume, overwrite)
    return files.partial
