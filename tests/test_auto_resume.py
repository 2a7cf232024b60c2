"""``ckpt_path=auto`` outside SLURM: the newest unfinished run of the same task, experiment and overrides
(``ckpt_path`` aside) is resumed in its own directory; nothing to resume starts fresh and says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _runs import entry_env, run_entry

from ddetr.app import run_dir
from ddetr.training.run_directory import find_unfinished_run, run_settings

SETTINGS = ["preset=debug", "experiment=single_scale", "trainer.max_epochs=3"]


def fake_run(parent: Path, name: str, overrides: list[str], checkpoint_time: float | None, stopped: str | None = None):
    """A run directory as a run leaves it: Hydra's overrides, maybe a checkpoint (with that mtime), maybe a
    metrics.json with a ``stopped`` entry (a fit that ended)."""
    folder = parent / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if checkpoint_time is not None:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
        os.utime(folder / "checkpoints" / "last.ckpt", (checkpoint_time, checkpoint_time))
    if stopped is not None:
        (folder / "metrics.json").write_text(json.dumps({"val/AP": 0.1, "stopped": stopped}))
    return folder


def test_auto_picks_the_newest_unfinished_run_of_the_same_overrides(tmp_path):
    runs = tmp_path / "runs"
    older = fake_run(runs, "a_older", SETTINGS, 1000)
    newest = fake_run(runs, "b_newest", [*reversed(SETTINGS), "ckpt_path=auto"], 2000)  # order, ckpt_path: same run
    fake_run(runs, "c_finished", SETTINGS, 3000, stopped="trainer.max_epochs=3")
    fake_run(runs, "d_other_experiment", ["preset=debug", "experiment=two_stage", "trainer.max_epochs=3"], 4000)
    fake_run(runs, "e_other_overrides", [*SETTINGS, "seed=1"], 5000)
    fake_run(runs, "f_no_checkpoint", SETTINGS, None)
    (runs / "g_no_hydra_files").mkdir()
    assert run_settings([*SETTINGS, "+ckpt_path=x"]) == sorted(SETTINGS)
    assert find_unfinished_run(runs, [*SETTINGS, "ckpt_path=auto"]) == newest
    (newest / "metrics.json").write_text(json.dumps({"stopped": "early stopping"}))  # it ends
    assert find_unfinished_run(runs, SETTINGS) == older
    assert find_unfinished_run(runs, [*SETTINGS, "seed=2"]) is None
    assert find_unfinished_run(tmp_path / "no_runs_yet", SETTINGS) is None

    run_dir.cache_clear()
    try:
        assert run_dir(str(runs), "auto", (*SETTINGS, "ckpt_path=auto")) == str(older)
        fresh = Path(run_dir(str(runs), "auto", (*SETTINGS, "seed=2")))  # nothing to resume: a new directory
        assert fresh.parent == runs and fresh.is_dir() and not any(fresh.iterdir())
        assert Path(run_dir(str(runs), None, tuple(SETTINGS))).name != older.name  # without auto: always new
    finally:
        run_dir.cache_clear()


def test_auto_with_nothing_to_resume_says_it_starts_fresh(tmp_path, debug_overrides, caplog):
    from ddetr.app import compose
    from ddetr.training.run import resume_path

    cfg = compose([*debug_overrides(tmp_path / "run", tmp_path / "data"), "ckpt_path=auto"])
    with caplog.at_level("WARNING", logger="ddetr.training.run"):
        assert resume_path(cfg) is None
    assert f"starting fresh in {tmp_path / 'run'}" in caplog.text


@pytest.mark.slow
def test_a_run_killed_mid_training_is_resumed_by_auto_in_its_own_directory(tmp_path, debug_overrides):
    logs = tmp_path / "logs"
    overrides = [o for o in debug_overrides(tmp_path, tmp_path / "data") if not o.startswith("paths.output_dir")]
    overrides += [f"paths.log_dir={logs}", "trainer.max_epochs=3"]
    runs = logs / "train" / "runs"
    first = subprocess.Popen(
        [sys.executable, "-m", "ddetr.train", *overrides],
        cwd=tmp_path,
        env=entry_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 900
    while not list(runs.glob("*/checkpoints/last.ckpt")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # killed in its second epoch, right after the first one's last.ckpt
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "the first run ended before it could be killed"
    (killed,) = list(runs.iterdir())
    stopped = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert stopped["global_step"] < 9 and not (killed / "metrics.json").exists()

    fake_run(runs, "newer_other_overrides", [*overrides, "seed=1"], time.time() + 60)  # newer, not the same run

    second = run_entry("ddetr.train", [*overrides, "ckpt_path=auto"], cwd=tmp_path, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert f"ckpt_path=auto: resuming from {killed / 'checkpoints' / 'last.ckpt'}" in output
    assert len(list(runs.iterdir())) == 2  # the killed run and the other one: no new directory
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["stopped"] == "trainer.max_epochs=3" and metrics["steps"] == 9  # 3 epochs of 3 batches
    assert torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 9
