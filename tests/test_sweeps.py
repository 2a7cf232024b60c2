"""Sweeps through Hydra plugins: the submitit launcher (``hydra/launcher=submitit_local``, the code path
of ``submitit_slurm``) and the optuna sweeper maximising val/AP (``hydra/sweeper=optuna``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddetr.data import ensure_synthetic_dataset


def run_train(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-m", "ddetr.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def sweep_overrides(tmp_path: Path, debug_overrides) -> list[str]:
    """``preset=debug`` on a synthetic dataset made beforehand (parallel jobs must not both write it),
    one training step per run."""
    data_root = ensure_synthetic_dataset(
        tmp_path / "synthetic", num_train=12, num_val=6, image_size=64, progress=False, num_workers=0
    )
    overrides = [o for o in debug_overrides(tmp_path, data_root) if not o.startswith("paths.output_dir")]
    return [*overrides, "callbacks.evaluation_pictures=null", "callbacks.validation_images=null"]


@pytest.mark.slow
def test_the_submitit_local_launcher_runs_each_point_in_its_own_directory(tmp_path, debug_overrides):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    run_train(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "model.optim.lr=1e-4,3e-4",
            "trainer.limit_train_batches=1",
            f"hydra.sweep.dir={sweep}",
            *sweep_overrides(tmp_path, debug_overrides),
        ],
        cwd=tmp_path,
    )
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit
    learning_rates = {}
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert 0.0 <= metrics["val/AP"] <= 1.0 and metrics["steps"] == 1
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        learning_rates[job] = float(next(o for o in overrides if o.startswith("model.optim.lr=")).split("=", 1)[1])
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        # drawn at the end although the per-validation pictures are off
        assert (sweep / job / "pr_curves.png").is_file() and not (sweep / job / "eval_pictures").exists()
    assert sorted(learning_rates.values()) == [1e-4, 3e-4]


@pytest.mark.slow
def test_the_optuna_sweeper_maximises_val_ap(tmp_path, debug_overrides):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    # no direction given: conf/train.yaml's optimized_direction (maximize) applies
    run_train(
        [
            "-m",
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.seed=0",
            "model.optim.lr=interval(1e-5,1e-2)",
            f"hydra.sweep.dir={sweep}",
            *sweep_overrides(tmp_path, debug_overrides),
        ],
        cwd=tmp_path,
    )
    trials = {}
    for job in sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file()):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        lr = float(next(o for o in overrides if o.startswith("model.optim.lr=")).split("=", 1)[1])
        trials[lr] = json.loads((job / "metrics.json").read_text())["val/AP"]
    assert len(trials) == 3
    assert len(set(trials.values())) > 1, f"the trials' val/AP should differ to tell max from min: {trials}"
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(trials.values()), abs=1e-12)
    assert results["best_params"]["model.optim.lr"] == pytest.approx(max(trials, key=trials.get))
