"""Shared test setup (offline, headless, quiet) and fixtures: the micro model (options, config, module), the
debug-preset overrides of a training run, and the transformers oracle (``_hf_oracle``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


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


@pytest.fixture
def debug_overrides():
    """``debug_overrides(output_dir, data_root) -> list[str]`` for ``ddetr.app.compose`` or the CLI."""
    return _debug_overrides


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


@pytest.fixture(scope="session")
def micro_options():
    """``micro_options(**overrides) -> dict``: the micro model's options (keyword arguments of
    ``DeformableDETRModule``, ``build_deformable_detr`` and ``DeformableDETRConfig.from_dict``, without
    ``num_classes``), a new dict per call with ``overrides`` applied."""

    def options(**overrides):
        return {**MICRO_OPTIONS, **overrides}

    return options


@pytest.fixture
def micro_config(micro_options):
    """The micro ``DeformableDETRConfig`` (``micro_options()``) with 5 classes."""
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
