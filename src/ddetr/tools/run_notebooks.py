"""Executes the notebooks of ``notebooks/`` and stores them with their outputs, so that GitHub shows the
detections, attention maps and curves:

    python -m ddetr.tools.run_notebooks                 # all three, full settings, outputs stored
    python -m ddetr.tools.run_notebooks --tiny --check  # CI-size run in a temporary folder, nothing stored

Each notebook runs in a temporary folder (what it writes stays there). Of the outputs only standard output,
text and PNG pictures are kept (stderr's warnings and progress bars, HTML and other rich copies of the same
output, widget state and execution timings are dropped), so a stored notebook stays small and reviewable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[3] / "notebooks"
KEPT_OUTPUT_TYPES = ("text/plain", "image/png")


def kernel_name() -> str:
    """The ``python3`` kernel, registered for this interpreter when it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install

        install(user=True, kernel_name="python3")
    return "python3"


def execute(path: Path, cwd: Path, tiny: bool, timeout: int = 3600):
    """The notebook at ``path`` executed from top to bottom in ``cwd`` (``DDETR_NOTEBOOK_TINY=1`` when
    ``tiny``), its outputs slimmed (``slim``); raises nbclient's ``CellExecutionError`` naming the failing cell."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    saved = {name: os.environ.get(name) for name in ("DDETR_NOTEBOOK_TINY", "MPLBACKEND", "WANDB_MODE")}
    os.environ.update({"MPLBACKEND": "Agg", "WANDB_MODE": "offline"})
    if tiny:
        os.environ["DDETR_NOTEBOOK_TINY"] = "1"
    else:
        os.environ.pop("DDETR_NOTEBOOK_TINY", None)
    try:  # the kernel inherits this environment
        NotebookClient(notebook, kernel_name=kernel_name(), timeout=timeout).execute(cwd=str(cwd))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return slim(notebook)


def slim(notebook):
    """``notebook`` with only text and PNG outputs, no execution timings and no widget state."""
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        # stderr (library warnings, progress bars) is noise on a stored page; errors stay (holds_outputs refuses them)
        cell.outputs = [output for output in cell.outputs if output.get("name") != "stderr"]
        for output in cell.outputs:
            if "data" in output:
                output["data"] = {key: value for key, value in output["data"].items() if key in KEPT_OUTPUT_TYPES}
    return notebook


def holds_outputs(notebook) -> list[str]:
    """What a stored notebook lacks: an empty list when every code cell ran (an execution count), none failed,
    and at least one PNG picture is shown."""
    problems = []
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    if any(cell.execution_count is None for cell in code):
        problems.append("code cells without an execution count (not executed)")
    if any(output.get("output_type") == "error" for cell in code for output in cell.outputs):
        problems.append("an error output")
    if not any("image/png" in output.get("data", {}) for cell in code for output in cell.outputs):
        problems.append("no PNG picture")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr.tools.run_notebooks", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all of notebooks/)")
    parser.add_argument("--tiny", action="store_true", help="CI-size settings (DDETR_NOTEBOOK_TINY=1)")
    parser.add_argument("--check", action="store_true", help="run only; store nothing")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds a cell may take (default 3600)")
    args = parser.parse_args(argv)
    import nbformat

    paths = [NOTEBOOK_DIR / f"{name}.ipynb" for name in args.names] or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: running ({'tiny' if args.tiny else 'full'} settings)", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"{path.stem}_") as folder:
            notebook = execute(path, Path(folder), tiny=args.tiny, timeout=args.timeout)
        problems = holds_outputs(notebook)
        if problems:
            print(f"{path.name}: {'; '.join(problems)}", file=sys.stderr)
            return 1
        if not args.check:
            nbformat.write(notebook, path)
            print(f"{path.name}: stored with its outputs ({path.stat().st_size // 1024} KiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
