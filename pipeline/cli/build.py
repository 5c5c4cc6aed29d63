"""``h5bank build`` (a bank from a build config) and ``h5bank demo`` (one from samples)."""

from __future__ import annotations

import logging
import os
import shlex
from typing import Any

import click

from pipeline.cli.main import SCHEDULER_HELP, main, run_build
from pipeline.terminal import printable


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
        click.echo(bank.tree())  # control characters escaped (bank.display)
        if quiet:  # otherwise create() has printed the summary under its progress bar
            click.echo(str(bank.summary))


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
@click.option(
    "--shards",
    default=None,
    help="Writer chains, each writing its own shard file on its own worker (N, or 'auto': one "
    "per worker process); the bank file joins them. Default: the config's (1, one file).",
)
@click.option("--resume", is_flag=True, help="Continue a stopped build, or add missing sources.")
@click.option("--overwrite", is_flag=True, help="Build again even if the bank exists.")
@click.option("--dry-run", is_flag=True, help="Print what would run (the Slurm job script too).")
@click.option("--quiet", is_flag=True, help="No progress bar; print the summary at the end.")
def build(
    config_file: str,
    scheduler: str | None,
    jobs: str | None,
    output: str | None,
    shards: str | None,
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
    if shards is not None:
        if shards != "auto" and not (shards.isdigit() and int(shards) >= 1):
            raise click.BadParameter(
                f"{shards!r}: give a number of shards (4), at least 1, or 'auto'",
                param_hint="--shards",
            )
        overrides["h5bank.build.shards"] = shards if shards == "auto" else int(shards)
    build_config = buildconfig.load(config_file, overrides)
    if jobs is not None and build_config.scheduler != "slurm":
        raise click.UsageError(
            f"--jobs applies to --scheduler slurm, not {build_config.scheduler!r}"
        )
    if dry_run:
        shown = printable(config_file)
        click.echo(f"h5bank build {shown}: dry run, nothing is built or submitted")
        click.echo(build_config.describe())  # credentials and control characters made safe
        return
    bank = run_build(
        build_config,
        resume,
        overwrite,
        quiet,
        f"`h5bank build {shlex.quote(config_file)} --resume`",
    )
    with bank:
        if quiet:
            click.echo(str(bank.summary))
