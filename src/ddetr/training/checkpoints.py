"""Reading and writing checkpoints: the one place that knows their format.

- ``load_module(path)``: a ``DeformableDETRModule`` from a training or converted checkpoint.
- ``load_pretrained(model, path)``: initialise a detector from a checkpoint before training
  (``model.init_from``), re-initialising the class heads when the class count differs.
- ``save_checkpoint(module, path)``: a Lightning-style checkpoint of a module (used by ``ddetr.convert``).
- ``AtomicCheckpointIO``: Lightning's checkpoint writer, made atomic.
- ``check_resume_checkpoint(path)``: a ``ckpt_path`` to resume training from, checked before Lightning reads it.

A file that cannot be used raises ``CheckpointError``: one line naming the option, the file and the
likely cause (an incomplete copy, not a PyTorch or ddetr/Lightning checkpoint, an official or
transformers checkpoint that needs ``python -m ddetr.convert`` first).
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the likely cause."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at a checkpoint path."""


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_2_PLUS = b"\x80"


def _why_unreadable(path: Path, error: BaseException) -> str:
    """The likely cause of ``torch.load`` failing on ``path``, from the file's first bytes."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(16)
    if size == 0:
        return "the file is empty (an interrupted copy or download?)"
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return f"the zip archive of a PyTorch checkpoint is incomplete ({size} bytes): an interrupted copy or download; copy it again"
        if not any(name.endswith("data.pkl") for name in names):
            return "a zip file, but not a PyTorch checkpoint"
        return f"a PyTorch checkpoint torch cannot load ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    if len(head) >= 9 and head[8:9] == b"{":
        return ("a safetensors file (transformers weights?): convert the model's directory first: "
                "python -m ddetr.convert hf MODEL_DIR converted.ckpt")  # fmt: skip
    if head.startswith(PICKLE_PROTOCOL_2_PLUS) and isinstance(error, (EOFError, pickle.UnpicklingError, RuntimeError)):
        return f"a legacy PyTorch file that ends early ({size} bytes): an interrupted copy or download; copy it again"
    return f"not a PyTorch checkpoint (it starts with {head[:8]!r})"


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict at ``path``; ``CheckpointError`` (naming ``what``, e.g. ``model.init_from``, and
    the file) for a file that cannot be read or that needs ``python -m ddetr.convert`` first.

    ``mmap=True`` maps the tensors instead of reading them (a cheap look at a zip checkpoint's keys)."""
    path = Path(path)
    if path.is_dir():
        hint = (f"a transformers model directory: convert it first: python -m ddetr.convert hf {path} converted.ckpt"
                if (path / "config.json").is_file() else "a directory, not a checkpoint file")  # fmt: skip
        raise CheckpointError(f"{what}: {path} is {hint}")
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what}: no checkpoint at {path}")
    try:
        with open(path, "rb") as file:
            zipped = file.read(4) == ZIP_MAGIC
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap and zipped)
    except Exception as error:  # noqa: BLE001 - every failure to read becomes one line naming the file
        raise CheckpointError(f"{what}: cannot read {path}: {_why_unreadable(path, error)}") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{what}: {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if "model" in checkpoint and "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{what}: {path} is an official Deformable DETR checkpoint; convert it first: "
            f"python -m ddetr.convert official {path} converted.ckpt"
        )
    return checkpoint


def _require_module_checkpoint(checkpoint: dict[str, Any], path: Path, what: str) -> None:
    """``CheckpointError`` unless ``checkpoint`` is a ddetr/Lightning checkpoint of a DeformableDETRModule."""
    if "state_dict" not in checkpoint:
        if any(str(key).startswith(("backbone.", "transformer.", "class_embed.")) for key in checkpoint):
            raise CheckpointError(f"{what}: {path} is a plain state dict of DeformableDETR, not a ddetr/Lightning "
                                  "checkpoint; start training from it with model.init_from=")  # fmt: skip
        raise CheckpointError(f"{what}: {path} is not a ddetr/Lightning checkpoint (no state_dict; keys {sorted(map(str, checkpoint))[:5]})")
    if "hidden_dim" not in checkpoint.get("hyper_parameters", {}):
        raise CheckpointError(f"{what}: {path} is a Lightning checkpoint but not of ddetr's DeformableDETRModule "
                              "(no model hyper-parameters)")  # fmt: skip


def load_module(ckpt_path: str | os.PathLike, device: torch.device | str = "cpu", what: str = "ckpt_path"):
    """``DeformableDETRModule`` from a training or ``ddetr.convert`` checkpoint, in eval mode on ``device``.

    ``CheckpointError`` (one line naming ``what`` and the file) for a file that is not one."""
    from ddetr.training.module import DeformableDETRModule

    path = Path(ckpt_path)
    _require_module_checkpoint(read_checkpoint(path, what, mmap=True), path, what)
    module = DeformableDETRModule.load_from_checkpoint(path, map_location=torch.device(device))
    return module.to(device).eval()


def check_resume_checkpoint(ckpt_path: str | os.PathLike, what: str = "ckpt_path") -> None:
    """Raises ``CheckpointError`` unless ``ckpt_path`` is a training checkpoint to resume from (read cheaply,
    before Lightning reads it); a converted checkpoint holds weights only and belongs in ``model.init_from``."""
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path, what, mmap=True)
    _require_module_checkpoint(checkpoint, path, what)
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise CheckpointError(f"{what}: {path} holds weights only (e.g. from ddetr.convert), not a training state to "
                              f"resume; start from its weights with model.init_from={path}")  # fmt: skip


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
    checkpoint = read_checkpoint(path, "model.init_from")
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

