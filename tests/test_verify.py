"""``h5bank verify``: a sound bank passes; each kind of damage is named, with exit code 1."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from features import DirLabels, Image
from pipeline import TypedFile
from pipeline.cli import main
from pipeline.format import layout
from pipeline.format.partial import partial_path
from pipeline.format.verify import bank_problems


class Checked(TypedFile):
    images = Image(mode="RGB", fletcher32=True)
    labels = DirLabels()


@pytest.fixture
def bank(images, tmp_path):
    path = tmp_path / "bank.h5"
    Checked.create(path, images, scheduler="threads", progress=False).close()
    return path


def verify(path, *options):
    return CliRunner().invoke(main, ["verify", str(path), *options])


def damaged(bank, tmp_path, edit):
    """A copy of ``bank`` with ``edit(h5py.File)`` applied."""
    copy = tmp_path / "damaged.h5"
    shutil.copy(bank, copy)
    with h5py.File(copy, "r+") as f:
        edit(f)
    return copy


@pytest.mark.parametrize("options", [(), ("--data",)])
def test_a_sound_bank_passes(bank, options):
    result = verify(bank, *options)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: {bank}: 12 sources, 2 columns")
    with h5py.File(bank) as f:
        assert list(bank_problems(f, data=True)) == []


def _set_row(name, row, value):
    return lambda f: f[name].__setitem__(row, value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f["images/refs"].__setitem__(1, f["images/refs"][0]), "rows 0 and 1 overlap"),
        (_set_row("images/refs", 2, [0, 10**9]), "row 2 is [0, 1000000000], outside data's"),
        (lambda f: f["images/refs"].resize((5, 2)), "images/refs has 5 rows for 12 committed"),
        (lambda f: f["images/shape"].resize((11, 3)), "images/shape has 11 rows for 12"),
        (_set_row("images/shape", 3, [1, 1, 3]), "images/shape row 3 is (1, 1, 3), but its refs"),
        (_set_row("labels/refs", 0, [-1, 1]), "labels/refs row 0 is half empty"),
        (_set_row("labels/refs", 11, [11, 11]), "labels/refs row 11 spans 0 rows; category"),
        (lambda f: f.attrs.__setitem__(layout.ATTR_VERSION, 99), "format version 99"),
        (lambda f: layout.set_state(f, layout.BUILDING), "has not finished"),
        (_set_row(layout.IDS, 5, "cats/cats_000.png"), "'cats/cats_000.png' is committed twice"),
        (lambda f: f[f"{layout.FAILURES}/error"].resize((3,)), "tables disagree in length"),
    ],
    ids=[
        "overlap", "outside", "short-refs", "short-shape", "shape", "half-empty", "item-span",
        "version", "unfinished", "duplicate-id", "failure-tables",
    ],
)  # fmt: skip
def test_each_kind_of_damage_is_named_with_exit_code_1(bank, tmp_path, edit, message):
    result = verify(damaged(bank, tmp_path, edit))
    assert result.exit_code == 1
    assert result.output.startswith("h5bank: verify: ")
    assert message in result.output
    assert result.output.count("\n") == 1  # the first problem only


def test_label_codes_outside_their_names_are_found_with_data(bank, tmp_path):
    copy = damaged(bank, tmp_path, _set_row("labels/data", 0, 7))
    assert verify(copy).exit_code == 0  # the structure is sound
    result = verify(copy, "--data")
    assert result.exit_code == 1
    assert "label codes outside its 2 names" in result.output


def test_a_flipped_byte_in_a_checksummed_chunk_is_found_by_reading_every_chunk(bank, tmp_path):
    copy = tmp_path / "flipped.h5"
    shutil.copy(bank, copy)
    with h5py.File(copy) as f:
        chunk = f["images/data"].id.get_chunk_info(0)
        assert f["images/data"].fletcher32
    with open(copy, "r+b") as raw:
        raw.seek(chunk.byte_offset + 100)
        byte = raw.read(1)
        raw.seek(chunk.byte_offset + 100)
        raw.write(bytes([byte[0] ^ 0xFF]))
    assert verify(copy).exit_code == 0  # metadata alone cannot see it
    result = verify(copy, "--data")
    assert result.exit_code == 1
    assert "/images/data: reading" in result.output


class FailsOnDogs(Image):
    def load(self, source):
        if "dogs" in source.id:
            raise RuntimeError("boom")
        return super().load(source)


class Stops(TypedFile):
    images = FailsOnDogs(mode="RGB")
    labels = DirLabels()


def test_a_stopped_builds_partial_file_checks_as_resumable_not_as_a_bank(images, tmp_path):
    path = tmp_path / "bank.h5"
    with pytest.raises(Exception, match="boom"):
        Stops.create(
            path, images, scheduler="threads", progress=False, on_error="raise", partition_size=2
        )
    partial = partial_path(path)
    result = verify(partial)
    assert result.exit_code == 0, result.output
    with h5py.File(partial) as f:  # what was committed before the stop is sound
        n = len(f[layout.IDS])
        assert n > 0
        assert list(bank_problems(f, stopped=True)) == []
        problems = list(bank_problems(f))
    assert f"ok: {partial}: {n} sources committed by a stopped build (resumable)" in result.output
    assert problems == [f"its build has not finished (state {layout.BUILDING!r})"]


def test_a_missing_bank_is_a_usage_error(tmp_path):
    assert verify(tmp_path / "nope.h5").exit_code == 2


def test_verify_reads_no_data_without_the_flag(bank, tmp_path):
    """Structure checks read tables, never ``data`` (damaged data goes unseen without --data)."""
    copy = damaged(bank, tmp_path, lambda f: f["images/data"].__setitem__(slice(0, 10), 0))
    with h5py.File(copy) as f:
        assert list(bank_problems(f)) == []
        np.testing.assert_array_equal(f["images/data"][:10], 0)
