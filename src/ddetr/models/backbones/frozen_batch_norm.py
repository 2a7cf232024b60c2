"""Batch norm with fixed statistics, and the conversion of a network's batch norms to it.

The official model freezes every batch norm of the backbone (its batch is too small per GPU to
estimate statistics); ``freeze_batch_norm`` applies the same policy to any network (timm's too), in
place, keeping every state-dict name. Layer norm, group norm and the rest are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, none trained).

    ``y = x * scale + shift`` with ``scale = weight * rsqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, applied as one ``addcmul`` in the dtype of ``x`` (under
    autocast the backbone stays in half precision). ``scale`` and ``shift`` are computed once and
    reused until a buffer changes (in place, by ``load_state_dict``, or replaced by ``.to()``).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self._affine_cache: tuple | None = None  # (buffers, their versions, dtype, scale, shift)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in checkpoints of nn.BatchNorm2d
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _compute_affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # (C,) -> (1, C, 1, 1) to broadcast over (B, C, H, W)
        return scale.reshape(1, -1, 1, 1).to(dtype), shift.reshape(1, -1, 1, 1).to(dtype)

    def affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` of shape (1, C, 1, 1) in ``dtype``, from the cache while the buffers are unchanged."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._compute_affine(dtype)  # traced graphs fuse it; no Python state in them
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        try:
            versions = tuple(buffer._version for buffer in buffers)
        except RuntimeError:  # inference tensors have no version counter: no cache
            return self._compute_affine(dtype)
        cached = self._affine_cache
        if (
            cached is not None
            and cached[2] == dtype
            and cached[1] == versions
            and all(old is new for old, new in zip(cached[0], buffers, strict=True))
        ):
            return cached[3], cached[4]
        # ordinary tensors also inside inference_mode, so a later training step can save them for backward
        with torch.no_grad(), torch.inference_mode(False):
            scale, shift = self._compute_affine(dtype)
        self._affine_cache = (buffers, versions, dtype, scale, shift)
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(x.dtype)
        return torch.addcmul(shift, x, scale)  # shift + x * scale, one kernel

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """A frozen ``timm.layers.BatchNormAct2d``: the frozen norm, then its dropout and activation modules
    (which hold no state-dict entries of their own in timm's networks)."""

    def __init__(self, num_features: int, eps: float, drop: nn.Module, act: nn.Module) -> None:
        super().__init__(num_features, eps)
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _frozen_copy(norm: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """A frozen norm with ``norm``'s eps, affine parameters (ones/zeros without affine) and statistics."""
    if hasattr(norm, "act") and hasattr(norm, "drop"):  # timm's BatchNormAct2d
        frozen: FrozenBatchNorm2d = FrozenBatchNormAct2d(norm.num_features, norm.eps, norm.drop, norm.act)
    else:
        frozen = FrozenBatchNorm2d(norm.num_features, norm.eps)
    with torch.no_grad():
        if norm.affine:
            frozen.weight.copy_(norm.weight)
            frozen.bias.copy_(norm.bias)
        if norm.track_running_stats:
            frozen.running_mean.copy_(norm.running_mean)
            frozen.running_var.copy_(norm.running_var)
    device = next(iter([*norm.parameters(), *norm.buffers()]), frozen.weight).device
    return frozen.to(device)


def freeze_batch_norm(module: nn.Module) -> int:
    """Replaces every ``nn.BatchNorm2d`` (and subclass, e.g. timm's ``BatchNormAct2d``) inside ``module``
    by a ``FrozenBatchNorm2d`` holding its values, in place; the names in the state dict do not change
    (``num_batches_tracked`` is dropped). Returns the number of norms replaced."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _frozen_copy(child))
            replaced += 1
        else:
            replaced += freeze_batch_norm(child)
    return replaced
