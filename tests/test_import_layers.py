"""The import layers: the entry points' shell (``ddetr.app`` and the ``python -m`` modules) sits on top of the
training, inference and data code, and no arrow runs back up from that code into ``ddetr.app``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ddetr"
SHELL_PACKAGES = ("benchmarks", "tools")  # run from the command line, like the entry points
APP = ["ddetr", "app"]  # an import of ddetr.app or of a name in it


def imported_modules(path: Path) -> set[str]:
    """Every ``ddetr`` module ``path`` imports, at any depth of its code (absolute and relative imports)."""
    package = ".".join(("ddetr", *path.relative_to(PACKAGE).parent.parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("ddetr")}


def below_the_shell() -> list[Path]:
    """The modules of the subpackages (training, inference, models, data, ...) and ``checkpoints.py``."""
    inner = [
        path
        for path in PACKAGE.rglob("*.py")
        if path.parent != PACKAGE and path.relative_to(PACKAGE).parts[0] not in SHELL_PACKAGES
    ]
    return [*inner, PACKAGE / "checkpoints.py"]


def test_no_module_below_the_entry_points_imports_the_app():
    modules = below_the_shell()
    assert len(modules) > 50 and PACKAGE / "training" / "run.py" in modules
    upward = {
        str(path.relative_to(PACKAGE)): sorted(name for name in imported_modules(path) if name.split(".")[:2] == APP)
        for path in modules
    }
    assert {path: names for path, names in upward.items() if names} == {}


def test_the_trust_policy_lives_beside_the_checkpoint_reader():
    from ddetr import app, checkpoints
    from ddetr.training import run

    assert run.trust_checkpoint is checkpoints.trust_checkpoint
    assert not hasattr(app, "trust_checkpoint")
    assert checkpoints.trust_checkpoint({"trust_checkpoint": True}) is True
    assert checkpoints.trust_checkpoint({}) is False
