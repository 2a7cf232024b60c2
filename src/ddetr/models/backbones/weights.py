"""Initial backbone weights from a local state-dict file (as the network's own library writes it).

The file holds the state dict of the whole classification network (``torchvision.models.resnet50()
.state_dict()``, ``timm.create_model(name).state_dict()``), optionally under a ``state_dict`` key.
Its entries are matched to the backbone's by name:
- a name the backbone has is loaded as is;
- otherwise its first ``.`` read as ``_`` (timm's ``features_only`` wrappers flatten ``stages.0`` to
  ``stages_0``);
- entries of layers the backbone does not have at all (the classifier and head that the feature
  extractor drops: ``fc``, ``head``, ``classifier``, ``conv_head``) are ignored;
- ``num_batches_tracked`` is loaded where the backbone has it (trainable batch norm) and ignored
  where it does not (frozen batch norm).
Anything else (a missing tensor, an unexpected one inside a layer the backbone has, another shape)
is a ``ValueError`` naming the file and listing the keys.

The file is read by the checkpoint reader (``ddetr.checkpoints.load_tensor_file``), as every checkpoint:
a ``.safetensors`` file (timm's own format) as it is, a torch file weights-only, so a file that asks to
unpickle anything but tensors and plain values is refused (``CheckpointRefusedError``, one line naming
``model.backbone.weights``) unless ``trust`` (``trust_checkpoint=true``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ddetr.checkpoints import CheckpointError, load_tensor_file

BATCHES_TRACKED = "num_batches_tracked"
OPTION = "model.backbone.weights"  # the option that names the file, for the messages


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (``state_dict`` key unwrapped), read by ``load_tensor_file``.

    Raises:
        CheckpointNotFoundError (a ``FileNotFoundError``): no file at ``path``.
        CheckpointRefusedError: a torch file that asks for other classes than tensors and plain values.
        CheckpointError: any other file that cannot be read, or one that holds no dict."""
    path = Path(path)
    state = load_tensor_file(path, OPTION, trust=trust)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{OPTION}: {path} holds a {type(state).__name__}, not a state dict")
    return {str(key): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _own_name(key: str, own: dict[str, torch.Tensor]) -> str | None:
    """The backbone's name for the file's ``key``: itself, or with its first ``.`` as ``_``."""
    flattened = key.replace(".", "_", 1)
    return key if key in own else flattened if flattened in own else None


def _in_dropped_layer(key: str, own: dict[str, torch.Tensor]) -> bool:
    """True when no entry of the backbone lies in the top-level layer of ``key`` (under either naming)."""
    parts = key.split(".")
    prefixes = (parts[0] + ".", "_".join(parts[:2]) + ".")
    return not any(name.startswith(prefixes) for name in own)


def load_backbone_weights(network: nn.Module, path: str | Path, what: str, trust: bool = False) -> None:
    """Loads the state-dict file at ``path`` into ``network`` (rules in the module docstring).

    Args:
        network: the backbone's network (its state-dict names as its library has them).
        path: a local file.
        what: the network, for the error message (``torchvision resnet50``, ``timm convnext_atto``).
        trust: unpickle a torch file in full (``trust_checkpoint=true``): it may run any code it holds.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is refused or cannot be read (``read_state_dict``).
        ValueError: naming the file and ``what``, listing missing, unexpected and mismatched keys.
    """
    load_state_dict(network, read_state_dict(path, trust), str(path), what)


def load_state_dict(network: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Loads ``state`` (from ``source``: a file or a download) into ``network`` by the module's rules."""
    own = network.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in state.items():
        name = _own_name(key, own)
        if name is None:
            if not key.endswith(BATCHES_TRACKED) and not _in_dropped_layer(key, own):
                unexpected.append(key)
        elif value.shape != own[name].shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[name].shape)}")
        else:
            loaded[name] = value
    missing = sorted(name for name in own if name not in loaded and not name.endswith(BATCHES_TRACKED))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"backbone weights {source} do not fit the {what}: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {sorted(unexpected)[:8]} ({len(unexpected)}), shape mismatches {mismatched[:8]} "
            f"({len(mismatched)})"
        )
    network.load_state_dict(loaded, strict=False)
