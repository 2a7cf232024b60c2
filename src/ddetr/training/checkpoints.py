"""Reading and writing checkpoints: the one place that knows their format.

- ``load_module(path)``: a ``DeformableDETRModule`` from a training or converted checkpoint.
- ``load_pretrained(model, path)``: initialise a detector from a checkpoint before training
  (``model.init_from``), re-initialising the class heads when the class count differs.
- ``save_checkpoint(module, path)``: a Lightning-style checkpoint of a module (used by ``ddetr.convert``).
- ``AtomicCheckpointIO``: Lightning's checkpoint writer, made atomic.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

log = logging.getLogger(__name__)


def load_module(ckpt_path: str | os.PathLike, device: torch.device | str = "cpu"):
    """``DeformableDETRModule`` from a training or ``ddetr.convert`` checkpoint, in eval mode on ``device``."""
    from ddetr.training.module import DeformableDETRModule

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {path}")
    module = DeformableDETRModule.load_from_checkpoint(path, map_location=torch.device(device))
    return module.to(device).eval()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict at ``path``; an official or transformers file gets a message naming the converter."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(checkpoint, dict) and "model" in checkpoint and "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} is an official Deformable DETR checkpoint; convert it first: "
            f"python -m ddetr.convert official {path} converted.ckpt"
        )
    return checkpoint


def save_checkpoint(module, path: str | os.PathLike, converted_from: str) -> None:
    """Writes ``module`` as a Lightning checkpoint that ``DeformableDETRModule.load_from_checkpoint`` reads."""
    import lightning

    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "ddetr_converted_from": converted_from,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes every checkpoint to a temporary file in the same folder, syncs it, then renames it into
    place, so a kill while saving leaves the previous checkpoint intact and loadable."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as tmp:
                torch.save(checkpoint, tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


CLASS_HEAD_MARKERS = ("class_embed",)


def load_pretrained(model: nn.Module, path: str) -> None:
    """Initialises ``model`` from a ddetr checkpoint (e.g. one written by ``python -m ddetr.convert``).

    Class-head weights whose shape differs (another number of classes) are left at their fresh
    initialisation with a warning; any other missing or mismatched weight is an error naming it.
    """
    try:
        checkpoint = read_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"model.init_from: no checkpoint at {path}") from None
    if "state_dict" in checkpoint:  # a Lightning checkpoint: keep the detector's weights
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    else:  # a plain state dict of DeformableDETR
        state = dict(checkpoint)
    own = model.state_dict()
    reinitialised = []
    for key in list(state):
        if key in own and own[key].shape != state[key].shape:
            if any(marker in key for marker in CLASS_HEAD_MARKERS):
                reinitialised.append(key)
                del state[key]
            else:
                raise ValueError(
                    f"{path}: weight {key} has shape {tuple(state[key].shape)}, the model expects {tuple(own[key].shape)}"
                )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in reinitialised]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    if reinitialised:
        log.warning(
            "%s: the number of classes differs; re-initialised the class heads (%s)", path, ", ".join(reinitialised)
        )

