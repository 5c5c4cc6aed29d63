"""The writer's id index: exact answers in a few bytes an id, whatever the hashes do."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.format import ids as ids_module
from pipeline.format import layout
from pipeline.format.ids import IdIndex


def _table(tmp_path, values):
    f = h5py.File(tmp_path / "ids.h5", "w")
    table = f.create_dataset("ids", (0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"))
    layout.append_strings(table, values)
    return f, table


@pytest.mark.parametrize(
    "hasher", [hash, lambda s: 7, lambda s: len(s) % 3], ids=["hash", "one", "three"]
)
def test_rows_are_exact_even_when_every_hash_collides(tmp_path, hasher):
    names = [f"img_{i:03d}.png" for i in range(40)]
    f, table = _table(tmp_path, names[:10])
    with f:
        index = IdIndex(table, hasher=hasher)
        assert len(index) == 10
        for start in range(10, 40, 6):
            batch = names[start : start + 6]
            layout.append_strings(table, batch)
            index.add(batch, start)
        assert len(index) == 40
        asked = [*reversed(names), "img_999.png", "", "img_00.png"]
        expected = [*range(39, -1, -1), -1, -1, -1]
        assert index.rows(asked).tolist() == expected
        assert index["img_017.png"] == 17 and index.get("nope") == -1
        assert "img_039.png" in index and "img_040.png" not in index and 3 not in index
        with pytest.raises(KeyError):
            index["nope"]


def test_only_the_first_n_rows_are_indexed(tmp_path):
    f, table = _table(tmp_path, ["a", "b", "c", "d"])
    with f:
        index = IdIndex(table, 2)
        assert index.rows(["a", "b", "c", "d"]).tolist() == [0, 1, -1, -1]


def test_far_apart_matches_are_read_row_by_row(tmp_path, monkeypatch):
    monkeypatch.setattr(ids_module, "SPAN", 0)
    names = [f"s{i}" for i in range(500)]
    f, table = _table(tmp_path, names)
    with f:
        index = IdIndex(table, block=64, hasher=lambda s: 0)
        assert index.rows(["s0", "s499", "s250", "x"]).tolist() == [0, 499, 250, -1]


def test_ids_with_undecodable_bytes_match_their_stored_form(tmp_path):
    name = "bad\udcff.png"  # a file name's stray byte, as Python decodes it
    f, table = _table(tmp_path, [name])
    with f:
        assert IdIndex(table).rows([name, layout.storable(name)]).tolist() == [0, 0]


def test_the_index_holds_a_few_bytes_an_id(tmp_path):
    names = [f"class_{i % 10}/img_{i:07d}.png" for i in range(50_000)]
    f, table = _table(tmp_path, names)
    with f:
        index = IdIndex(table)
        held = sum(hashes.nbytes + rows.nbytes for hashes, rows in index._runs)
        assert held == 16 * len(names) and len(index._runs) == 1
        assert index.rows(names[::997]).tolist() == list(range(0, 50_000, 997))
        assert np.all(index.rows([n + "x" for n in names[:100]]) == -1)


def test_runs_stay_few_as_commits_add_ids(tmp_path):
    """Every commit adds a run; runs of like length merge, so a million ids in commits of
    4,096 are held in at most a few runs, all of them searched."""
    f, table = _table(tmp_path, [])
    with f:
        index = IdIndex(table)
        size = 4096
        names = [f"s{i}" for i in range(200 * size)]
        for start in range(0, len(names), size):
            layout.append_strings(table, names[start : start + size])
            index.add(names[start : start + size], start)
            assert len(index._runs) <= 2 + int(np.log2(1 + start // size))
        assert len(index) == len(names)
        probe = [*names[::4999], "s-1"]
        assert index.rows(probe).tolist() == [*range(0, len(names), 4999), -1]
