"""The ``h5bank`` command.

Exit codes: 0 when it worked, 1 when the work failed (with a one-line reason
on stderr), 2 for a usage error.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shlex
import signal
import sys
from typing import Any

import click

from pipeline.errors import H5BankError
from pipeline.files.handles import close_file, open_for_reading
from pipeline.format import layout
from pipeline.format.partial import PARTIAL_SUFFIX, partial_path
from pipeline.format.verify import bank_problems
from pipeline.urls import scrub


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
        from pipeline.urls import is_url

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
    bank = _run(plan, resume, overwrite, quiet, f"`h5bank build {config_file} --resume`")
    with bank:
        if quiet:
            click.echo(str(bank.summary))


def _run(plan: Any, resume: bool, overwrite: bool, quiet: bool, resume_with: str) -> Any:
    """Run a build plan (``buildconfig.BuildConfig``) as the build commands do; the bank, open.

    Refuses to replace a bank or a stopped build unless told (``resume``,
    ``overwrite``). SIGTERM (scancel, a time limit) or Ctrl-C stops the build
    and says what it kept and that ``resume_with`` continues it.
    """
    partial = _refuse_to_replace(plan, resume, overwrite)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return plan.run(mode="a" if resume else "w", progress=not quiet)
    except _Stopped as stop:
        kept = (
            f"{partial} keeps every source committed so far: resume with {resume_with}"
            if partial and os.path.exists(partial)
            else "nothing was committed"
        )
        name = signal.Signals(stop.args[0]).name
        click.echo(f"h5bank: error: stopped by {name} before the build finished; {kept}", err=True)
        sys.exit(128 + stop.args[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _refuse_to_replace(plan: Any, resume: bool, overwrite: bool) -> str | None:
    """Refuse to replace the bank or a stopped build unless told to; the partial file's path."""
    import dask

    from pipeline import config
    from pipeline.urls import is_url

    with dask.config.set(plan.settings):
        storage_options = config.storage_options()
    if is_url(plan.output):
        from pipeline.files.remote import remote_fs

        fs, path = remote_fs(plan.output, storage_options)
        if not overwrite and fs.exists(path):
            raise FileExistsError(
                f"{scrub(plan.output)} exists: --overwrite builds it again (a remote bank cannot "
                "be appended to: copy it here, build with --resume, upload it)"
            )
        return None
    target = os.path.abspath(plan.output)
    partial = partial_path(target)
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


# -- banks of one kind of file: image-bank, sound-bank -------------------------------------


class _Folder(click.ParamType):
    """A folder of sources: an existing local directory, or an fsspec URL of one."""

    name = "dir"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from pipeline.urls import is_url

        text = str(value)
        if is_url(text):
            return text if text.endswith("/") else text + "/"  # a URL lists only as a folder
        return click.Path(exists=True, file_okay=False).convert(text, param, ctx)


class _Size(click.ParamType):
    """``--size 64x48`` (height x width) or ``--size 64`` (64x64), as ``(height, width)``."""

    name = "HxW"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        height, x, width = str(value).strip().lower().partition("x")
        try:
            size = (int(height), int(width if x else height))
        except ValueError:
            self.fail(f"{value!r}: give HxW (64x48: height by width) or N (N by N)", param, ctx)
        if min(size) < 1:
            self.fail(f"{value!r}: height and width must be at least 1", param, ctx)
        return size


class _Compression(click.ParamType):
    """``--compression``: a filter name and an optional level, as a feature's dataset options.

    ``none``, ``gzip`` / ``gzip-N`` (0-9), ``lzf`` (h5py's own; any HDF5
    reader with h5py opens them); ``zstd`` / ``zstd-N``, ``lz4``,
    ``blosc`` / ``blosc-N``, ``bzip2`` / ``bzip2-N`` need hdf5plugin, to
    write and to read (``pip install 'h5bank[compression]'``).
    """

    name = "compression"
    NAMES = ("none", "gzip", "lzf", "zstd", "lz4", "blosc", "bzip2")
    LEVELS = {"gzip": (0, 9), "zstd": (1, 22), "blosc": (0, 9), "bzip2": (1, 9)}

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        text = str(value).strip().lower()
        name, dash, level_text = text.partition("-")
        if name not in self.NAMES:
            self.fail(
                f"{value!r}: use one of {', '.join(self.NAMES)} (gzip-4: with a level)", param, ctx
            )
        level = None
        if dash:
            low, high = self.LEVELS.get(name, (0, -1))
            if not level_text.isdigit() or not low <= int(level_text) <= high:
                hint = f"a level from {low} to {high}" if high >= 0 else "no level"
                self.fail(f"{value!r}: {name} takes {hint}", param, ctx)
            level = int(level_text)
        if name == "none":
            return {}
        if name in ("gzip", "lzf"):
            return {"compression": name, **({"compression_opts": level} if dash else {})}
        try:
            import hdf5plugin
        except ImportError:
            self.fail(
                f"{value!r} needs hdf5plugin: pip install 'h5bank[compression]' (or use gzip, lzf)",
                param,
                ctx,
            )
        if name == "zstd":
            filter_ = hdf5plugin.Zstd(**({"clevel": level} if dash else {}))
        elif name == "lz4":
            filter_ = hdf5plugin.LZ4()
        elif name == "blosc":
            filter_ = hdf5plugin.Blosc(cname="lz4", **({"clevel": level} if dash else {}))
        else:
            filter_ = hdf5plugin.BZip2(**({"blocksize": level} if dash else {}))
        return {"compression": filter_}


FOLDER = _Folder()
COMPRESSION_HELP = (
    "HDF5 filter of the data: none, gzip, gzip-N (level 0-9), lzf; with hdf5plugin also zstd, "
    "zstd-N, lz4, blosc, blosc-N, bzip2."
)


def _bank_options(command: Any) -> Any:
    """The options image-bank and sound-bank share, after their own."""
    for option in reversed(
        [
            click.option(
                "--compression",
                type=_Compression(),
                metavar="NAME[-LEVEL]",
                default="none",
                show_default=True,
                help=COMPRESSION_HELP,
            ),
            click.option("--scheduler", default=None, help=SCHEDULER_HELP),
            click.option(
                "--resume", is_flag=True, help="Continue a stopped build, or add new files."
            ),
            click.option("--overwrite", is_flag=True, help="Build again even if OUT exists."),
            click.option("--quiet", is_flag=True, help="No progress bar, summary or tree."),
        ]
    ):
        command = option(command)
    return command


def _build_folder(
    command: str,
    bank_name: str,
    member: str,
    spec: dict[str, Any],
    directory: str,
    output: str,
    compression: dict[str, Any],
    scheduler: str | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Build every file of ``directory`` that feature ``spec`` takes, with folder labels.

    The bank type is made by :func:`pipeline.buildconfig.inline`, as an
    inline build config's is: ``{member: spec, "labels": "DirLabels"}``.
    """
    from pipeline import buildconfig

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # see build
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    overrides = {} if scheduler is None else {"h5bank.build.scheduler": scheduler}
    features = {member: {**spec, **compression}, "labels": "DirLabels"}
    plan = buildconfig.inline(features, [], output, bank_name, f"h5bank {command}", overrides)
    plan.sources = _files_taken_by(plan, member, directory)
    again = f"`h5bank {command} {shlex.quote(directory)} {shlex.quote(output)} --resume` (and "
    again += "the same options)"
    bank = _run(plan, resume, overwrite, quiet, again)
    with bank:
        if not quiet:  # create() has printed the summary under its progress bar
            click.echo(bank.tree())
        elif bank.summary is not None and bank.summary.failed:
            click.echo(
                f"h5bank: warning: {bank.summary.failed} sources failed; `h5bank info {output}` "
                "lists them",
                err=True,
            )


def _files_taken_by(plan: Any, member: str, directory: str) -> list[Any]:
    """The files under ``directory`` whose names the feature ``member`` takes, in build order.

    Listed here, as h5mapper's commands did, so other files (notes, metadata)
    are not built as failed sources.
    """
    import warnings

    import dask

    from pipeline import config
    from pipeline.sources import EmptySourceWarning, expand

    feature = plan.bank.__schema__[member]
    with dask.config.set(plan.settings), warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptySourceWarning)
        found = [s for s in expand(directory, config.storage_options()) if feature.accepts(s.id)]
    if not found:
        raise FileNotFoundError(
            f"{scrub(directory)} holds no {type(feature).__name__.lower()} files (no visible "
            f"file name matches {feature.__re__})"
        )
    return found


@main.command(name="image-bank")
@click.argument("directory", metavar="DIR", type=FOLDER)
@click.argument("output", metavar="OUT")
@click.option(
    "--size",
    type=_Size(),
    metavar="HxW|N",
    default=None,
    help="Resize every image to HxW (64x48: height by width) or NxN (64). Default: each "
    "image keeps its size (stored flattened, read back in its own shape).",
)
@click.option(
    "--mode",
    type=click.Choice(["RGB", "RGBA", "L", "LA"], case_sensitive=False),
    metavar="RGB|RGBA|L|LA",
    default=None,
    help="Convert every image to this Pillow mode (L: grayscale). Set it when the folder "
    "mixes RGB, RGBA and grayscale and --size is given. Default: each file's own.",
)
@_bank_options
def image_bank(
    directory: str,
    output: str,
    size: tuple[int, int] | None,
    mode: str | None,
    compression: dict[str, Any],
    scheduler: str | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Build every image under DIR into the bank OUT, labelled by folder.

    OUT holds two features: `images` (Image: PNG, JPEG, BMP, GIF, TIFF,
    WebP, decoded with Pillow) and `labels` (DirLabels: the name of the
    folder holding each image, so DIR/cats/01.png is labelled "cats"; images
    directly in DIR get no label). Other files are left out. Ids are paths
    relative to DIR; DIR may be a URL (s3://bucket/photos/), whose files
    keep their full URL as their id.

    An existing OUT, or a stopped build's OUT.partial, is kept unless
    --overwrite (build again) or --resume (continue, or add new files) is
    given. Prints the build summary and the bank's tree at the end.
    """
    spec: dict[str, Any] = {"type": "Image", "mode": mode.upper() if mode else None}
    if size is not None:
        spec["size"] = size
    _build_folder(
        "image-bank", "ImageBank", "images", spec, directory, output, compression,
        scheduler, resume, overwrite, quiet,
    )  # fmt: skip


@main.command(name="sound-bank")
@click.argument("directory", metavar="DIR", type=FOLDER)
@click.argument("output", metavar="OUT")
@click.option(
    "--sr",
    type=click.IntRange(min=1),
    default=22050,
    show_default=True,
    help="Sample rate every sound is resampled to (and recorded in the bank).",
)
@click.option(
    "--mono/--stereo",
    default=True,
    show_default=True,
    help="Average the channels into one, or keep them (then every file must have as many).",
)
@_bank_options
def sound_bank(
    directory: str,
    output: str,
    sr: int,
    mono: bool,
    compression: dict[str, Any],
    scheduler: str | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Build every sound under DIR into the bank OUT, labelled by folder.

    OUT holds two features: `sound` (Sound: WAV, FLAC, OGG, AIFF... read
    with libsndfile, resampled to --sr, float32; sounds are concatenated in
    time and each source's refs are its sample range) and `labels`
    (DirLabels: the name of the folder holding each file; files directly in
    DIR get no label). Other files are left out. Ids are paths relative to
    DIR; DIR may be a URL (s3://bucket/sounds/), whose files keep their full
    URL as their id.

    An existing OUT, or a stopped build's OUT.partial, is kept unless
    --overwrite (build again) or --resume (continue, or add new files) is
    given. Prints the build summary and the bank's tree at the end.
    """
    spec = {"type": "Sound", "sr": sr, "mono": mono}
    _build_folder(
        "sound-bank", "SoundBank", "sound", spec, directory, output, compression,
        scheduler, resume, overwrite, quiet,
    )  # fmt: skip


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
    config.load_jobqueue_defaults()  # jobqueue.slurm.* has h5bank's defaults, with or without --build
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
        elif config.is_secret(key):
            click.echo("***")
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

    f = open_for_reading(bank)  # registers hdf5plugin's filters, for --data
    try:
        stopped = bank.endswith(PARTIAL_SUFFIX) and (layout.state(f) == layout.BUILDING)
        problem = next(bank_problems(f, data, stopped=stopped), None)
        if problem is not None:
            click.echo(f"h5bank: verify: {bank}: {scrub(problem)}", err=True)
            sys.exit(1)
        n, columns = layout.committed(f), len(list(layout.iter_columns(f)))
    finally:
        close_file(f)
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


@main.command()
@click.argument("bank", type=BANK)
@click.argument("source_id", metavar="ID")
@click.option(
    "--feature",
    "feature_path",
    default=None,
    help="The feature to plot (images, data/images). Default: the first one that can plot "
    "and has data for ID.",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="The file to write; its extension picks the format (png, pdf, svg, jpg...). Default: "
    "./ID.png, with / in ID as _.",
)
def show(bank: str, source_id: str, feature_path: str | None, out: str | None) -> None:
    """Plot source ID of BANK with its feature's plot method; print the file written.

    An image feature draws a thumbnail, a sound feature its waveform against
    seconds. Nothing opens a window: the figure is saved (with matplotlib's
    Agg backend), to --out or to ./ID.png, and its path printed on stdout;
    the feature chosen is named on stderr. Needs matplotlib
    (pip install 'h5bank[plot]'). `h5bank ls BANK` lists the ids.
    """
    from features import Image
    from features.plot import figure_class
    from pipeline.typedfile import TypedFile

    figure_class()  # matplotlib, or how to install it, before anything is read
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    if out is None:
        out = re.sub(r"[^\w.\-]+", "_", source_id).lstrip(".") + ".png"
    extension = os.path.splitext(out)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension not in formats:
        raise click.BadParameter(
            f"{out!r}: the extension says the format; use one of {', '.join(sorted(formats))}",
            param_hint="--out",
        )
    with TypedFile(bank) as f:
        _require_id(f, source_id)
        path, proxy, value = _plottable(f, source_id, feature_path)
        feature = proxy.feature
        click.echo(f"h5bank: plotting {path} ({type(feature).__name__}) of {source_id!r}", err=True)
        options = {"size": 4.0} if isinstance(feature, Image) else {}  # one thumbnail, larger
        fig = proxy.plot(value, titles=[source_id], **options)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    click.echo(out)


def _require_id(bank: Any, source_id: str) -> None:
    """Nothing if ``bank`` has ``source_id``; else an ``UnknownIdError`` naming similar ids."""
    import difflib

    from pipeline.errors import UnknownIdError

    if source_id in bank:
        return
    close = difflib.get_close_matches(source_id, bank.ids, n=5, cutoff=0.6)
    similar = (
        f"similar ids: {', '.join(repr(i) for i in close)}"
        if close
        else "ids look like " + ", ".join(repr(i) for i in bank.ids[:3])
    )
    raise UnknownIdError(
        f"no source {source_id!r} in {scrub(bank.path)} ({len(bank)} sources; {similar}); "
        f"`h5bank ls {scrub(bank.path)}` lists them"
    )


def _plottable(bank: Any, source_id: str, feature_path: str | None) -> tuple[str, Any, Any]:
    """The feature to plot ``source_id`` with: its path, its proxy and the source's data."""
    from pipeline.typedfile import FeatureProxy, GroupProxy

    def features(group: GroupProxy) -> Any:
        for name in group.children():
            child = bank.feature(f"{group.path}/{name}" if group.path else name)
            if isinstance(child, GroupProxy):
                yield from features(child)
            elif isinstance(child, FeatureProxy):
                yield child

    everything = list(features(bank.root))
    can_plot = [p for p in everything if callable(getattr(p.feature, "plot", None))]
    if feature_path is not None:
        chosen = next((p for p in everything if p.path == feature_path.strip("/")), None)
        if chosen is None or chosen not in can_plot:
            why = "no feature" if chosen is None else f"{type(chosen.feature).__name__} cannot plot"
            names = ", ".join(p.path for p in can_plot) or "none"
            raise click.BadParameter(
                f"{feature_path!r}: {why}; features that plot: {names}", param_hint="--feature"
            )
        value = chosen.get(source_id)
        if value is None:
            raise ValueError(f"source {source_id!r} has no data in feature {chosen.path!r}")
        return chosen.path, chosen, value
    for proxy in can_plot:
        value = proxy.get(source_id)
        if value is not None:
            return proxy.path, proxy, value
    listed = ", ".join(f"{p.path} ({type(p.feature).__name__})" for p in everything)
    raise ValueError(
        f"source {source_id!r} has no data in a feature that plots (images, sounds); "
        f"the bank's features: {listed}"
    )


if __name__ == "__main__":
    main()
