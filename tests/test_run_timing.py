"""A run ends with the metrics of its final weights and says how long it took."""

from __future__ import annotations

import json

from ddetr.app import compose
from ddetr.training.run import train


def test_an_unvalidated_last_epoch_is_validated_and_the_run_is_timed(tmp_path, debug_overrides, capsys):
    overrides = debug_overrides(tmp_path, tmp_path / "data")
    cfg = compose(overrides + ["trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2"])
    metrics = train(cfg)
    assert "val/AP50" in metrics
    out = capsys.readouterr().out
    assert "Training and validation took" in out and "(3 epochs, 9 steps;" in out
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["steps"] == 9 and written["wall_s"] > written["validation_s"] > 0
    logged = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    steps_validated = [
        row.split(",")[header.index("step")] for row in logged[1:] if row.split(",")[header.index("val/AP50")]
    ]
    assert steps_validated == ["5", "8"]  # after epoch 2 (step 6) and after the last of the 9 steps, inside the fit
