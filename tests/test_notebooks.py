"""Every course notebook runs top to bottom (with INVVIZ_FAST=1: few steps, small images) and is stored clean."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
#: seconds any one cell may take in the fast run
CELL_TIMEOUT = 180


def test_the_course_is_there() -> None:
    names = [path.name for path in NOTEBOOKS]
    assert names[0] == "00_explorer.ipynb" and names[-1] == "09_exercises.ipynb"
    assert [name[:2] for name in names] == [f"{n:02d}" for n in range(10)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_clean(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert notebook.metadata["kernelspec"]["display_name"]
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} is stored with outputs"
    title = notebook.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# "), f"{path.name} has no title"
    assert "?" in title.source or path.stem == "00_explorer", f"{path.name}'s title names no question"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "INVVIZ_FAST" in first_code.source, f"{path.name}'s first code cell must read INVVIZ_FAST"
    environment = {
        **os.environ,
        "INVVIZ_FAST": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # files a notebook saves land here
    )
    # nbclient raises CellExecutionError, naming the cell and the traceback, on any error.
    client.execute(env=environment)
