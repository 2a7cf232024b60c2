"""ddetr.plot: learning curves from a hand-written Lightning CSV log."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddetr.pictures.plots import main, plot_learning_curves, read_epoch_series

# sparse rows as Lightning's CSVLogger writes them: step values, train epoch values, val values
METRICS_CSV = """\
epoch,step,train/loss_step,train/loss_epoch,val/loss,val/AP,val/AP50
0,9,14.0,,,,
0,19,,13.5,,,
0,19,,,12.0,0.01,0.05
1,29,10.0,,,,
1,39,,9.5,,,
1,39,,,9.0,0.20,0.45
2,59,,8.0,,,
2,59,,,8.5,0.35,0.62
"""


def write_run(tmp_path: Path) -> Path:
    (tmp_path / "csv").mkdir(parents=True)
    (tmp_path / "csv" / "metrics.csv").write_text(METRICS_CSV)
    return tmp_path


def test_read_epoch_series_keeps_one_value_per_epoch(tmp_path):
    series = read_epoch_series(write_run(tmp_path) / "csv" / "metrics.csv")
    assert series["train/loss_epoch"] == [(0, 13.5), (1, 9.5), (2, 8.0)]
    assert series["val/AP50"] == [(0, 0.05), (1, 0.45), (2, 0.62)]
    assert series["train/loss_step"] == [(0, 14.0), (1, 10.0)]


def test_plot_writes_a_valid_png(tmp_path):
    out = plot_learning_curves(write_run(tmp_path), tmp_path / "figs" / "curves.png")
    assert out == tmp_path / "figs" / "curves.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(out) as image:
        assert image.size[0] > 100 and image.size[1] > 100
        pixels = np.asarray(image.convert("RGB"))
    # not blank: the curves are drawn in colours that are neither white nor grey
    coloured = (pixels.max(-1).astype(int) - pixels.min(-1).astype(int)) > 60
    assert coloured.sum() > 200, "no coloured curve in the picture"
    assert (pixels < 100).all(-1).sum() > 200, "no dark axes or text in the picture"


def test_command_line_default_output(tmp_path, capsys):
    run = write_run(tmp_path)
    main([str(run)])
    assert (run / "learning_curves.png").is_file()
    assert "learning_curves.png" in capsys.readouterr().out


def test_missing_log_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        plot_learning_curves(tmp_path)


def test_validation_steps_and_several_runs_compared(tmp_path):
    """The validation values by training steps done (the log's step + 1); two runs drawn into one picture."""
    from ddetr.pictures.plots import plot_runs_compared, read_validation_steps

    first = write_run(tmp_path / "a")
    series = read_validation_steps(first / "csv" / "metrics.csv")
    assert series["val/AP50"] == [(20, 0.05), (40, 0.45), (60, 0.62)]
    assert "train/loss_step" not in series
    second = write_run(tmp_path / "b")
    out = plot_runs_compared([first, second], tmp_path / "compared.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 100
    main([str(first), str(second), "--out", str(tmp_path / "cli.png")])
    assert (tmp_path / "cli.png").is_file()
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        plot_runs_compared([first, tmp_path], tmp_path / "x.png")
