"""Shared test setup (offline, headless, quiet) and fixtures: the micro model (options, config, module), the
debug-preset overrides of a training run and of ``ddetr.eval`` on its data, and the transformers oracle
(``_hf_oracle``). The fixtures' plain functions (``_debug_overrides``, ``_eval_overrides``,
``_micro_options``) serve module-level helpers and module-scoped fixtures."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

# A test whose call takes longer than this on an idle 2-core machine is marked slow (`pytest -m "not slow"` is
# the edit-test loop and must stay under two minutes); DDETR_SLOW_LIMIT_S=0 turns the check off.
SLOW_LIMIT_S = float(os.environ.get("DDETR_SLOW_LIMIT_S", "10"))
# fail (the default: the edit-test loop) | report: list such tests at the end instead of failing them (.ci/run:
# a call's time on a shared machine is no reason to refuse a submission, so CI names them and passes)
SLOW_CHECK = os.environ.get("DDETR_SLOW_CHECK", "fail")
_REPORTED: list[str] = []


def _cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its finished child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _load_per_core() -> float:
    """The 1-minute load average per core, at least 1: how many times slower than idle wall time runs now."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        return 1.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Times the test's call phase (wall and CPU) for ``pytest_runtest_makereport``."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    try:
        return (yield)
    finally:
        item._ddetr_call_times = (time.perf_counter() - wall, _cpu_seconds() - cpu, _load_per_core())


def too_slow(wall_s: float, cpu_s: float, load_per_core: float, limit_s: float = SLOW_LIMIT_S) -> bool:
    """Whether an unmarked test's call was over ``limit_s``: its wall time over the limit scaled by the load
    per core (another job on the shared cores stretches wall time, not the work), and its CPU time (own
    threads and finished subprocesses) over the limit too. Both, so neither a busy machine nor a test
    that waits (a subprocess still running, a sleep) alone makes the check fail."""
    return limit_s > 0 and wall_s > limit_s * load_per_core and cpu_s > limit_s


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Fails a passing test that is not marked ``slow`` but took over ``SLOW_LIMIT_S`` (``too_slow``)."""
    report = yield
    times = getattr(item, "_ddetr_call_times", None)
    if report.when == "call" and report.passed and times and item.get_closest_marker("slow") is None:
        wall_s, cpu_s, load = times
        if too_slow(wall_s, cpu_s, load):
            message = (
                f"{item.nodeid} took {wall_s:.1f} s ({cpu_s:.1f} s of CPU, load {load:.1f} per core) and is not "
                f"marked slow. Tests over {SLOW_LIMIT_S:g} s on an idle 2-core machine get @pytest.mark.slow "
                f'(`pytest -m "not slow"` must stay under two minutes), or get faster: preset=debug / model=tiny, '
                f"tiny images, a session fixture of tests/conftest.py instead of a training of their own, "
                f"ddetr.app.compose + run(cfg) in-process instead of a subprocess."
            )
            if SLOW_CHECK == "report":
                _REPORTED.append(message)
            else:
                report.outcome = "failed"
                report.longrepr = message
    return report


def pytest_terminal_summary(terminalreporter):
    """With ``DDETR_SLOW_CHECK=report``: the unmarked tests over the limit, one line each."""
    if _REPORTED:
        terminalreporter.section(f"unmarked tests over {SLOW_LIMIT_S:g} s (DDETR_SLOW_CHECK=report)")
        for message in _REPORTED:
            terminalreporter.line(message)


def _debug_overrides(output_dir: Path, data_root: Path) -> list[str]:
    """``preset=debug`` (tiny model, a few 64-pixel synthetic images, one CPU epoch) writing under
    ``output_dir`` with the synthetic images cached in ``data_root``."""
    return [
        "preset=debug",
        f"data.root={data_root}",
        f"paths.output_dir={output_dir}",
        f"paths.data_dir={output_dir}/data",
        f"paths.log_dir={output_dir}/logs",
    ]


# The data overrides that make any data group (custom, yolo, voc, folder) run like the debug preset: 64-pixel
# training and validation sizes, batches of 2, no worker processes.
TINY_DATA_OVERRIDES = [
    "data.num_workers=0",
    "data.batch_size=2",
    "data.train_transforms.scales=[48,64]",
    "data.train_transforms.max_size=96",
    "data.train_transforms.crop_resize_scales=[48,64]",
    "data.train_transforms.crop_min_size=32",
    "data.train_transforms.crop_max_size=64",
    "data.val_transforms.size=64",
    "data.val_transforms.max_size=96",
]


@pytest.fixture
def debug_overrides():
    """``debug_overrides(output_dir, data_root) -> list[str]`` for ``ddetr.app.compose`` or the CLI."""
    return _debug_overrides


def _eval_overrides(
    ckpt_path: Path, data_root: Path, output_dir: Path, log_dir: Path, batch_size: int = 4
) -> list[str]:
    """``ddetr.eval`` (``config_name="eval"``) of ``ckpt_path`` on the CPU on the debug preset's synthetic data
    (12 + 6 images of 64 pixels, cached in ``data_root``) in batches of ``batch_size``, writing under
    ``output_dir`` and logging under ``log_dir``."""
    return [
        f"ckpt_path={ckpt_path}",
        f"data.root={data_root}",
        "data.num_train=12",
        "data.num_val=6",
        "data.image_size=64",
        "data.num_workers=0",
        f"data.batch_size={batch_size}",
        "data.val_transforms.size=64",
        "data.val_transforms.max_size=96",
        "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false",
        f"paths.output_dir={output_dir}",
        f"paths.log_dir={log_dir}",
    ]


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory):
    """The README's train command (``python -m ddetr.train``, as written there) with ``preset=debug``, run once
    per session through its own ``main()`` in a fresh folder (``DDETR_ROOT``, the working directory). Returns
    ``(folder, run_dir)``: ``folder/data/synthetic`` holds its data, ``run_dir/checkpoints/last.ckpt`` the
    one-epoch checkpoint that tests needing only a trained model share (they read it and write elsewhere)."""
    from _doc_blocks import ROOT, blocks, commands
    from _entry_points import run_command

    folder = tmp_path_factory.mktemp("debug_run")
    (train,) = [block for block in blocks(ROOT / "README.md") if block.marker == "train-command"]
    command = commands(train)[0].split("&&")[-1].strip()  # after its pip install
    monkey = pytest.MonkeyPatch()
    monkey.chdir(folder)
    monkey.setenv("DDETR_ROOT", str(folder))
    try:
        run_command(command, folder, {}, folder / "logs")
    finally:
        monkey.undo()
    (run_dir,) = (folder / "logs" / "train" / "runs").iterdir()
    return folder, run_dir


@pytest.fixture
def eval_overrides():
    """``eval_overrides(ckpt_path, data_root, output_dir, log_dir, batch_size=4) -> list[str]`` for
    ``ddetr.app.compose(..., config_name="eval")``."""
    return _eval_overrides


# The micro model of the unit tests: conf/model/tiny.yaml's sizes (32 channels, 2 heads, 1 + 2 layers,
# 10 queries; ResNet-18 with trainable batch norm) on the official defaults (4 levels, no refinement, not
# two-stage), not on conf/model/small.yaml as model=tiny is: another model, hence another name.
MICRO_OPTIONS = dict(
    backbone={"name": "resnet18", "norm": "batch"},
    hidden_dim=32,
    nheads=2,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=32,
    num_queries=10,
)


def _micro_options(**overrides) -> dict:
    """The micro model's options with ``overrides`` applied, a new dict per call."""
    return {**MICRO_OPTIONS, **overrides}


@pytest.fixture(scope="session")
def micro_options():
    """``micro_options(**overrides) -> dict``: the micro model's options (keyword arguments of
    ``DeformableDETRModule``, ``build_deformable_detr`` and ``DeformableDETRConfig.from_dict``, without
    ``num_classes``), a new dict per call with ``overrides`` applied."""
    return _micro_options


@pytest.fixture
def micro_config(micro_options):
    """A micro ``DeformableDETRConfig`` of ``micro_options()`` with 5 classes."""
    from ddetr.models.config import DeformableDETRConfig

    return DeformableDETRConfig.from_dict(num_classes=5, **micro_options())


@pytest.fixture
def micro_module(micro_config):
    """A ``DeformableDETRModule`` of ``micro_config``, randomly initialised (seed 0), in eval mode."""
    import torch

    from ddetr.training.module import DeformableDETRModule

    torch.manual_seed(0)
    return DeformableDETRModule(micro_config).eval()


@pytest.fixture(scope="session")
def hf_oracle():
    """The transformers oracle helpers (``tests/_hf_oracle.py``); skips without transformers."""
    import _hf_oracle

    return _hf_oracle
