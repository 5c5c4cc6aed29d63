"""Which ids a bank holds, and at which rows, in a few bytes an id.

The writer checks every source it commits against the ids already there (a
resume, an append, a stream with repeats) and finds the rows ``map`` and
``set`` write to. A dict of 200,000 ids held 32 MB of the writer's memory, a
million 150 MB. :class:`IdIndex` keeps each id as its 64-bit hash and its
row, sorted (16 bytes an id); a hash that matches is confirmed against the
ids table itself, so two ids that share a hash are never taken for one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import h5py
import numpy as np

from pipeline.format import layout

__all__ = ["IdIndex"]

# Ids added since the last merge are held exactly, in a dict, up to this many (65,536 of them
# held 15 MB of a writer, their strings included; a merge costs a copy of the sorted arrays).
RECENT = 4096
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
        hashes = []
        for start in range(0, n, block):
            ids = layout.read_strings(table, start, min(n, start + block))
            hashes.append(np.fromiter((hasher(i) for i in ids), np.int64, len(ids)))
        self._hashes = np.concatenate(hashes) if hashes else np.empty(0, np.int64)
        self._rows = np.arange(len(self._hashes), dtype=np.int64)
        order = np.argsort(self._hashes, kind="stable")
        self._hashes, self._rows = self._hashes[order], self._rows[order]
        self._recent: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._hashes) + len(self._recent)

    def add(self, ids: Sequence[str], first: int) -> None:
        """Record ``ids`` at rows ``first``, ``first + 1``... (already written to the table)."""
        self._recent.update(
            zip(layout.storable_all(ids), range(first, first + len(ids)), strict=True)
        )
        if len(self._recent) >= RECENT:
            self._merge()

    def _merge(self) -> None:
        """Sort the recent ids into the arrays: one pass over them, not a new sort."""
        hashes = np.fromiter(map(self._hash, self._recent), np.int64, len(self._recent))
        rows = np.fromiter(self._recent.values(), np.int64, len(self._recent))
        order = np.argsort(hashes, kind="stable")
        hashes, rows = hashes[order], rows[order]
        at = np.searchsorted(self._hashes, hashes, "right")
        self._hashes, self._rows = (
            np.insert(self._hashes, at, hashes),
            np.insert(self._rows, at, rows),
        )
        self._recent = {}

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """The row of each of ``ids``; ``-1`` for an id not in the bank."""
        out = np.full(len(ids), -1, np.int64)
        ids = layout.storable_all(ids)  # as the table holds them
        recent = self._recent
        wanted = list(range(len(ids)))
        if recent:
            found = [recent.get(id_, -1) for id_ in ids]
            out[:] = found
            wanted = [position for position, row in enumerate(found) if row < 0]
        if not wanted or not len(self._hashes):
            return out
        hashes = np.fromiter((self._hash(ids[p]) for p in wanted), np.int64, len(wanted))
        low = np.searchsorted(self._hashes, hashes, "left")
        high = np.searchsorted(self._hashes, hashes, "right")
        matched = [(p, int(a), int(b)) for p, a, b in zip(wanted, low, high, strict=True) if a < b]
        if not matched:
            return out
        candidates = np.unique(np.concatenate([self._rows[a:b] for _, a, b in matched]))
        stored = dict(zip(candidates.tolist(), self._read(candidates), strict=True))
        for position, a, b in matched:
            for row in self._rows[a:b].tolist():
                if stored[row] == ids[position]:
                    out[position] = row
                    break
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
