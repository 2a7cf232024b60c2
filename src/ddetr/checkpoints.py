"""Reading and writing checkpoints: the one place that knows their format.

- ``load_file(path, what)``: whatever a checkpoint file holds, read safely (below).
- ``load_tensor_file(path, what)``: a weights file (``model.backbone.weights``): safetensors, or as ``load_file``.
- ``read_checkpoint(path, what)``: the dict of a ddetr/Lightning checkpoint.
- ``load_module(path)``: a ``DeformableDETRModule`` from a training or converted checkpoint.
- ``load_pretrained(model, path)``: initialise a detector from a checkpoint before training
  (``model.init_from``), re-initialising the class heads when the class count differs.
- ``save_checkpoint(module, path)``: a Lightning-style checkpoint of a module (used by ``ddetr.convert``).
- ``atomic_save(obj, path)``: ``torch.save`` that leaves the previous file whole if it fails.
- ``AtomicCheckpointIO``: Lightning's checkpoint reader and writer, weights-only and atomic.
- ``check_resume_checkpoint(path)``: a ``ckpt_path`` to resume training from, checked before Lightning reads it.
- ``trust_checkpoint(cfg)``: the entry points' policy, ``trust_checkpoint=true`` or not (the ``trust`` of the above).

Safety: a checkpoint file is a pickle, and unpickling runs whatever code the file names. Every read
here is ``torch.load(..., weights_only=True)``: tensors, plain Python values (dicts, lists, numbers,
strings) and the few classes torch allows, plus classes a caller names (``safe_classes``, e.g.
``argparse.Namespace`` for the official checkpoints' ``args``). A file that asks for anything else is
refused with ``CheckpointRefusedError``, one line naming the option, the file and the classes it asked
for. ``trust=True`` (``trust_checkpoint=true`` on the command line) unpickles the file in full; it is
the only way to, and never happens by itself.

Any other file that cannot be used raises ``CheckpointError``: one line naming the option, the file and
the likely cause (an incomplete copy, not a PyTorch or ddetr/Lightning checkpoint, an official or
transformers checkpoint that needs ``python -m ddetr.convert`` first).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

log = logging.getLogger(__name__)

TRUST_OPTION = "trust_checkpoint=true"


def trust_checkpoint(cfg: Mapping[str, Any]) -> bool:
    """``cfg.trust_checkpoint`` (false where the config has none): may the entry point unpickle checkpoint
    files in full?

    False (the default): every checkpoint is read weights-only (tensors and plain values); a file that asks
    for any other class is refused (``load_file``). True: such a file is unpickled, and a hostile one runs
    whatever code it holds; only for files whose source you trust.
    """
    value = cfg.get("trust_checkpoint", False)
    if not isinstance(value, bool):
        raise ValueError(f"trust_checkpoint must be true or false, got {value!r}")
    return value


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the likely cause."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at a checkpoint path."""


class CheckpointRefusedError(CheckpointError):
    """A checkpoint whose pickle asks for classes that a weights-only load does not allow."""


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_2_PLUS = b"\x80"


def is_safetensors_head(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a safetensors file: an 8-byte header length, then its JSON."""
    return len(head) >= 9 and head[8:9] == b"{"


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
    if is_safetensors_head(head):
        return (
            "a safetensors file (transformers weights?): convert the model's directory first: "
            "python -m ddetr.convert hf MODEL_DIR converted.ckpt"
        )
    if head.startswith(PICKLE_PROTOCOL_2_PLUS) and isinstance(error, (EOFError, pickle.UnpicklingError, RuntimeError)):
        return f"a legacy PyTorch file that ends early ({size} bytes): an interrupted copy or download; copy it again"
    return f"not a PyTorch checkpoint (it starts with {head[:8]!r})"


_MARK = object()
_MEMO_PUT = ("PUT", "BINPUT", "LONG_BINPUT")
_MEMO_GET = ("GET", "BINGET", "LONG_BINGET")


def pickled_globals(data: bytes) -> list[str]:
    """Every ``module.name`` that the pickles at the start of ``data`` import (``GLOBAL``, ``INST`` and
    ``STACK_GLOBAL``, whose two strings are followed through the stack and the memo), in order.

    The opcodes are only read (``pickletools.genops``), never run; reading stops at the first byte
    that is not a pickle (e.g. the raw tensor data after the pickles of a legacy torch file)."""
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        stack: list[Any] = []
        memo: dict[int, Any] = {}
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(stack) >= 2:
                    module, name = stack[-2:]
                    found.append(f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else "?")
                if opcode.name in _MEMO_PUT or opcode.name == "MEMOIZE":
                    memo[len(memo) if opcode.name == "MEMOIZE" else arg] = stack[-1] if stack else None
                    continue
                if opcode.name in _MEMO_GET:
                    stack.append(memo.get(arg))
                    continue
                before = opcode.stack_before
                if pickletools.markobject in before:  # pops back to the mark, and what lies under it
                    while stack and stack.pop() is not _MARK:
                        pass
                    del stack[max(0, len(stack) - before.index(pickletools.markobject)) :]
                else:
                    del stack[max(0, len(stack) - len(before)) :]
                for item in opcode.stack_after:
                    stack.append(_MARK if item is pickletools.markobject else arg if isinstance(arg, str) else None)
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle: what was read so far is the answer
            break
    return found


def _refused_globals(path: Path, error: BaseException, zipped: bool) -> list[str]:
    """The classes and functions ``path`` asks for that the weights-only load refused: torch's own list
    for a zip checkpoint, else the one torch's error names, else every global the file's pickles import."""
    if zipped:
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - a damaged archive: fall back to the error's words
            pass
    named = re.findall(r"GLOBAL ([\w.]+)", str(error))
    if named:
        return list(dict.fromkeys(named))
    with open(path, "rb") as file:
        return list(dict.fromkeys(pickled_globals(file.read(1 << 20))))


def load_file(
    path: str | os.PathLike,
    what: str = "checkpoint",
    trust: bool = False,
    safe_classes: Sequence[type] = (),
    mmap: bool = False,
    map_location: Any = "cpu",
) -> Any:
    """What the checkpoint file at ``path`` holds, loaded weights-only (see the module docstring).

    Args:
        path: the file.
        what: the option or argument that named the file, for the messages (``ckpt_path``, ``model.init_from``).
        trust: unpickle the file in full (``trust_checkpoint=true``): it may run any code it names.
        safe_classes: classes allowed besides torch's, for this load only.
        mmap: map the tensors of a zip checkpoint instead of reading them (a cheap look at its keys).
        map_location: as ``torch.load``'s.

    Raises:
        CheckpointRefusedError: the file asks for a class that is not allowed (and ``trust`` is false).
        CheckpointError: no such file, a directory, or a file torch cannot read (the likely cause named).
    """
    path = Path(path)
    if path.is_dir():
        hint = (
            f"a transformers model directory: convert it first: python -m ddetr.convert hf {path} converted.ckpt"
            if (path / "config.json").is_file()
            else "a directory, not a checkpoint file"
        )
        raise CheckpointError(f"{what}: {path} is {hint}")
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what}: no checkpoint at {path}")
    with open(path, "rb") as file:
        zipped = file.read(4) == ZIP_MAGIC
    if trust:
        log.warning("%s: unpickling %s in full (%s): it can run any code it holds", what, path, TRUST_OPTION)
    try:
        with torch.serialization.safe_globals(list(safe_classes)):
            try:
                return torch.load(path, map_location=map_location, weights_only=not trust, mmap=mmap and zipped)
            except pickle.UnpicklingError as error:
                if trust or "weights only load failed" not in str(error).lower():
                    raise
                refused = _refused_globals(path, error, zipped)
    except Exception as error:  # noqa: BLE001 - every failure to read becomes one line naming the file
        raise CheckpointError(f"{what}: cannot read {path}: {_why_unreadable(path, error)}") from error
    asked = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
    raise CheckpointRefusedError(
        f"{what}: refused {path}: it asks to unpickle {asked or 'objects'}, which is neither a tensor nor a plain "
        "value, and unpickling a file from elsewhere can run any code it holds; only if you trust the file and its "
        f"source, load it with {TRUST_OPTION}"
    )


def load_tensor_file(path: str | os.PathLike, what: str, trust: bool = False) -> Any:
    """What a weights file holds: a safetensors file (the format timm's and Hugging Face's weights come in:
    tensors only, nothing to unpickle, read by the ``safetensors`` package) as its dict of tensors, any other
    file through ``load_file`` (weights-only unless ``trust``).

    Raises:
        CheckpointError: as ``load_file``; for a safetensors file, one that cannot be read or a missing package.
    """
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as file:
            head = file.read(9)
        if is_safetensors_head(head):
            try:
                from safetensors.torch import load_file as load_safetensors
            except ImportError:
                raise CheckpointError(
                    f"{what}: {path} is a safetensors file; reading it needs the safetensors package "
                    "(pip install safetensors; timm installs it)"
                ) from None
            try:
                return load_safetensors(str(path), device="cpu")
            except Exception as error:  # noqa: BLE001 - one line naming the file
                reason = str(error).splitlines()[0] if str(error) else ""
                raise CheckpointError(
                    f"{what}: cannot read {path}: a damaged or incomplete safetensors file ({type(error).__name__}: "
                    f"{reason})"
                ) from error
    return load_file(path, what, trust=trust)


def read_checkpoint(
    path: str | os.PathLike,
    what: str = "checkpoint",
    mmap: bool = False,
    trust: bool = False,
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """The checkpoint dict at ``path``, read by ``load_file`` (weights-only unless ``trust``);
    ``CheckpointError`` (naming ``what``, e.g. ``model.init_from``, and the file) for a file that cannot be
    read, is refused, or needs ``python -m ddetr.convert`` first."""
    path = Path(path)
    checkpoint = load_file(path, what, trust=trust, mmap=mmap, map_location=map_location)
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
            raise CheckpointError(
                f"{what}: {path} is a plain state dict of DeformableDETR, not a ddetr/Lightning "
                "checkpoint; start training from it with model.init_from="
            )
        raise CheckpointError(
            f"{what}: {path} is not a ddetr/Lightning checkpoint (no state_dict; keys {sorted(map(str, checkpoint))[:5]})"
        )
    if "hidden_dim" not in checkpoint.get("hyper_parameters", {}):
        raise CheckpointError(
            f"{what}: {path} is a Lightning checkpoint but not of ddetr's DeformableDETRModule "
            "(no model hyper-parameters)"
        )


def _without_initial_weights(hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """Overrides for ``load_from_checkpoint`` that drop the backbone's initial weights (a file or a
    download) from the hyper-parameters of older checkpoints: the checkpoint holds the trained weights."""
    backbone = hyper_parameters.get("backbone")
    if isinstance(backbone, dict) and backbone.get("weights") is not None:
        return {"backbone": {**backbone, "weights": None}}
    return {}


def load_module(
    ckpt_path: str | os.PathLike, device: torch.device | str = "cpu", what: str = "ckpt_path", trust: bool = False
):
    """``DeformableDETRModule`` from a training or ``ddetr.convert`` checkpoint, in eval mode on ``device``.

    Weights-only (``trust=True``, i.e. ``trust_checkpoint=true``, unpickles the file in full).
    ``CheckpointError`` (one line naming ``what`` and the file) for a file that is not one or is refused."""
    from ddetr.training.module import DeformableDETRModule

    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path, what, mmap=True, trust=trust)
    _require_module_checkpoint(checkpoint, path, what)
    overrides = _without_initial_weights(checkpoint["hyper_parameters"])
    module = DeformableDETRModule.load_from_checkpoint(
        path, map_location=torch.device(device), weights_only=not trust, **overrides
    )
    return module.to(device).eval()


def check_resume_checkpoint(ckpt_path: str | os.PathLike, what: str = "ckpt_path", trust: bool = False) -> None:
    """Raises ``CheckpointError`` unless ``ckpt_path`` is a training checkpoint to resume from (read cheaply,
    before Lightning reads it); a converted checkpoint holds weights only and belongs in ``model.init_from``."""
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path, what, mmap=True, trust=trust)
    _require_module_checkpoint(checkpoint, path, what)
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise CheckpointError(
            f"{what}: {path} holds weights only (e.g. from ddetr.convert), not a training state to "
            f"resume; start from its weights with model.init_from={path}"
        )


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (where the platform can open a folder)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` into a temporary file in the same folder, synced, then renamed into place
    (and the folder synced), so a failure or a kill while saving leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            torch.save(obj, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def save_checkpoint(module, path: str | os.PathLike, converted_from: str) -> None:
    """Writes ``module`` (atomically) as a Lightning checkpoint that ``DeformableDETRModule.load_from_checkpoint``
    reads; plain values only, so it loads weights-only."""
    import lightning

    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "ddetr_converted_from": converted_from,
    }
    atomic_save(checkpoint, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O: writes through ``atomic_save`` (a kill while saving leaves the previous
    checkpoint intact and loadable) and reads through ``read_checkpoint``, weights-only unless the caller
    passes ``weights_only=False`` (``trainer.fit(..., weights_only=False)``, what ``trust_checkpoint=true``
    does); Lightning's default ``None`` is weights-only too."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, "ckpt_path", trust=weights_only is False, map_location=map_location)


# the weights sized by the class count: the class heads and the denoising label book (num_classes rows)
CLASS_HEAD_MARKERS = ("class_embed", "denoising.label_embed")


def load_pretrained(model: nn.Module, path: str, trust: bool = False) -> None:
    """Initialises ``model`` from a ddetr checkpoint (e.g. one written by ``python -m ddetr.convert``),
    read weights-only (``trust=True``: in full).

    Class-head weights whose shape differs (another number of classes) are left at their fresh
    initialisation with a warning; any other missing or mismatched weight is an error naming it.
    """
    checkpoint = read_checkpoint(path, "model.init_from", trust=trust)
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
        raise ValueError(
            f"{path}: checkpoint does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    if reinitialised:
        log.warning(
            "%s: the number of classes differs; re-initialised the class heads (%s)", path, ", ".join(reinitialised)
        )
