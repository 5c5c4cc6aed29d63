"""Execute the notebooks, each in a fresh kernel in a scratch folder, and keep their outputs.

    python notebooks/run_notebooks.py [NAME ...]

Writes each executed notebook back to ``notebooks/`` (so it reads with its
figures on a code host); the data it generates stays in the scratch folder.
``tests/test_notebooks.py`` runs them the same way.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

NOTEBOOKS = ["image_bank", "sound_bank", "lazy_compute", "training_logs"]
HERE = Path(__file__).resolve().parent


def execute(path: Path, cwd: Path, timeout: int = 600):
    """Run the notebook at ``path`` with ``cwd`` as its working folder; return it, outputs filled."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    for cell in notebook.cells:  # no machine-specific timings in committed metadata
        cell.get("metadata", {}).pop("execution", None)
    return notebook


def main(names: list[str]) -> None:
    import nbformat

    for name in names or NOTEBOOKS:
        with tempfile.TemporaryDirectory(prefix=f"h5bank-{name}-") as scratch:
            copy = Path(scratch) / f"{name}.ipynb"
            shutil.copy(HERE / f"{name}.ipynb", copy)
            notebook = execute(copy, Path(scratch))
            nbformat.write(notebook, HERE / f"{name}.ipynb")
            print(f"{name}: ran, outputs written", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
