"""Sweeps through Hydra plugins: the submitit launcher (``hydra/launcher=submitit_local``, the code path
of ``submitit_slurm``) and the optuna sweeper maximising val/AP (``hydra/sweeper=optuna``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _runs import run_ok

from ddetr.data import ensure_synthetic_dataset


def sweep(tmp_path: Path, debug_overrides, *points: str) -> Path:
    """``python -m ddetr.train -m *points`` into ``tmp_path/sweep`` (returned): ``preset=debug`` on a synthetic
    dataset made beforehand (parallel jobs must not both write it), without the per-validation pictures."""
    data_root = ensure_synthetic_dataset(
        tmp_path / "synthetic", num_train=12, num_val=6, image_size=64, progress=False, num_workers=0
    )
    overrides = [o for o in debug_overrides(tmp_path, data_root) if not o.startswith("paths.output_dir")]
    overrides += ["callbacks.evaluation_pictures=null", "callbacks.validation_images=null"]
    directory = tmp_path / "sweep"
    run_ok("ddetr.train", ["-m", *points, f"hydra.sweep.dir={directory}", *overrides], cwd=tmp_path, timeout=900)
    return directory


def swept_lr(job: Path) -> float:
    """The learning rate of one job of a sweep, from its ``.hydra/overrides.yaml``."""
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return float(next(o for o in overrides if o.startswith("model.optim.lr=")).split("=", 1)[1])


@pytest.mark.slow
def test_the_submitit_local_launcher_runs_each_point_in_its_own_directory(tmp_path, debug_overrides):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    points = ["hydra/launcher=submitit_local", "model.optim.lr=1e-4,3e-4", "trainer.limit_train_batches=1"]
    sweep_dir = sweep(tmp_path, debug_overrides, *points)
    assert (sweep_dir / ".submitit").is_dir()  # the jobs went through submitit
    learning_rates = {}
    for job in ("0", "1"):
        metrics = json.loads((sweep_dir / job / "metrics.json").read_text())
        assert 0.0 <= metrics["val/AP"] <= 1.0 and metrics["steps"] == 1
        learning_rates[job] = swept_lr(sweep_dir / job)
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
        # drawn at the end although the per-validation pictures are off
        assert (sweep_dir / job / "pr_curves.png").is_file() and not (sweep_dir / job / "eval_pictures").exists()
    assert sorted(learning_rates.values()) == [1e-4, 3e-4]


@pytest.mark.slow
def test_the_optuna_sweeper_maximises_val_ap(tmp_path, debug_overrides):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # no direction given: conf/train.yaml's optimized_direction (maximize) applies
    points = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0"]
    sweep_dir = sweep(tmp_path, debug_overrides, *points, "model.optim.lr=interval(1e-5,1e-2)")
    trials = {}
    for job in sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file()):
        trials[swept_lr(job)] = json.loads((job / "metrics.json").read_text())["val/AP"]
    assert len(trials) == 3
    assert len(set(trials.values())) > 1, f"the trials' val/AP should differ to tell max from min: {trials}"
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(trials.values()), abs=1e-12)
    assert results["best_params"]["model.optim.lr"] == pytest.approx(max(trials, key=trials.get))
