"""``h5bank info``, ``verify``, ``ls`` and ``show``: what a bank holds, checked, listed, plotted."""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from typing import Any

import click

from pipeline.cli.isolation import isolated
from pipeline.cli.main import BANK, main
from pipeline.errors import NoDataError
from pipeline.files.handles import close_file, open_for_reading
from pipeline.format import layout
from pipeline.format.partial import PARTIAL_SUFFIX
from pipeline.format.verify import bank_problems
from pipeline.terminal import printable
from pipeline.urls import scrub

ALLOW_EXTERNAL = click.option(
    "--allow-external",
    is_flag=True,
    help="Follow external links, external storage and virtual datasets pointing out of BANK "
    "(refused by default: a bank from someone else could read your files that way).",
)


@main.command()
@click.argument("bank", type=BANK)
@ALLOW_EXTERNAL
@isolated
def info(bank: str, allow_external: bool) -> None:
    """Print BANK's tree: groups, features, shapes, dtypes, compression, sizes, sources."""
    from pipeline.bank.typedfile import TypedFile

    with TypedFile(bank, **_trust(allow_external)) as f:
        click.echo(f.tree())  # control characters escaped (bank.display)
        failures = f.failures()
        for failure in failures[:20]:
            click.echo(f"failed: {printable(failure)}")
        if len(failures) > 20:
            click.echo(f"... and {len(failures) - 20} more failed sources")


@main.command()
@click.argument("bank", type=BANK)
@click.option("--data", is_flag=True, help="Also read every chunk back (fletcher32 checksums).")
@ALLOW_EXTERNAL
@isolated
def verify(bank: str, data: bool, allow_external: bool) -> None:
    """Check BANK's structure; exit 1 with the first problem found.

    Refs inside data and not overlapping, one refs / shape row per committed
    id, shape tables matching refs, failure tables agreeing, format version
    known, build finished. BANK may be the PATH.partial file a stopped build
    left: then what it commits is checked, the part a resume keeps.
    """

    f = open_for_reading(bank, unchecked=True)  # bank_problems checks what the file points to
    try:
        stopped = bank.endswith(PARTIAL_SUFFIX) and (layout.state(f) == layout.BUILDING)
        problem = next(bank_problems(f, data, stopped, allow_external), None)
        if problem is not None:
            click.echo(f"h5bank: verify: {bank}: {printable(scrub(problem))}", err=True)
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
@ALLOW_EXTERNAL
@isolated
def ls(bank: str, pattern: str | None, allow_external: bool) -> None:
    """List BANK's source ids (those matching the glob PATTERN), in commit order.

    Control characters in ids are shown escaped (\\x1b), never sent to the terminal.
    """
    from pipeline.bank.typedfile import TypedFile

    with TypedFile(bank, **_trust(allow_external)) as f:
        table, n = f.h5[layout.IDS], len(f)
        for start in range(0, n, _IDS_AT_ONCE):  # in blocks: memory stays flat on any bank
            for id_ in layout.read_strings(table, start, min(n, start + _IDS_AT_ONCE)):
                if pattern is None or fnmatch.fnmatchcase(id_, pattern):
                    click.echo(printable(id_))


# Ids ls reads at once (a few MB).
_IDS_AT_ONCE = 1 << 16


def _trust(allow_external: bool) -> dict[str, Any]:
    """The ``TypedFile`` options of ``--allow-external``."""
    return {"allow_external": True} if allow_external else {}


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
@ALLOW_EXTERNAL
@isolated
def show(
    bank: str, source_id: str, feature_path: str | None, out: str | None, allow_external: bool
) -> None:
    """Plot source ID of BANK with its feature's plot method; print the file written.

    An image feature draws a thumbnail, a sound feature its waveform against
    seconds. Nothing opens a window: the figure is saved (with matplotlib's
    Agg backend), to --out or to ./ID.png, and its path printed on stdout;
    the feature chosen is named on stderr. Needs matplotlib
    (pip install 'h5bank[plot]'). `h5bank ls BANK` lists the ids.
    """
    from features import Image
    from features.plot import figure_class
    from pipeline.bank.typedfile import TypedFile

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
    with TypedFile(bank, **_trust(allow_external)) as f:
        _require_id(f, source_id)
        path, proxy, value = _plottable(f, source_id, feature_path)
        feature = proxy.feature
        click.echo(
            f"h5bank: plotting {printable(path)} ({type(feature).__name__}) of {source_id!r}",
            err=True,
        )
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
    from pipeline.bank.proxies import FeatureProxy, GroupProxy

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
            raise NoDataError(f"source {source_id!r} has no data in feature {chosen.path!r}")
        return chosen.path, chosen, value
    for proxy in can_plot:
        value = proxy.get(source_id)
        if value is not None:
            return proxy.path, proxy, value
    listed = ", ".join(f"{p.path} ({type(p.feature).__name__})" for p in everything)
    raise NoDataError(
        f"source {source_id!r} has no data in a feature that plots (images, sounds); "
        f"the bank's features: {listed}"
    )
