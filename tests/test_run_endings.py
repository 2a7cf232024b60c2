"""However a run ends (max_epochs, max_steps, limit_train_batches, a time limit, early stopping, no validation),
its final weights are validated and in checkpoints/last.ckpt, the best checkpoint follows the final validation,
and resuming from last.ckpt continues exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from _runs import error_line, run_entry

from ddetr.app import compose
from ddetr.training.run import train

# the debug preset has 12 training images in batches of 4: 3 steps per epoch; validate every 2 epochs as the
# default run does, so that most endings fall on a step that Lightning alone would not validate
EVERY_2 = ["trainer.check_val_every_n_epoch=2", "callbacks.validation_images.num_images=0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


class RecordLosses(L.Callback):
    """The training loss of every global step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def validated_steps(run: Path) -> dict[int, float]:
    """Logged step -> val/AP of every validation in the CSV log (the step after the global step, as Lightning logs)."""
    with open(run / "csv" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    return {int(row["step"]): float(row["val/AP"]) for row in rows if row.get("val/AP")}


def best_checkpoint(run: Path) -> Path:
    (best,) = (run / "checkpoints").glob("epoch_*.ckpt")
    return best


ENDINGS = {  # overrides, the final step, why it stopped
    "max_epochs=1": (["trainer.max_epochs=1"], 3, "trainer.max_epochs=1"),
    "odd max_epochs": (["trainer.max_epochs=3"], 9, "trainer.max_epochs=3"),
    "max_steps mid-epoch": (["trainer.max_epochs=4", "trainer.max_steps=4"], 4, "trainer.max_steps=4"),
    "limit_train_batches": (["trainer.max_epochs=1", "trainer.limit_train_batches=2"], 2, "trainer.max_epochs=1"),
}


@pytest.mark.parametrize("ending", ENDINGS)
def test_every_ending_leaves_the_final_weights_validated_in_last_ckpt(ending, tmp_path, data_root, debug_overrides):
    overrides, steps, reason = ENDINGS[ending]
    metrics = train(compose(debug_overrides(tmp_path, data_root) + EVERY_2 + overrides))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["steps"] == steps and written["stopped"] == reason
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == steps
    # the final validation ran inside the fit, at the final step, and it is the table's
    validated = validated_steps(tmp_path)
    assert max(validated) == steps - 1  # Lightning logs validation at the step index of the last batch
    assert metrics["val/AP"] == pytest.approx(validated[steps - 1], abs=1e-6)
    # the best checkpoint followed every validation, the final one included
    best = load(best_checkpoint(tmp_path))
    (state,) = [v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint{'monitor': 'val/AP'")]
    assert state["best_model_score"] == pytest.approx(max(validated.values()), abs=1e-6)
    assert best["global_step"] == max(validated, key=validated.get) + 1


def test_a_time_limit_ends_with_the_final_weights_validated(tmp_path, data_root, debug_overrides):
    overrides = (
        debug_overrides(tmp_path, data_root) + EVERY_2 + ["trainer.max_epochs=50", "trainer.max_time=00:00:00:02"]
    )
    metrics = train(compose(overrides))
    written = json.loads((tmp_path / "metrics.json").read_text())
    steps = written["steps"]
    assert 0 < steps < 150 and written["stopped"] == "the time limit (trainer.max_time)"
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == steps
    assert max(validated_steps(tmp_path)) == steps - 1
    assert metrics["val/AP"] == pytest.approx(validated_steps(tmp_path)[steps - 1], abs=1e-6)


def test_without_validation_last_ckpt_still_holds_the_final_step(tmp_path, data_root, debug_overrides):
    overrides = debug_overrides(tmp_path, data_root) + EVERY_2 + ["trainer.max_epochs=1", "trainer.limit_val_batches=0"]
    assert train(compose(overrides)) == {}
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_early_stopping_stops_after_patience_validations_and_keeps_last_and_best(
    tmp_path, data_root, debug_overrides, capsys
):
    # min_delta 1: no AP gain counts as an improvement after the first validation, so with patience 2 the run
    # stops after the third validation (epoch 3 of 20, step 9), whatever the AP does
    overrides = debug_overrides(tmp_path, data_root) + [
        "trainer.max_epochs=20",
        "early_stopping.patience=2",
        "early_stopping.min_delta=1.0",
        "callbacks.validation_images.num_images=0",
    ]
    train(compose(overrides))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["steps"] == 9
    assert written["stopped"].startswith("early stopping: val/AP did not improve by more than 1 for 2 validations")
    assert "Stopped by early stopping: val/AP did not improve" in capsys.readouterr().out
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 9
    validated = validated_steps(tmp_path)
    assert sorted(validated) == [2, 5, 8]
    best = load(best_checkpoint(tmp_path))
    assert best["global_step"] == max(validated, key=validated.get) + 1


def test_early_stopping_needs_validation(tmp_path, data_root, debug_overrides):
    from ddetr.training.run import RunConfigError

    overrides = debug_overrides(tmp_path, data_root) + ["early_stopping.patience=2", "trainer.limit_val_batches=0"]
    with pytest.raises(RunConfigError, match="early_stopping.patience needs validation"):
        train(compose(overrides))


@pytest.mark.slow
@pytest.mark.parametrize("ema", [False, True], ids=["raw", "ema"])
def test_resuming_from_a_forced_final_validation_continues_exactly(ema, tmp_path, data_root, debug_overrides):
    """A run stopped by max_steps mid-epoch (its last.ckpt written at the forced validation of step 4), resumed to
    the end of epoch 3, gives the losses and final weights of a run that went to the end of epoch 3 at once."""
    # the official per-epoch schedule: unlike the default one, sized to the run, it does not depend on max_steps,
    # so the shorter run is the beginning of the longer one
    extra = EVERY_2 + ["trainer.max_epochs=3", "model.optim.schedule=step"]
    extra += ["ema.decay=0.9", "ema.warmup_steps=2"] if ema else []
    full = RecordLosses()
    train(compose(debug_overrides(tmp_path / "full", data_root) + extra), extra_callbacks=[full])
    train(compose(debug_overrides(tmp_path / "first", data_root) + extra + ["trainer.max_steps=4"]))
    first_last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert load(first_last)["global_step"] == 4
    resumed = RecordLosses()
    train(
        compose(debug_overrides(tmp_path / "second", data_root) + extra + [f"ckpt_path={first_last}"]),
        extra_callbacks=[resumed],
    )
    assert sorted(resumed.losses) == list(range(5, 10))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], abs=1e-6), f"step {step}"
    full_state, resumed_state = (
        load(tmp_path / "full" / "checkpoints" / "last.ckpt"),
        load(tmp_path / "second" / "checkpoints" / "last.ckpt"),
    )
    assert full_state["global_step"] == resumed_state["global_step"] == 9
    keys = ["state_dict"] + (["current_model_state"] if ema else [])
    for key in keys:
        for name, value in full_state[key].items():
            torch.testing.assert_close(resumed_state[key][name], value, rtol=0, atol=1e-6, msg=f"{key} {name}")


def test_ddp_with_fewer_validation_images_than_ranks_is_refused_in_one_line(tmp_path, debug_overrides):
    """A rank without validation images would skip Lightning's validation loop and leave the other ranks waiting
    in the gathering of the detections; the run is refused before any rank starts."""
    overrides = debug_overrides(tmp_path, tmp_path / "data") + [
        "data.num_val=1",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
    ]
    assert error_line(run_entry("ddetr.train", overrides, cwd=tmp_path)) == (
        "error: 1 validation image(s) for 2 ranks: every rank needs at least one; use at most 1 devices "
        "(trainer.devices, trainer.num_nodes) or more validation images"
    )
    assert not (tmp_path / "checkpoints").exists()
