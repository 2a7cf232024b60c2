"""The notebooks are stored executed (their pictures show on GitHub), small, and run from top to bottom with
CI-size settings (DDETR_NOTEBOOK_TINY=1) in a temporary folder, never rewriting the tracked files
(``python -m ddetr.tools.run_notebooks`` stores them again)."""

from __future__ import annotations

import nbformat
import pytest

from ddetr.tools.run_notebooks import KEPT_OUTPUT_TYPES, NOTEBOOK_DIR, execute, holds_outputs

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_the_three_notebooks_are_stored_with_small_outputs():
    assert {path.stem for path in NOTEBOOKS} >= {"quickstart", "attention", "finetune_from_converted"}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        assert not holds_outputs(notebook), (
            f"{path.name}: {holds_outputs(notebook)}; run python -m ddetr.tools.run_notebooks {path.stem}"
        )
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        kinds = {key for cell in code for output in cell.outputs for key in output.get("data", {})}
        assert kinds <= set(KEPT_OUTPUT_TYPES), f"{path.name}: outputs other than text and PNG: {kinds}"
        assert path.stat().st_size < 1_500_000, f"{path.name}: {path.stat().st_size} bytes"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    stored = path.read_bytes()
    notebook = execute(path, tmp_path, tiny=True, timeout=300)
    assert not holds_outputs(notebook)
    assert list(tmp_path.rglob("*.png")), f"{path.name} wrote no pictures"
    assert path.read_bytes() == stored  # ran in tmp_path; the tracked notebook is untouched
