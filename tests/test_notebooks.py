"""The notebooks in ``notebooks/`` run from top to bottom without an error.

Each runs in a fresh kernel, in a temporary folder where it generates its own
small data; its cells assert what they show (ids, refs and slices agree, windows
equal NumPy slices, a reloaded checkpoint classifies). ``python
notebooks/run_notebooks.py`` refreshes the outputs committed with them the same way.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))

from run_notebooks import NOTEBOOKS, execute


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    source = Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb"
    shutil.copy(source, tmp_path)
    notebook = execute(tmp_path / source.name, cwd=tmp_path)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )
    assert images >= 1, f"{name} drew no figure"


def test_every_notebook_is_tested():
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    assert sorted(p.stem for p in folder.glob("*.ipynb")) == sorted(NOTEBOOKS)
