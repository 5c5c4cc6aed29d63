"""The ``h5bank`` command.

Exit codes: 0 when it worked, 1 when the work failed (with a one-line reason
on stderr), 2 for a usage error.
"""

from __future__ import annotations

import fnmatch
import sys
from typing import Any

import click

from pipeline.errors import H5BankError
from pipeline.sources import scrub


class _Command(click.Group):
    """Turns h5bank's errors and OS errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (H5BankError, OSError, ValueError) as error:
            message = scrub(str(error))  # errors may quote URLs with credentials
            click.echo(f"h5bank: error: {type(error).__name__}: {message}", err=True)
            sys.exit(1)


class _Bank(click.ParamType):
    """A bank: an existing local file, or an fsspec URL (credentials from the environment
    or the ``h5bank.storage-options`` setting)."""

    name = "bank"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from pipeline.sources import is_url

        text = str(value)
        if is_url(text):
            return text
        return click.Path(exists=True, dir_okay=False).convert(text, param, ctx)


BANK = _Bank()


@click.group(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="h5bank")
def main() -> None:
    """Build many small raw files into one HDF5 bank, and read it back."""


@main.command()
@click.option(
    "--out", default="h5bank-demo", show_default=True, help="Folder for the samples and the bank."
)
@click.option(
    "--scheduler",
    default=None,
    help="Where to build: default an embedded local cluster; 'threads', 'sync' or tcp://host:port.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def demo(out: str, scheduler: str | None, quiet: bool) -> None:
    """Generate sample images and sounds, build them into OUT/demo.h5, print the bank."""
    from pipeline import demo as demo_module

    bank = demo_module.run(out, scheduler=scheduler, progress=not quiet)
    with bank:
        click.echo(bank.tree())
        if quiet:  # otherwise create() has printed the summary under its progress bar
            click.echo(str(bank.summary))


@main.command()
@click.argument("bank", type=BANK)
def info(bank: str) -> None:
    """Print BANK's tree: groups, features, shapes, dtypes, compression, sizes, sources."""
    from pipeline.typedfile import TypedFile

    with TypedFile(bank) as f:
        click.echo(f.tree())
        failures = f.failures()
        for failure in failures[:20]:
            click.echo(f"failed: {failure}")
        if len(failures) > 20:
            click.echo(f"... and {len(failures) - 20} more failed sources")


@main.command()
@click.argument("bank", type=BANK)
@click.option("--data", is_flag=True, help="Also read every chunk back (fletcher32 checksums).")
def verify(bank: str, data: bool) -> None:
    """Check BANK's structure; exit 1 with the first problem found.

    Refs inside data and not overlapping, one refs / shape row per committed
    id, shape tables matching refs, failure tables agreeing, format version
    known, build finished. BANK may be a PATH.partial file of a stopped build.
    """
    from pipeline import layout, readers

    f = readers.open_for_reading(bank)
    try:
        problem = next(layout.verify(f, data), None)
        if problem is not None:
            click.echo(f"h5bank: verify: {bank}: {scrub(problem)}", err=True)
            sys.exit(1)
        n, columns = len(f[layout.IDS]), len(list(layout.iter_columns(f)))
    finally:
        readers.close_file(f)
    checked = "structure and every chunk" if data else "structure"
    click.echo(f"ok: {bank}: {n} sources, {columns} columns ({checked} checked)")


@main.command(name="ls")
@click.argument("bank", type=BANK)
@click.argument("pattern", required=False)
def ls(bank: str, pattern: str | None) -> None:
    """List BANK's source ids (those matching the glob PATTERN), in commit order."""
    from pipeline.typedfile import TypedFile

    with TypedFile(bank) as f:
        for id_ in f.ids:
            if pattern is None or fnmatch.fnmatchcase(id_, pattern):
                click.echo(id_)


if __name__ == "__main__":
    main()
