"""With a fused AdamW the training step never waits for its loss to reach the host: a non-finite loss
makes the optimizer skip the update on the device (``found_inf``) and is raised or logged one step
later, naming the step it happened in; the outcome is that of the synchronous check (test_faults)."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from test_faults import PoisonAtStep, data_root  # noqa: F401 (the synthetic images, made once)

from ddetr.app import compose
from ddetr.training.module import NonFiniteLossError
from ddetr.training.run import train

FUSED = ["model.optim.fused=true", "callbacks.validation_images.num_images=0"]


class StepRecorder(L.Callback):
    """Records the global steps whose training step returned, and the parameters after each."""

    def __init__(self) -> None:
        self.finished: list[int] = []
        self.parameters: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.finished.append(trainer.global_step - 1)  # global_step counts the optimizer step just made
        self.parameters[trainer.global_step - 1] = {
            name: p.detach().clone() for name, p in pl_module.model.named_parameters()
        }


def test_nonfinite_loss_is_raised_a_step_later_without_an_update(tmp_path, data_root, debug_overrides):
    cfg = compose(debug_overrides(tmp_path, data_root) + FUSED + ["trainer.max_epochs=3"])
    recorder = StepRecorder()
    with pytest.raises(NonFiniteLossError, match=r"global step 4 \(epoch 1, batch 1\).*pred_logits"):
        train(cfg, [PoisonAtStep(4, "pixels"), recorder])  # 3 steps per epoch
    assert recorder.finished[-1] == 4  # step 4 did not wait for its loss: step 5 raised
    # the fused optimizer skipped step 4's update: its NaN gradients reached no weight
    assert all(torch.equal(recorder.parameters[4][name], value) for name, value in recorder.parameters[3].items())
    assert all(torch.isfinite(value).all() for value in recorder.parameters[4].values())
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_nonfinite_loss_skip_is_settled_a_step_later(tmp_path, data_root, debug_overrides):
    """As test_faults' skip test, with the fused optimizer: nothing of the poisoned step remains (weights,
    optimizer state, batch norm statistics), and the skip is logged once, in its epoch."""
    overrides = FUSED + ["trainer.max_epochs=2", "model.on_nonfinite_loss=skip"]
    cfg = compose(debug_overrides(tmp_path, data_root) + overrides)
    recorder = StepRecorder()
    train(cfg, [PoisonAtStep(2, "pixels"), recorder])  # step 2 is the last of epoch 0: settled at its end
    assert recorder.finished == list(range(6))
    assert all(torch.equal(recorder.parameters[2][name], value) for name, value in recorder.parameters[1].items())
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    steps = [float(param["step"]) for param in state["optimizer_states"][0]["state"].values()]
    assert steps and all(step == 5 for step in steps)  # six steps, one skipped
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    skipped = [(r["epoch"], float(r["train/skipped_nonfinite"])) for r in rows if r.get("train/skipped_nonfinite")]
    assert skipped == [("0", 1.0)]
    # the finite steps' losses were logged (a step late): every epoch has its mean
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_losses) == 2 and all(torch.isfinite(torch.tensor(epoch_losses)))
