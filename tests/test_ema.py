"""The moving average of the weights (ema.decay): the hand-computed average, what validation, checkpoints and
ddetr.eval see, and the same average on every rank."""

from __future__ import annotations

import json
import math
import multiprocessing
import socket
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from _runs import quiet_trainer
from torch import nn

from ddetr.app import compose
from ddetr.training.callbacks import WeightEMA
from ddetr.training.run import evaluate, train


class Toy(L.LightningModule):
    """A linear layer, batch norm (float and integer buffers) and another linear layer, trained by SGD."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

    def training_step(self, batch, batch_idx):
        return (self.net(batch) - 1.0).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordWeights(L.Callback):
    """The module's parameters and buffers after every optimiser step (what the average is updated with)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def fit_toy(module: L.LightningModule, steps: int, callbacks: list) -> L.Trainer:
    """One epoch of ``steps`` fixed random batches (8 x 3) on the CPU with ``callbacks``; the trainer it ran."""
    data = torch.utils.data.DataLoader(
        torch.randn(steps, 8, 3, generator=torch.Generator().manual_seed(1)), batch_size=None
    )
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=data)
    return trainer


def test_the_average_is_the_hand_computed_one():
    decay, every, warmup = 0.8, 2, 3
    recorder, ema = RecordWeights(), WeightEMA(decay, update_every_n_steps=every, warmup_steps=warmup)
    module = Toy()
    fit_toy(module, steps=7, callbacks=[recorder, ema])

    # the reference: updates after steps 2, 4, 6 (every 2nd of 7); the first copies the weights, the n-th
    # (n = 1, 2, ...) after that averages with d = decay * (1 - exp(-n / warmup)); integers are copied
    expected, updates = None, 0
    for step, state in enumerate(recorder.states, start=1):
        if step % every:
            continue
        if expected is None:
            expected = {k: v.double() for k, v in state.items()}
        else:
            d = decay * (1.0 - math.exp(-updates / warmup))
            expected = {
                k: (d * expected[k] + (1 - d) * v.double()) if v.is_floating_point() else v.double()
                for k, v in state.items()
            }
        updates += 1
    assert updates == 3 and ema.num_updates == 3
    # at the end of the fit the module holds the average
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(module.net[0].weight, recorder.states[-1]["net.0.weight"])


def test_before_the_first_update_the_weights_stand_for_the_average(tmp_path):
    """The average starts as a copy of the initial weights; until its first update, the module keeps its own
    weights at the end of the fit and in checkpoints."""
    recorder, ema = RecordWeights(), WeightEMA(0.5, update_every_n_steps=100)
    module = Toy()
    trainer = fit_toy(module, steps=3, callbacks=[recorder, ema])
    assert ema.num_updates == 0
    trainer.save_checkpoint(tmp_path / "early.ckpt")
    saved = torch.load(tmp_path / "early.ckpt", map_location="cpu", weights_only=True)
    assert "current_model_state" not in saved
    for name, value in recorder.states[-1].items():
        assert torch.equal(module.state_dict()[name], value) and torch.equal(saved["state_dict"][name], value), name


class ValidatedToy(Toy):
    """The toy with a validation loss, recorded per validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.val_losses: list[float] = []

    def validation_step(self, batch, batch_idx):
        self.val_losses.append(self.training_step(batch, batch_idx).item())


def test_the_average_leaves_the_training_untouched():
    """Validating the average swaps it in and back out: with EMA on, the weights after every step of a fit
    with a validation each epoch are bit for bit those of the same fit without it, and what was validated
    differs (the average)."""
    generator = torch.Generator().manual_seed(1)
    train_data, val_data = torch.randn(4, 8, 3, generator=generator), torch.randn(2, 8, 3, generator=generator)
    runs = []
    for callbacks in ([], [WeightEMA(0.5, warmup_steps=0)]):
        recorder, module = RecordWeights(), ValidatedToy()
        trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0, callbacks=[recorder, *callbacks])
        trainer.fit(module, train_dataloaders=train_data, val_dataloaders=val_data)
        runs.append((recorder.states, module.val_losses))
    (plain_states, plain_val), (ema_states, ema_val) = runs
    assert len(plain_states) == len(ema_states) == 12 and len(plain_val) == len(ema_val) == 6
    for step, (plain, averaged) in enumerate(zip(plain_states, ema_states)):
        for name, value in plain.items():
            assert torch.equal(averaged[name], value), (step, name)
    assert plain_val != ema_val


@pytest.mark.parametrize(
    "options", [{"decay": 1.0}, {"decay": 0.9, "update_every_n_steps": 0}, {"decay": 0.9, "warmup_steps": -1}]
)
def test_bad_settings_are_named(options):
    with pytest.raises(ValueError, match="ema"):
        WeightEMA(**options)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.mark.slow
def test_checkpoints_hold_the_validated_average_and_eval_reproduces_it(
    tmp_path, data_root, debug_overrides, eval_overrides
):
    run = tmp_path / "run"
    overrides = debug_overrides(run, data_root) + [
        "trainer.max_epochs=2",
        "ema.decay=0.5",
        "ema.warmup_steps=0",
        "callbacks.validation_images.num_images=0",
    ]
    metrics = train(compose(overrides))
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # the average and the raw weights are both in the checkpoint, and they differ
    assert set(last["state_dict"]) == set(last["current_model_state"])
    assert any(not torch.equal(last["state_dict"][k], last["current_model_state"][k]) for k in last["state_dict"])

    def evaluated(ckpt: Path) -> dict:
        return evaluate(
            compose(eval_overrides(ckpt, data_root, tmp_path / ckpt.stem, tmp_path / "logs"), config_name="eval")
        )

    # ddetr.eval of last.ckpt gives the final validation of training exactly
    final = evaluated(run / "checkpoints" / "last.ckpt")
    for name in ("val/AP", "val/AP50", "val/AP75", "val/AR100", "val/loss"):
        assert final[name] == metrics[name], name
    # and the best checkpoint holds the average that scored its val/AP
    (best,) = (run / "checkpoints").glob("epoch_*.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=True)
    (score,) = [
        v["best_model_score"]
        for k, v in state["callbacks"].items()
        if k.startswith("ModelCheckpoint{'monitor': 'val/AP'")
    ]
    assert evaluated(best)["val/AP"] == pytest.approx(float(score), abs=1e-7)
    written = json.loads((run / "metrics.json").read_text())
    assert written["val/AP"] == metrics["val/AP"]


def _rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = Toy()  # the same initial weights on both ranks, as DDP makes them
        ema = WeightEMA(0.5)
        ema.setup(None, module, "fit")
        with torch.no_grad():  # batch norm statistics from each rank's own batches: they differ between ranks
            module.net[1].running_mean.fill_(float(rank + 1))
            module.net[1].running_var.fill_(float(10 * rank + 2))
        ema.on_train_batch_end(SimpleNamespace(global_step=1), module, None, None, 0)  # the first update (a copy)
        ema.on_validation_epoch_start(None, module)  # the average swapped in for validation
        out.put((rank, {k: v.tolist() for k, v in module.state_dict().items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # over 10 s of CPU on 2 cores (the conftest check, 2026-12-08)
def test_the_validated_average_is_the_same_on_every_rank():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_rank, args=(rank, port, out)) for rank in range(2)]
    for process in processes:
        process.start()
    states = dict(out.get(timeout=300) for _ in processes)  # spawned processes import torch first
    for process in processes:
        process.join(timeout=60)
    for name, value in states[0].items():
        assert states[1][name] == value, name
    assert states[0]["net.1.running_mean"][0] == 1.0  # rank 0's (whose checkpoints are written)
