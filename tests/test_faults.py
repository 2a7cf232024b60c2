"""Long runs survive faults: exact resume, preemption signals, non-finite losses, atomic checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from ddetr.checkpoints import AtomicCheckpointIO
from ddetr.app import compose
from ddetr.training.module import NonFiniteLossError
from ddetr.training.run import train


EXACT = [
    "trainer.max_epochs=2",
    "data.num_train=20",
    "callbacks.model_checkpoint.save_top_k=0",
    "callbacks.validation_images.num_images=0",
]


class RecordLosses(L.Callback):
    """Records the training loss of every global step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


class SignalAtStep(L.Callback):
    """Sends a signal to this process at the end of global step ``step`` (the fault to survive)."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def run(cfg, *extra_callbacks):
    """train(cfg) with extra callbacks placed before the configured ones."""
    return train(cfg, extra_callbacks=extra_callbacks)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(tmp_path, data_root, debug_overrides):
    """Stop at step 3 (of 10, mid-epoch, by SIGUSR1), resume, and every later loss equals the loss of an
    uninterrupted run; shuffling and augmentation (flip, multi-scale, crops) are on, and dropout too."""
    base = debug_overrides(tmp_path / "full", data_root) + EXACT + ["model.dropout=0.1"]
    full = RecordLosses()
    run(compose(base), full)
    assert len(full.losses) == 10

    first = debug_overrides(tmp_path / "first", data_root) + EXACT + ["model.dropout=0.1"]
    interrupted = RecordLosses()
    assert run(compose(first), SignalAtStep(3), interrupted) == {}
    assert max(interrupted.losses) == 3
    ckpt = tmp_path / "first" / "checkpoints" / "preempted.ckpt"
    assert ckpt.is_file()

    second = debug_overrides(tmp_path / "second", data_root) + EXACT + ["model.dropout=0.1", f"ckpt_path={ckpt}"]
    resumed = RecordLosses()
    run(compose(second), resumed)
    assert sorted(resumed.losses) == list(range(4, 11))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], abs=1e-6), f"step {step}"


@pytest.mark.slow
def test_sigterm_from_outside_checkpoints_and_exits_cleanly(tmp_path, data_root, debug_overrides):
    overrides = debug_overrides(tmp_path, data_root) + ["trainer.max_epochs=1000"]
    overrides = [o for o in overrides if not o.startswith("paths.output_dir")] + [f"hydra.run.dir={tmp_path}/run"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ddetr.train", *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics_csv = tmp_path / "run" / "csv" / "metrics.csv"
    deadline = time.time() + 240
    while not metrics_csv.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)  # the CSV log appears once training has logged its first steps
    assert process.poll() is None, process.stdout.read()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "preempted.ckpt"
    assert ckpt.is_file() and f"ckpt_path={ckpt}" in output
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] > 0


class PoisonAtStep(L.Callback):
    """Injects a fault at global step ``step``: a NaN weight (every later step too) or NaN pixels (that step)."""

    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if self.where == "weights":
            with torch.no_grad():
                for parameter in pl_module.model.transformer.parameters():
                    parameter.fill_(float("nan"))
        else:
            batch[0].fill_(float("nan"))


def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoints_finite(tmp_path, data_root, debug_overrides):
    cfg = compose(debug_overrides(tmp_path, data_root) + ["trainer.max_epochs=3"])
    with pytest.raises(NonFiniteLossError, match=r"global step 4 .*pred_logits"):
        run(cfg, PoisonAtStep(4, "weights"))  # 3 steps per epoch: fails in the 2nd epoch
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow  # over 10 s of CPU on 2 cores (the conftest check, 2026-12-08)
def test_nonfinite_loss_can_skip_the_step(tmp_path, data_root, debug_overrides):
    cfg = compose(debug_overrides(tmp_path, data_root) + ["trainer.max_epochs=2", "model.on_nonfinite_loss=skip"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    run(cfg, PoisonAtStep(2, "pixels"))
    # the preemption handlers are the run's only: afterwards the process has its own back
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6  # Lightning counts the skipped step, which updated nothing
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    import csv

    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    skipped = [float(r["train/skipped_nonfinite"]) for r in rows if r.get("train/skipped_nonfinite")]
    assert skipped == [1.0]  # logged once, in the epoch of the poisoned batch


KILL_DURING_SAVE = """
import os, sys, torch
from ddetr.checkpoints import AtomicCheckpointIO

class KillWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), 9)  # SIGKILL in the middle of writing the checkpoint

AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(1000, 1000), "x": KillWhilePickled()}, sys.argv[1])
"""


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.zeros(3)}, path)
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint survives whole
    AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 2
