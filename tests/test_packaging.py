"""ddetr as a normal package: the wheel ships conf/ and csrc/, and a non-editable install trains,
evaluates, predicts and exports from any directory with the compiled op, through its console scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = ("ddetr-train", "ddetr-eval", "ddetr-predict", "ddetr-export", "ddetr-convert")


def test_the_package_list_names_every_package_and_the_two_data_directories():
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    assert sorted(setuptools_cfg["packages"]) == sorted([*find_packages(ROOT / "src"), "ddetr.conf", "ddetr.csrc"])
    assert setuptools_cfg["package-dir"] == {"": "src", "ddetr.conf": "conf", "ddetr.csrc": "csrc"}
    assert set(PYPROJECT["project"]["scripts"]) == set(SCRIPTS)


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The wheel built from a copy of the repository, installed with ``pip install --target``; the
    environment sees that directory and the interpreter's site-packages (the dependencies) only."""
    base = tmp_path_factory.mktemp("package")
    source = base / "source"  # a copy: the build leaves the checkout untouched
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("src", "conf", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DDETR_CSRC_DIR", "DDETR_ROOT")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "--wheel-dir", str(base / "dist"), str(source)],
        base,
        env,
    )
    (wheel,) = (base / "dist").glob("ddetr-*.whl")
    target = base / "site"
    run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)], base, env)
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    return target, env


@pytest.mark.slow
def test_a_wheel_install_trains_evaluates_predicts_and_exports_from_elsewhere(installed, tmp_path):
    target, env = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(
        [
            sys.executable,
            "-c",
            "import ddetr, ddetr.app as a, ddetr.ops._build as b; "
            "print(ddetr.__file__); print(a.CONFIG_DIR); print(b.csrc_dir())",
        ],
        work,
        env,
    ).split()
    assert all(Path(path).is_relative_to(target / "ddetr") for path in where), where

    bin_dir = target / "bin"
    train = run(
        [str(bin_dir / "ddetr-train"), "preset=debug", "trainer.limit_train_batches=2", "hydra.run.dir=run"], work, env
    )
    assert "Deformable attention: the compiled cpu op." in train, train[-2000:]
    assert json.loads((work / "run" / "metrics.json").read_text())["steps"] == 2
    checkpoint = work / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    evaluation = run(
        [
            str(bin_dir / "ddetr-eval"),
            f"ckpt_path={checkpoint}",
            "data.num_train=12",
            "data.num_val=6",
            "data.image_size=64",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
            "hydra.run.dir=eval",
        ],
        work,
        env,
    )
    assert "COCO metrics of" in evaluation and (work / "eval" / "metrics.json").is_file()

    image = sorted((work / "data" / "synthetic" / "val").glob("*.jpg"))[0]
    prediction = run(
        [
            str(bin_dir / "ddetr-predict"),
            f"ckpt_path={checkpoint}",
            f"input={image}",
            "output=out",
            "hydra.run.dir=predict",
        ],
        work,
        env,
    )
    assert "1 image(s)" in prediction and (work / "out" / "detections.json").is_file()

    run(
        [
            str(bin_dir / "ddetr-export"),
            f"ckpt_path={checkpoint}",
            "format=torch_export",
            "output=model.pt2",
            "height=64",
            "width=64",
            "hydra.run.dir=export",
        ],
        work,
        env,
    )
    assert (work / "model.pt2").is_file()

    assert "official" in run([str(bin_dir / "ddetr-convert"), "--help"], work, env)
