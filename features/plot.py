"""Figures of a feature's data: the grid of axes ``Image.plot`` and ``Sound.plot`` draw into.

matplotlib is an optional extra (``pip install 'h5bank[plot]'``), imported
only when a figure is made, so ``import features`` never pays for it.
Figures are plain :class:`matplotlib.figure.Figure` objects, not pyplot's:
nothing is registered with pyplot's global figure list (plotting in a loop
does not leak figures) and no GUI backend is needed, so they work headless
and in threads. ``fig.savefig("x.png")`` writes one; Jupyter shows the one a
cell returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'h5bank[plot]'"


def figure_class() -> type[Figure]:
    """matplotlib's ``Figure``, or an ``ImportError`` that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            f"plots need matplotlib, which is not installed: {INSTALL_HINT}"
        ) from error
    return Figure


def grid(
    n: int,
    ncols: int,
    cell: tuple[float, float],
    sharex: bool = False,
) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` axes in rows of ``ncols``, each ``cell`` = ``(width, height)`` inches.

    The figure holds exactly ``n`` axes, in reading order (the unused cells
    of the last row are left empty, not drawn as blank axes).
    """
    if n < 1:
        raise ValueError("nothing to plot: no data given")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    Figure = figure_class()
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(cell[0] * ncols, cell[1] * nrows), layout="constrained")
    spec = fig.add_gridspec(nrows, ncols)
    axes: list[Axes] = []
    for i in range(n):
        share = axes[0] if sharex and axes else None
        axes.append(fig.add_subplot(spec[i // ncols, i % ncols], sharex=share))
    return fig, axes


def titles_for(titles: str | Sequence[Any] | None, n: int) -> list[str | None]:
    """One title (or ``None``) per plotted item; a single string titles a single item."""
    if titles is None:
        return [None] * n
    if isinstance(titles, (str, bytes)):
        titles = [titles]
    given = ["" if t is None else str(t) for t in titles]
    if len(given) != n:
        raise ValueError(f"{len(given)} titles for {n} items to plot; give one title per item")
    return list(given)
