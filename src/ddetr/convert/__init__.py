"""Loading official Deformable DETR and transformers checkpoints into ddetr.

``load_official(path, **flags)`` and ``load_hf(path, **flags)`` return a ``DeformableDETRModule`` in
eval mode; ``python -m ddetr.convert {official,hf} IN OUT [key=value ...]`` writes a Lightning-style
checkpoint that ``DeformableDETRModule.load_from_checkpoint`` (and training, evaluation and
prediction) accept. The name mappings live in ``official`` and ``transformers``; the options and
their defaults are those of ``DeformableDETRConfig`` (``OFFICIAL_OPTIONS``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddetr.convert.official import (
    StateDict,
    check_flags,
    infer_official_flags,
    official_to_ddetr,
    verify_flags,
)
from ddetr.convert.transformers import hf_config_to_flags, hf_to_ddetr, hf_to_official
from ddetr.models.config import OFFICIAL_OPTIONS, DeformableDETRConfig

__all__ = [
    "OFFICIAL_OPTIONS",
    "hf_config_to_flags",
    "hf_to_ddetr",
    "hf_to_official",
    "infer_official_flags",
    "load_hf",
    "load_official",
    "main",
    "official_to_ddetr",
    "parse_overrides",
]


def num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of classes: the rows of ``class_embed.0.weight``."""
    if "class_embed.0.weight" not in state_dict:
        raise KeyError("the checkpoint has no class_embed.0.weight")
    return int(state_dict["class_embed.0.weight"].shape[0])


def model_config(num_classes: int, flags: Mapping[str, Any]) -> DeformableDETRConfig:
    """The ``DeformableDETRConfig`` of official-named ``flags`` (defaults: the official ones)."""
    return DeformableDETRConfig.from_official(num_classes=num_classes, **check_flags(flags))


def _build_module(state_dict: StateDict, config: DeformableDETRConfig, source: str):
    from ddetr.training.module import DeformableDETRModule

    module = DeformableDETRModule(config)
    missing, unexpected = module.model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: converted weights do not fit the model (check the options): missing {missing[:10]} "
            f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})"
        )
    return module.eval()


def _official_state(path: str | Path) -> tuple[StateDict, dict[str, Any]]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: not an official Deformable DETR checkpoint (no 'model' entry)")
    args = checkpoint.get("args")
    args = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
    return checkpoint["model"], {name: args[name] for name in OFFICIAL_OPTIONS if name in args}


def _resolve_official(path: str | Path, flags: Mapping[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    """Weights and options of an official checkpoint: explicit ``flags`` over the checkpoint's saved
    ``args`` over the official defaults, checked against the weights."""
    state_dict, saved = _official_state(path)
    resolved = check_flags({**saved, **flags})
    verify_flags(resolved, state_dict, str(path))
    return state_dict, resolved


def load_official(path: str | Path, **flags: Any):
    """Loads an official Deformable DETR checkpoint as a ``DeformableDETRModule`` in eval mode.

    Args:
        path: a ``.pth`` file whose ``model`` entry is the state dict.
        flags: official option names (``OFFICIAL_OPTIONS``), e.g. ``with_box_refine=True``. Options
            not given come from the checkpoint's saved ``args`` when present, else the official
            defaults. ``num_classes`` comes from the weights. Options that contradict the weights
            (levels, layers, sizes, refinement, two-stage, ResNet depth) raise ``ValueError``.
    """
    state_dict, resolved = _resolve_official(path, flags)
    config = model_config(num_classes_of(state_dict), resolved)
    return _build_module(official_to_ddetr(state_dict, **resolved), config, str(path))


def _read_hf_weights(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:  # pragma: no cover - safetensors comes with transformers
            raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from error
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _resolve_hf(path: str | Path, flags: Mapping[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a saved DeformableDetrForObjectDetection)")
        config = json.loads(config_file.read_text())
        weights = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        if not weights:
            raise FileNotFoundError(
                f"{path}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not supported)"
            )
        resolved = check_flags({**hf_config_to_flags(config), **flags})
        state_dict = _read_hf_weights(weights[0])
    elif path.is_file():
        resolved = check_flags(flags)
        state_dict = _read_hf_weights(path)
    else:
        raise FileNotFoundError(f"no transformers checkpoint at {path}")
    return hf_to_official(state_dict), resolved


def load_hf(path: str | Path, **flags: Any):
    """Loads a transformers Deformable DETR as a ``DeformableDETRModule`` in eval mode.

    Args:
        path: a directory written by ``DeformableDetrForObjectDetection.save_pretrained`` (``config.json``
            + ``model.safetensors`` or ``pytorch_model.bin``; transformers itself is not needed), or a
            state-dict file (``.safetensors`` or a torch file), whose options then come from ``flags``.
        flags: official option names overriding the config (or the official defaults for a file).
    """
    official, resolved = _resolve_hf(path, flags)
    verify_flags(resolved, official, str(path))
    config = model_config(num_classes_of(official), resolved)
    return _build_module(official_to_ddetr(official, **resolved), config, str(path))


def main(argv: list[str] | None = None) -> int:
    """``python -m ddetr.convert``; see ``ddetr.convert.cli``."""
    from ddetr.convert.cli import main as cli_main

    return cli_main(argv)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["with_box_refine=true", "num_queries=100"]`` -> ``{"with_box_refine": True, "num_queries": 100}``."""
    from ddetr.convert.cli import parse_overrides as parse

    return parse(items)
