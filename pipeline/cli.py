"""The ``h5bank`` command.

Exit codes: 0 when it worked, 1 when the work failed (with a one-line reason
on stderr), 2 for a usage error.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import sys
from typing import Any

import click

from pipeline.errors import H5BankError
from pipeline.sources import scrub


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
        except Exception as error:
            expected = isinstance(error, (H5BankError, OSError, ValueError))
            if not expected and os.environ.get("H5BANK_TRACEBACK"):
                raise
            message = scrub(str(error))  # errors may quote URLs with credentials
            message = " ".join(line.strip() for line in message.splitlines() if line.strip())
            hint = "" if expected else " (H5BANK_TRACEBACK=1 shows where)"
            click.echo(f"h5bank: error: {type(error).__name__}: {message}{hint}", err=True)
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


SCHEDULER_HELP = (
    "Where to build: 'local' (an embedded local cluster, the default), 'threads', 'sync', "
    "tcp://host:port, or 'slurm' (dask-jobqueue, configs/jobqueue.yaml)."
)


@main.command()
@click.option(
    "--out", default="h5bank-demo", show_default=True, help="Folder for the samples and the bank."
)
@click.option("--scheduler", default=None, help=SCHEDULER_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--samples-only", is_flag=True, help="Only write the samples (OUT/samples), build nothing."
)
def demo(out: str, scheduler: str | None, quiet: bool, samples_only: bool) -> None:
    """Generate sample images and sounds, build them into OUT/demo.h5, print the bank."""
    from pipeline import demo as demo_module

    if samples_only:
        click.echo(demo_module.make_samples(os.path.join(out, "samples")))
        return
    bank = demo_module.run(out, scheduler=scheduler, progress=not quiet)
    with bank:
        click.echo(bank.tree())
        if quiet:  # otherwise create() has printed the summary under its progress bar
            click.echo(str(bank.summary))


class _Stopped(BaseException):
    """SIGTERM (Slurm's scancel, a time limit, kill) turned into an exception the build unwinds."""


def _stop(signum: int, frame: Any) -> None:
    # The cluster is torn down while the build unwinds; its errors are noise now.
    for name in [*logging.root.manager.loggerDict, "asyncio"]:
        if name.split(".")[0] in ("distributed", "asyncio", "tornado"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    raise _Stopped(signum)


def _jobs(text: str | None) -> dict[str, Any]:
    """``--jobs 4`` or ``--jobs 2:8`` (adaptive) as settings."""
    if text is None:
        return {}
    low, colon, high = text.partition(":")
    try:
        if colon:
            bounds = int(low), int(high)
            if not 1 <= bounds[0] <= bounds[1]:
                raise ValueError
            return {"h5bank.slurm.minimum-jobs": bounds[0], "h5bank.slurm.maximum-jobs": bounds[1]}
        jobs = int(text)
        if jobs < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give a number of jobs (4) or adaptive bounds (2:8), at least 1",
            param_hint="--jobs",
        ) from None
    return {
        "h5bank.slurm.jobs": jobs,
        "h5bank.slurm.minimum-jobs": None,
        "h5bank.slurm.maximum-jobs": None,
    }


@main.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--scheduler", default=None, help=SCHEDULER_HELP + " Default: the config's.")
@click.option(
    "--jobs", default=None, help="With --scheduler slurm: N jobs, or MIN:MAX to scale adaptively."
)
@click.option("--output", "-o", default=None, help="The bank to write (default: the config's).")
@click.option("--resume", is_flag=True, help="Continue a stopped build, or add missing sources.")
@click.option("--overwrite", is_flag=True, help="Build again even if the bank exists.")
@click.option("--dry-run", is_flag=True, help="Print what would run (the Slurm job script too).")
@click.option("--quiet", is_flag=True, help="No progress bar; print the summary at the end.")
def build(
    config_file: str,
    scheduler: str | None,
    jobs: str | None,
    output: str | None,
    resume: bool,
    overwrite: bool,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Build the bank a build CONFIG describes (see configs/builds/).

    CONFIG names the bank type (or its features), the sources, the output
    and where to run; ~/.config/dask and DASK_* variables override it, and
    these options override both. Inside an sbatch job the local cluster is
    sized from the job's allocation. SIGTERM (scancel, a time limit) or
    Ctrl-C stops the build and says what it kept for --resume.
    """
    from pipeline import buildconfig

    # "Task exception was never retrieved" from a cluster torn down after an
    # error: the error itself is reported in one line below.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    overrides: dict[str, Any] = {**_jobs(jobs)}
    if scheduler is not None:
        overrides["h5bank.build.scheduler"] = scheduler
    if output is not None:
        overrides["h5bank.build.output"] = output
    plan = buildconfig.load(config_file, overrides)
    if jobs is not None and plan.scheduler != "slurm":
        raise click.UsageError(f"--jobs applies to --scheduler slurm, not {plan.scheduler!r}")
    if dry_run:
        click.echo(f"h5bank build {config_file}: dry run, nothing is built or submitted")
        click.echo(plan.describe())
        return
    partial = _refuse_to_replace(plan, resume, overwrite)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        bank = plan.run(mode="a" if resume else "w", progress=not quiet)
    except _Stopped as stop:
        kept = (
            f"{partial} keeps every source committed so far: resume with "
            f"`h5bank build {config_file} --resume`"
            if partial and os.path.exists(partial)
            else "nothing was committed"
        )
        name = signal.Signals(stop.args[0]).name
        click.echo(f"h5bank: error: stopped by {name} before the build finished; {kept}", err=True)
        sys.exit(128 + stop.args[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    with bank:
        if quiet:
            click.echo(str(bank.summary))


def _refuse_to_replace(plan: Any, resume: bool, overwrite: bool) -> str | None:
    """Refuse to replace the bank or a stopped build unless told to; the partial file's path."""
    import dask

    from pipeline import config, layout
    from pipeline.sources import is_url

    with dask.config.set(plan.settings):
        storage_options = config.storage_options()
    if is_url(plan.output):
        from pipeline.readers import remote_fs

        fs, path = remote_fs(plan.output, storage_options)
        if not overwrite and fs.exists(path):
            raise FileExistsError(
                f"{scrub(plan.output)} exists: --overwrite builds it again (a remote bank cannot "
                "be appended to: copy it here, build with --resume, upload it)"
            )
        return None
    target = os.path.abspath(plan.output)
    partial = layout.partial_path(target)
    has_bank, has_partial = os.path.exists(target), os.path.exists(partial)
    if has_bank and has_partial and not overwrite:
        raise FileExistsError(
            f"both {target} and {partial} (a build that stopped) exist: delete the partial file "
            "to keep the bank (--resume then adds what it lacks), move the bank away to resume "
            "the stopped build, or --overwrite to build again"
        )
    if not (resume or overwrite):
        if has_partial:
            raise FileExistsError(
                f"{partial} holds a build that stopped: --resume continues it, --overwrite "
                "starts again"
            )
        if has_bank:
            raise FileExistsError(
                f"{target} exists: --resume adds the sources it lacks, --overwrite builds it again"
            )
    return partial


@main.command(name="config")
@click.argument("key", required=False)
@click.option(
    "--build",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A build config to show merged in.",
)
def show_config(key: str | None, config_file: str | None) -> None:
    """Print the settings in force (h5bank and jobqueue.slurm), or the one at KEY.

    Packaged defaults (configs/*.yaml), then CONFIG's settings (with --build),
    then ~/.config/dask/*.yaml and DASK_* environment variables: each wins
    over the ones before. Secret-looking storage options show as ***.
    """
    import dask
    import yaml

    from pipeline import buildconfig, config
    from pipeline.errors import ConfigError

    settings = buildconfig.settings(config_file) if config_file else {}
    with dask.config.set(settings):
        if key is None:
            click.echo(config.effective(), nl=False)
            return
        try:
            value = dask.config.get(key)
        except KeyError:
            raise ConfigError(f"no setting {key!r}; `h5bank config` lists them") from None
        if isinstance(value, dict):
            click.echo(config.effective((key,)), nl=False)
        else:
            click.echo(
                yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
            )


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
    known, build finished. BANK may be the PATH.partial file a stopped build
    left: then what it commits is checked, the part a resume keeps.
    """
    from pipeline import layout, readers

    f = readers.open_for_reading(bank)
    try:
        stopped = bank.endswith(layout.PARTIAL_SUFFIX) and (layout.state(f) == layout.BUILDING)
        problem = next(layout.verify(f, data, stopped=stopped), None)
        if problem is not None:
            click.echo(f"h5bank: verify: {bank}: {scrub(problem)}", err=True)
            sys.exit(1)
        n, columns = layout.committed(f), len(list(layout.iter_columns(f)))
    finally:
        readers.close_file(f)
    checked = "structure and every chunk" if data else "structure"
    what = f"{n} sources committed by a stopped build (resumable)" if stopped else f"{n} sources"
    click.echo(f"ok: {bank}: {what}, {columns} columns ({checked} checked)")


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
