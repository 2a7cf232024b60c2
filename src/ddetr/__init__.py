"""ddetr: Deformable DETR on PyTorch Lightning and Hydra.

The public API, imported on first use so that ``import ddetr`` stays light::

    from ddetr import DeformableDETRModule, DeformableDETRConfig, load_official, load_hf, ms_deform_attn
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DeformableDETRModule": "ddetr.training.module",
    "DeformableDETRConfig": "ddetr.models.config",
    "LossConfig": "ddetr.models.config",
    "OptimConfig": "ddetr.models.config",
    "load_official": "ddetr.convert",
    "load_hf": "ddetr.convert",
    "ms_deform_attn": "ddetr.ops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ddetr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
