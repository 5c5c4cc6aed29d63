"""``h5bank verify PATH.partial``: the file a stopped build leaves is checked for what a resume
keeps (the sources its id table commits), not as a finished bank."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def verify(path, *options):
    return CliRunner().invoke(main, ["verify", str(path), *options])


def append_uncommitted(column: layout.Column, rows: int) -> None:
    """Write ``rows`` more sources into ``column`` (copies of its first) without committing
    them: data, refs and shape rows past the id table, as a commit killed midway leaves."""
    for _ in range(rows):
        start, stop = (int(v) for v in column.refs[0])
        end = column.data.shape[0]
        column.data.resize(end + stop - start, axis=0)
        column.data[end:] = column.data[start:stop]
        n = column.refs.shape[0]
        column.refs.resize(n + 1, axis=0)
        column.refs[n] = [end, end + stop - start]
        if column.shape is not None:
            column.shape.resize(n + 1, axis=0)
            column.shape[n] = column.shape[0]


@pytest.fixture
def finished(images, tmp_path):
    path = tmp_path / "bank.h5"
    Checked.create(path, images, scheduler="threads", progress=False).close()
    return path


@pytest.fixture
def stopped(finished, tmp_path):
    """``finished``, made into the partial file of a build killed during a commit: marked
    building, two uncommitted sources in every column, one failure table a row longer than
    the others, renamed ``stopped.h5.partial``."""
    partial = Path(partial_path(tmp_path / "stopped.h5"))
    shutil.copy(finished, partial)
    with h5py.File(partial, "r+") as f:
        layout.set_state(f, layout.BUILDING)
        for path in layout.iter_columns(f):
            append_uncommitted(layout.Column.open(f, path), rows=2)
        errors = f[f"{layout.FAILURES}/error"]
        errors.resize((errors.shape[0] + 1,))
    return partial


@pytest.mark.parametrize("options", [(), ("--data",)])
def test_a_stopped_builds_partial_file_checks_as_resumable(stopped, options):
    result = verify(stopped, *options)
    assert result.exit_code == 0, result.output
    checked = "structure and every chunk" if options else "structure"
    assert result.output == (
        f"ok: {stopped}: 12 sources committed by a stopped build (resumable), 2 columns "
        f"({checked} checked)\n"
    )
    with h5py.File(stopped) as f:
        assert f["images/refs"].shape[0] == 14  # rows past the commit are there...
        assert list(bank_problems(f, data=True, stopped=True)) == []  # ...and allowed


def test_a_resume_cuts_the_uncommitted_rows_verify_allowed(stopped, finished, images, tmp_path):
    bank = Checked.create(tmp_path / "stopped.h5", images, mode="a", progress=False)
    with bank:
        assert len(bank) == 12 and bank.summary.ok == 0  # all 12 were committed already
    assert verify(tmp_path / "stopped.h5").exit_code == 0
    with h5py.File(tmp_path / "stopped.h5") as f, h5py.File(finished) as g:
        for name in ("images/data", "images/refs", "images/shape", "labels/data", "labels/refs"):
            np.testing.assert_array_equal(f[name][:], g[name][:], err_msg=name)


def test_the_same_file_checked_as_a_bank_fails(stopped, tmp_path):
    as_bank = tmp_path / "renamed.h5"  # not PATH.partial: checked as a finished bank
    shutil.copy(stopped, as_bank)
    result = verify(as_bank)
    assert result.exit_code == 1
    assert result.output == (
        f"h5bank: verify: {as_bank}: its build has not finished (state {layout.BUILDING!r})\n"
    )
    with h5py.File(stopped) as f:
        problems = list(bank_problems(f))
    assert problems[0] == f"its build has not finished (state {layout.BUILDING!r})"
    assert problems[1].startswith(f"{layout.FAILURES}: its tables disagree in length")
    assert problems[2:] == [
        "images/refs has 14 rows for 12 committed sources",
        "labels/refs has 14 rows for 12 committed sources",
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda f: f["images/refs"].__setitem__(2, [0, 10**9]),
            "images/refs row 2 is [0, 1000000000], outside data's",
        ),
        (
            lambda f: f["images/refs"].__setitem__(1, f["images/refs"][0]),
            "images/refs rows 0 and 1 overlap",
        ),
        (lambda f: f["labels/refs"].resize((11, 2)), "labels/refs has 11 rows for 12 committed"),
        (
            lambda f: f[layout.IDS].__setitem__(5, "cats/cats_000.png"),
            "'cats/cats_000.png' is committed twice",
        ),
    ],
    ids=["outside", "overlap", "short-refs", "duplicate-id"],
)
def test_what_a_stopped_build_committed_must_still_be_sound(stopped, edit, message):
    with h5py.File(stopped, "r+") as f:
        edit(f)
    result = verify(stopped)
    assert result.exit_code == 1
    assert result.output.startswith(f"h5bank: verify: {stopped}: ")
    assert message in result.output


def test_a_finished_bank_is_not_a_stopped_build(finished, tmp_path):
    with h5py.File(finished) as f:
        assert list(bank_problems(f, stopped=True)) == [
            f"it is not a stopped build (state {layout.COMPLETE!r})"
        ]
    # A finished bank named PATH.partial is checked as the bank it is.
    named_partial = Path(partial_path(tmp_path / "done.h5"))
    shutil.copy(finished, named_partial)
    result = verify(named_partial)
    assert result.exit_code == 0
    assert result.output.startswith(f"ok: {named_partial}: 12 sources, 2 columns")
