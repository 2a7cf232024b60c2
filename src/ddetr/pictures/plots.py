"""Learning curves: ``python -m ddetr.plot RUN_DIR [RUN_DIR ...] [--out FILE]``.

One run: reads the CSV log ``RUN_DIR/csv/metrics.csv`` (written by the default ``logger: csv``) and
draws a PNG with two panels: the losses per epoch (``train/loss_epoch`` and ``val/loss``) and the
validation AP and AP50 per epoch. The default output is ``RUN_DIR/learning_curves.png``.
Epochs are counted from 1 (the values after the first epoch are at x = 1).

Several runs: their validation AP50 and AP against the training step, one line per run named by its
directory (runs of different lengths and epoch sizes side by side); the default output is
``runs_compared.png`` in the current directory.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend

CSV_PATH = Path("csv") / "metrics.csv"
# the first of these present in the log is the train loss
TRAIN_LOSS_COLUMNS = ("train/loss_epoch", "train/loss")
AP_COLUMNS = (("val/AP", "val AP"), ("val/AP50", "val AP50"))


def read_epoch_series(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every column of a Lightning CSV log as ``[(epoch, value), ...]``, one value per epoch.

    Lightning writes sparse rows (train and validation values on different rows); empty cells are
    skipped and, when an epoch has several values of a column, the last one is kept.
    """
    per_epoch: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch_text = row.get("epoch") or ""
            if not epoch_text:
                continue
            epoch = int(float(epoch_text))
            for column, text in row.items():
                if column in ("epoch", "step") or not text:
                    continue
                value = float(text)
                if math.isfinite(value):
                    per_epoch.setdefault(column, {})[epoch] = value
    return {column: sorted(values.items()) for column, values in per_epoch.items()}


def read_validation_steps(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The ``val/*`` columns of a Lightning CSV log as ``[(training steps done, value), ...]`` (the log's
    ``step`` column counts from 0, so the validation after step 499 is at 500)."""
    per_step: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step_text = row.get("step") or ""
            if not step_text:
                continue
            for column, text in row.items():
                if column.startswith("val/") and text and math.isfinite(float(text)):
                    per_step.setdefault(column, {})[int(float(step_text)) + 1] = float(text)
    return {column: sorted(values.items()) for column, values in per_step.items()}


def plot_runs_compared(run_dirs: Sequence[str | Path], out: str | Path = "runs_compared.png") -> Path:
    """Draws the validation AP50 and AP of every run of ``run_dirs`` against the training step into ``out``."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for run_dir in map(Path, run_dirs):
        csv_path = run_dir / CSV_PATH
        if not csv_path.is_file():
            raise FileNotFoundError(f"no CSV log at {csv_path} (runs log there with logger=csv)")
        series = read_validation_steps(csv_path)
        for axis, (column, _) in zip(axes, (("val/AP50", ""), ("val/AP", "")), strict=True):
            points = series.get(column, [])
            axis.plot([step for step, _ in points], [value for _, value in points], marker="o", markersize=3, label=run_dir.name)
    for axis, title in zip(axes, ("val AP50", "val AP"), strict=True):
        axis.set(xlabel="training step", ylabel=title, title=title, ylim=(0, 1))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def plot_learning_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draws the learning curves of ``run_dir`` into ``out`` (default ``run_dir/learning_curves.png``)."""
    run_dir = Path(run_dir)
    csv_path = run_dir / CSV_PATH
    if not csv_path.is_file():
        raise FileNotFoundError(f"no CSV log at {csv_path} (runs log there with logger=csv)")
    series = read_epoch_series(csv_path)
    out = Path(out) if out is not None else run_dir / "learning_curves.png"

    figure, (loss_axis, ap_axis) = plt.subplots(1, 2, figsize=(10, 4))
    train_loss = next((column for column in TRAIN_LOSS_COLUMNS if column in series), None)
    for column, label in ((train_loss, "train loss"), ("val/loss", "val loss")):
        if column in series:
            _plot(loss_axis, series[column], label)
    loss_axis.set(xlabel="epoch", ylabel="weighted loss", title="Loss")
    for column, label in AP_COLUMNS:
        if column in series:
            _plot(ap_axis, series[column], label)
    ap_axis.set(xlabel="epoch", ylabel="COCO AP", title="Validation AP", ylim=(0, 1))
    for axis in (loss_axis, ap_axis):
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend()
    figure.suptitle(run_dir.name)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _plot(axis, points: list[tuple[int, float]], label: str) -> None:
    epochs = [epoch + 1 for epoch, _ in points]
    axis.plot(epochs, [value for _, value in points], marker="o", markersize=3, label=label)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddetr.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="+", help="run directories holding csv/metrics.csv (several: compared)")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/learning_curves.png; runs_compared.png)")
    args = parser.parse_args(argv)
    if len(args.run_dir) == 1:
        print(plot_learning_curves(args.run_dir[0], args.out))
    else:
        print(plot_runs_compared(args.run_dir, args.out or "runs_compared.png"))


if __name__ == "__main__":
    main()
