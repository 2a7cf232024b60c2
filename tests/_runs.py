"""How the tests run things: a quiet Lightning trainer on the CPU, and a ddetr entry point in a subprocess
(this checkout's ``src`` first on the path), with the checks of a run that succeeds or stops in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L

SRC = Path(__file__).resolve().parents[1] / "src"


def quiet_trainer(**options) -> L.Trainer:
    """A CPU ``lightning.Trainer`` without logger, checkpoints, progress bar or model summary, given ``options``."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def entry_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, unbuffered, with this checkout's ``src`` as ``PYTHONPATH`` and ``extra`` added."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(SRC), **(extra or {})}


def run_entry(
    module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m module *args`` in ``cwd`` with ``entry_env(env)``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=entry_env(env),
        timeout=timeout,
    )


def run_ok(
    module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``run_entry``, asserting exit status 0 (the message: the ends of its output)."""
    result = run_entry(module, args, cwd, env, timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The last line of stderr of a run that stopped with exit status 1 and no traceback (both asserted)."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def run_workers(worker, args: tuple, nprocs: int, timeout: float) -> None:
    """``worker(rank, *args)`` in ``nprocs`` processes (forked: no second torch import, unsafe once CUDA is
    initialised, then spawned), failing the test if one raises or all have not finished within ``timeout``
    seconds (a hang); the processes are killed then."""
    import time

    import pytest
    import torch

    start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    workers = torch.multiprocessing.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the workers did not finish within {timeout:.0f} s (a hang)")
