"""The notebooks run from top to bottom with CI-size settings (DDETR_NOTEBOOK_TINY=1) and are kept without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_name() -> str:
    """The ``python3`` kernel, registered for this interpreter when it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install

        install(user=True, kernel_name="python3")
    return "python3"


def test_the_three_notebooks_exist_and_are_stripped():
    assert {path.stem for path in NOTEBOOKS} >= {"quickstart", "attention", "finetune_from_converted"}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs must be stripped"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, kernel_name, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("DDETR_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("WANDB_MODE", "offline")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, kernel_name=kernel_name, timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(cwd=str(tmp_path))
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
    written = list(tmp_path.rglob("*.png"))
    assert written, f"{path.name} wrote no pictures"
