"""``h5bank image-bank`` and ``h5bank sound-bank``: a bank of one kind of file in a folder."""

from __future__ import annotations

import logging
import shlex
from typing import Any

import click

from pipeline.cli.main import SCHEDULER_HELP, main, run_build
from pipeline.terminal import printable
from pipeline.urls import scrub


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
    build_config = buildconfig.inline(
        features, [], output, bank_name, f"h5bank {command}", overrides
    )
    build_config.sources = _files_taken_by(build_config, member, directory)
    again = f"`h5bank {command} {shlex.quote(directory)} {shlex.quote(output)} --resume` (and "
    again += "the same options)"
    bank = run_build(build_config, resume, overwrite, quiet, again)
    with bank:
        if not quiet:  # create() has printed the summary under its progress bar
            click.echo(bank.tree())  # control characters escaped (bank.display)
        elif bank.summary is not None and bank.summary.failed:
            click.echo(
                f"h5bank: warning: {bank.summary.failed} sources failed; "
                f"`h5bank info {printable(shlex.quote(output))}` lists them",
                err=True,
            )


def _files_taken_by(build_config: Any, member: str, directory: str) -> list[Any]:
    """The files under ``directory`` whose names the feature ``member`` takes, in build order.

    Listed here, as h5mapper's commands did, so other files (notes, metadata)
    are not built as failed sources.
    """
    import warnings

    import dask

    from pipeline import config
    from pipeline.sources import EmptySourceWarning, expand

    feature = build_config.bank.__schema__[member]
    with dask.config.set(build_config.settings), warnings.catch_warnings():
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
@click.option(
    "--exact",
    is_flag=True,
    help="With --size, decode every JPEG at full size before resizing, so every pixel equals "
    "Pillow's full decode + resize. Default: a JPEG at least twice --size on both sides is "
    "decoded at 1/2, 1/4 or 1/8 scale first (faster; pixels differ slightly, see docs/features.md).",
)
@_bank_options
def image_bank(
    directory: str,
    output: str,
    size: tuple[int, int] | None,
    mode: str | None,
    exact: bool,
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
        spec["draft"] = not exact
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
    with libsndfile, resampled to --sr, stored as the files hold their samples
    (int16 for 16-bit PCM...) and read as float32; sounds are concatenated
    in time and each source's refs are its sample range) and `labels`
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
