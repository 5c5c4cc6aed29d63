"""Which ids a bank holds, and at which rows, in a few bytes an id.

The writer checks every source it commits against the ids already there (a
resume, an append, a stream with repeats) and finds the rows ``map`` and
``set`` write to. A dict of 200,000 ids held 32 MB of the writer's memory, a
million 150 MB. :class:`IdIndex` keeps each id as its 64-bit hash and its
row, in sorted runs (16 bytes an id); a hash that matches is confirmed
against the ids table itself, so two ids that share a hash are never taken
for one. A commit's ids become a new run, and runs of similar length are
merged (as a binary counter carries), so adding costs a few sorted merges
an id over a build and a batch is looked up in a few vectorized searches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import h5py
import numpy as np

from pipeline.format import layout

__all__ = ["IdIndex"]

# Rows read to confirm matches: one slice when they are this close together, else one by one.
SPAN = 4096


class IdIndex:
    """Id -> row for the first ``n`` ids of ``table`` (a bank's ids table), and those added.

    ``rows(ids)`` answers a batch at once: a row per id, ``-1`` where absent.
    ``hasher`` is Python's string hash (cached on each string), replaceable
    for tests of colliding hashes.
    """

    def __init__(
        self,
        table: h5py.Dataset,
        n: int | None = None,
        block: int = 1 << 16,
        hasher: Callable[[str], int] = hash,
    ) -> None:
        self._table = table
        self._hash = hasher
        n = table.shape[0] if n is None else n
        hashes = [
            self._hashes_of(layout.read_strings(table, start, min(n, start + block)))
            for start in range(0, n, block)
        ]
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, their rows)
        if hashes:
            self._push(np.concatenate(hashes), 0)

    def __len__(self) -> int:
        return sum(len(hashes) for hashes, _ in self._runs)

    def _hashes_of(self, ids: Sequence[str]) -> np.ndarray:
        return np.fromiter(map(self._hash, ids), np.int64, len(ids))

    def _push(self, hashes: np.ndarray, first: int) -> None:
        order = np.argsort(hashes, kind="stable")
        self._runs.append((hashes[order], order.astype(np.int64) + first))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (a, ra), (b, rb) = self._runs.pop(-2), self._runs.pop()
            at = np.searchsorted(a, b, "right")
            self._runs.append((np.insert(a, at, b), np.insert(ra, at, rb)))

    def add(self, ids: Sequence[str], first: int) -> None:
        """Record ``ids`` at rows ``first``, ``first + 1``... (already written to the table)."""
        if len(ids):
            self._push(self._hashes_of(layout.storable_all(ids)), first)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """The row of each of ``ids``; ``-1`` for an id not in the bank."""
        out = np.full(len(ids), -1, np.int64)
        if not self._runs or not len(ids):
            return out
        ids = layout.storable_all(ids)  # as the table holds them
        hashes = self._hashes_of(ids)
        order = np.argsort(hashes)  # sorted needles: each search starts where the last ended
        needles = hashes[order]
        matched: list[tuple[int, np.ndarray]] = []  # (position, candidate rows)
        for run, run_rows in self._runs:
            low = np.searchsorted(run, needles, "left")
            hit = np.flatnonzero(run[np.minimum(low, len(run) - 1)] == needles)
            if not len(hit):
                continue
            high = np.searchsorted(run, needles[hit], "right")
            for i, stop in zip(hit.tolist(), high.tolist(), strict=True):
                matched.append((int(order[i]), run_rows[low[i] : stop]))
        if not matched:
            return out
        candidates = np.unique(np.concatenate([rows for _, rows in matched]))
        stored = dict(zip(candidates.tolist(), self._read(candidates), strict=True))
        for position, rows in matched:
            for row in rows.tolist():
                if out[position] < 0 and stored[row] == ids[position]:
                    out[position] = row
        return out

    def _read(self, rows: np.ndarray) -> list[str]:
        """The ids at ``rows`` (sorted), read from the table: one slice when they are close."""
        low, high = int(rows[0]), int(rows[-1]) + 1
        if high - low <= SPAN + 4 * len(rows):
            block = layout.read_strings(self._table, low, high)
            return [block[row - low] for row in rows.tolist()]
        return [layout.read_strings(self._table, row, row + 1)[0] for row in rows.tolist()]

    def get(self, id_: str, default: int = -1) -> int:
        row = int(self.rows([id_])[0])
        return default if row < 0 else row

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, str) and self.get(id_) >= 0

    def __getitem__(self, id_: str) -> int:
        row = self.get(id_)
        if row < 0:
            raise KeyError(id_)
        return row
