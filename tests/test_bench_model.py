"""``python -m ddetr.bench model --quick --device cpu`` prints the side-by-side table; the benchmark
module imports neither Hydra nor pycocotools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env_path = str(ROOT / "src")
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "PYTHONPATH": env_path},
    )


@pytest.mark.slow
def test_quick_cpu_table_has_every_row(capsys):
    pytest.importorskip("transformers")
    from ddetr.bench import main

    # in this process (test_op_subcommand_still_dispatches runs the command line itself)
    assert main(["model", "--quick", "--device", "cpu", "--modes", "fp32,bf16", "--repeat", "1"]) in (0, None)
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert "train ms" in header and "infer ms" in header and "train x HF" in header
    for name in ("ddetr fp32", "transformers fp32", "ddetr bf16", "transformers bf16"):
        row = next((line for line in lines if line.startswith(name + " ")), None)
        assert row is not None, f"no row {name!r} in\n{stdout}"
        assert "failed" not in row, row
        assert float(row.split()[2]) > 0  # train ms


def test_benchmark_imports_no_hydra_or_coco_tools():
    code = (
        "import sys, ddetr.benchmarks.model, ddetr.bench; "
        "bad = [m for m in ('hydra', 'omegaconf', 'pycocotools', 'albumentations') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = run(["-c", code])
    assert result.returncode == 0, result.stderr[-3000:]


def test_failing_mode_is_reported_and_others_run(monkeypatch, capsys):
    from ddetr.benchmarks import model

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "transformers_steps", broken)
    monkeypatch.setattr(
        model, "QUICK", model.dataclasses.replace(model.QUICK, enc_layers=1, dec_layers=1, images=((48, 64),))
    )
    assert model.main(["--quick", "--device", "cpu", "--modes", "fp32", "--repeat", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "transformers fp32" in out and "failed" in out and "RuntimeError: boom" in out
    ddetr_row = next(line for line in out.splitlines() if line.startswith("ddetr fp32"))
    assert "failed" not in ddetr_row


def test_op_subcommand_still_dispatches():
    result = run(["-m", "ddetr.bench", "op", "--help"])
    assert result.returncode == 0 and "--quick" in result.stdout


@pytest.mark.slow  # waits for its 20 s mode timeout
def test_mode_timeout_stops_a_mode_and_the_run_goes_on(monkeypatch, capsys):
    import time as _time

    from ddetr.benchmarks import model

    def slow(*args, **kwargs):
        _time.sleep(120)

    monkeypatch.setattr(model, "transformers_steps", slow)
    monkeypatch.setattr(
        model, "QUICK", model.dataclasses.replace(model.QUICK, enc_layers=1, dec_layers=1, images=((48, 64),))
    )
    args = ["--quick", "--device", "cpu", "--modes", "fp32", "--repeat", "1", "--warmup", "0", "--mode-timeout", "20"]
    assert model.main(args) == 0
    out = capsys.readouterr().out
    assert "ModeTimeout" in out and "ddetr fp32: train" in out


def test_step_census_counts_a_hand_written_step():
    from ddetr.benchmarks.step_census import count_step

    weight = torch.nn.Parameter(torch.randn(5, 3))
    x = torch.randn(4, 5)
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def step() -> None:
        y = (x @ weight).relu()  # mm (saves x; the weight is a parameter), relu (saves its output)
        loss = y.sum()
        assert float(loss) >= 0  # one .item() (_local_scalar_dense): a host read
        loss.backward()  # ones_like seeds it; backward: relu's threshold_backward, one mm for the weight
        optimizer.step()  # SGD: one add_

    census = count_step(step)
    assert census.operators == {"forward": 5, "backward": 2, "optimizer": 1}  # mm relu sum read ones_like
    assert census.host_reads == 1
    assert census.saved_bytes == (4 * 5 + 4 * 3) * 4  # x and relu's output, float32


@pytest.mark.slow
def test_step_census_cli_quick(capsys):
    pytest.importorskip("transformers")
    from ddetr.bench import main

    assert main(["step", "--quick", "--precision", "bf16"]) in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert "forward+loss" in next(line for line in lines if line.startswith("model"))
    for name in ("ddetr bf16", "transformers bf16"):
        row = next(line for line in lines if line.startswith(name + " ")).split()
        forward, backward, optimizer, total = (int(v) for v in row[2:6])
        assert forward > 0 and backward > 0 and optimizer > 0 and total == forward + backward + optimizer
        assert float(row[7]) > 0  # MiB saved for backward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_census_counts_cuda_kernels():
    from ddetr.benchmarks.step_census import count_step

    weight = torch.nn.Parameter(torch.randn(5, 3, device="cuda"))
    x = torch.randn(4, 5, device="cuda")

    def step() -> None:
        (x @ weight).relu().sum().backward()

    census = count_step(step, cuda=True)
    assert census.cuda_kernels is not None and census.cuda_kernels >= 4  # mm, relu, sum, backward's kernels
    assert census.host_reads == 0
