"""Each notebook is kept twice: ``NN_name.py`` (jupytext py:percent, the
source reviewed in git) and ``NN_name.ipynb`` (generated from it, committed
without outputs). These tests fail when the two have drifted apart or when
an ``.ipynb`` was committed with outputs.

To bring a pair back in sync after editing the ``.py``::

    .venv/bin/jupytext --to ipynb notebooks/NN_name.py

(or ``jupytext --sync``, which also works after editing the ``.ipynb`` in
Jupyter; then clear the outputs before committing).
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

HERE = Path(__file__).resolve().parent
SOURCES = sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_every_notebook_has_its_source_and_the_reverse() -> None:
    assert SOURCES, "no notebooks/NN_*.py found"
    assert [p.stem for p in SOURCES] == [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_the_ipynb_matches_its_py(source: Path) -> None:
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), f"{paired.name} is missing: run jupytext --to ipynb notebooks/{source.name}"
    expected = jupytext.read(source)
    committed = nbformat.read(paired, as_version=4)
    assert cells(committed) == cells(expected), (
        f"{paired.name} is out of sync with {source.name}: run jupytext --to ipynb notebooks/{source.name}"
    )
    assert committed.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    assert committed.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_the_ipynb_is_committed_without_outputs(notebook: Path) -> None:
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{notebook.name} holds outputs: regenerate it from its .py (jupytext --to ipynb)"
            )
