"""Loading official Deformable DETR, transformers and IDEA-Research/DINO checkpoints into ddetr.

``load_official(path, **flags)``, ``load_hf(path, **flags)`` and ``load_dino(path, **options)`` return a
``DeformableDETRModule`` in eval mode; ``python -m ddetr.convert {official,hf,dino} IN OUT [key=value ...]``
writes a Lightning-style checkpoint that ``DeformableDETRModule.load_from_checkpoint`` (and training,
evaluation and prediction) accept (``ddetr.convert.cli.main``). The name mappings live in ``official``,
``transformers`` and ``dino``; the official options and their defaults are those of ``DeformableDETRConfig``
(``OFFICIAL_OPTIONS``), DINO's come from its checkpoint's ``args`` (``ddetr.convert.dino``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddetr.convert.dino import load_dino
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
    "load_dino",
    "load_hf",
    "load_official",
    "official_to_ddetr",
]


def num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of classes: the rows of ``class_embed.0.weight``."""
    if "class_embed.0.weight" not in state_dict:
        raise KeyError("the checkpoint has no class_embed.0.weight")
    return int(state_dict["class_embed.0.weight"].shape[0])


def model_config(num_classes: int, flags: Mapping[str, Any]) -> DeformableDETRConfig:
    """The ``DeformableDETRConfig`` of official-named ``flags`` (defaults: the official ones)."""
    return DeformableDETRConfig.from_official(num_classes=num_classes, **check_flags(flags))


def _build_module(state_dict: StateDict, config: DeformableDETRConfig, source: str, **options: Any):
    """A ``DeformableDETRModule`` of ``config`` (and its keyword ``options``) holding ``state_dict``, in eval mode."""
    from ddetr.training.module import DeformableDETRModule

    module = DeformableDETRModule(config, **options)
    missing, unexpected = module.model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: converted weights do not fit the model (check the options): missing {missing[:10]} "
            f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})"
        )
    return module.eval()


def _official_state(path: str | Path, trust: bool = False) -> tuple[StateDict, dict[str, Any]]:
    """The weights and the saved ``args`` of an official checkpoint, read weights-only: ``args`` is an
    ``argparse.Namespace``, the one class allowed besides torch's (``trust``: unpickled in full)."""
    from ddetr.checkpoints import CheckpointError, load_file

    checkpoint = load_file(path, "official checkpoint", trust=trust, safe_classes=(argparse.Namespace,))
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(
            f"official checkpoint: {path} is not an official Deformable DETR checkpoint (no 'model' entry)"
        )
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else (args or {})
    if not isinstance(args, dict):
        raise CheckpointError(
            f"official checkpoint: {path}: 'args' is a {type(args).__name__}, not the official options"
        )
    return checkpoint["model"], {name: args[name] for name in OFFICIAL_OPTIONS if name in args}


def _resolve_official(
    path: str | Path, flags: Mapping[str, Any], trust: bool = False
) -> tuple[StateDict, dict[str, Any]]:
    """Weights and options of an official checkpoint: explicit ``flags`` over the checkpoint's saved
    ``args`` over the official defaults, checked against the weights."""
    state_dict, saved = _official_state(path, trust)
    resolved = check_flags({**saved, **flags})
    verify_flags(resolved, state_dict, str(path))
    return state_dict, resolved


def load_official(path: str | Path, trust_checkpoint: bool = False, **flags: Any):
    """Loads an official Deformable DETR checkpoint as a ``DeformableDETRModule`` in eval mode.

    Args:
        path: a ``.pth`` file whose ``model`` entry is the state dict. It is read weights-only (tensors,
            plain values and the ``argparse.Namespace`` of ``args``); a file that asks for other classes
            raises ``CheckpointRefusedError``.
        trust_checkpoint: unpickle the file in full instead; it can run any code it holds.
        flags: official option names (``OFFICIAL_OPTIONS``), e.g. ``with_box_refine=True``. Options
            not given come from the checkpoint's saved ``args`` when present, else the official
            defaults. ``num_classes`` comes from the weights. Options that contradict the weights
            (levels, layers, sizes, refinement, two-stage, ResNet depth) raise ``ValueError``.
    """
    state_dict, resolved = _resolve_official(path, flags, trust_checkpoint)
    config = model_config(num_classes_of(state_dict), resolved)
    return _build_module(official_to_ddetr(state_dict, **resolved), config, str(path))


def _read_hf_weights(path: Path, trust: bool = False) -> StateDict:
    """The state dict of a ``.safetensors`` file, or of a torch file read weights-only (``trust``: in full)."""
    from ddetr.checkpoints import load_file

    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as load_safetensors
        except ImportError as error:  # pragma: no cover - safetensors comes with transformers
            raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from error
        return load_safetensors(str(path))
    return load_file(path, "transformers weights", trust=trust)


def _resolve_hf(path: str | Path, flags: Mapping[str, Any], trust: bool = False) -> tuple[StateDict, dict[str, Any]]:
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
        state_dict = _read_hf_weights(weights[0], trust)
    elif path.is_file():
        resolved = check_flags(flags)
        state_dict = _read_hf_weights(path, trust)
    else:
        raise FileNotFoundError(f"no transformers checkpoint at {path}")
    return hf_to_official(state_dict), resolved


def load_hf(path: str | Path, trust_checkpoint: bool = False, **flags: Any):
    """Loads a transformers Deformable DETR as a ``DeformableDETRModule`` in eval mode.

    Args:
        path: a directory written by ``DeformableDetrForObjectDetection.save_pretrained`` (``config.json``
            + ``model.safetensors`` or ``pytorch_model.bin``; transformers itself is not needed), or a
            state-dict file (``.safetensors`` or a torch file), whose options then come from ``flags``.
            A torch file is read weights-only (``CheckpointRefusedError`` for one that asks for classes).
        trust_checkpoint: unpickle a torch file in full instead; it can run any code it holds.
        flags: official option names overriding the config (or the official defaults for a file).
    """
    official, resolved = _resolve_hf(path, flags, trust_checkpoint)
    verify_flags(resolved, official, str(path))
    config = model_config(num_classes_of(official), resolved)
    return _build_module(official_to_ddetr(official, **resolved), config, str(path))
