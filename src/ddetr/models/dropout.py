"""Dropout whose random mask is cheap on the CPU.

PyTorch's CPU dropout draws one Bernoulli sample per element (``bernoulli_``: a 64-bit uniform
each, serially, into a float mask) and multiplies twice: in the R50 train step it was the largest
cost after the matrix products and convolutions (``docs/speed.md``). On CPU tensors, with the
compiled library available, ``dropout`` runs ``torch.ops.ddetr.dropout_forward`` instead
(``csrc/cpu/dropout_cpu.cpp``): one threaded pass that hashes each element's index with a seed
drawn from the default generator (so ``torch.manual_seed`` fixes the masks, and activation
checkpointing, which replays the random state, recomputes the same ones), writes the output and a
bool mask for backward (one byte an element instead of four). An element is dropped with
probability ``drop_probability(p)``, ``p`` rounded to 2^-32, and kept ones are scaled by the
inverse of their probability, so every element keeps its expectation.

Elsewhere ``F.dropout`` runs: on other devices (CUDA's dropout is already one fused kernel), while
``torch.compile`` or export traces (inductor draws its own random numbers), and without the
compiled library.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.ops import compiled_op_available

_LEVELS = 1 << 32  # the mask's resolution: 32 random bits an element


def drop_probability(p: float) -> float:
    """The drop probability of the compiled mask for a requested ``p`` (``p`` rounded to 2^-32, halves
    up as the kernel's ``llround``)."""
    return math.floor(p * _LEVELS + 0.5) / _LEVELS


def compiled_path(x: torch.Tensor) -> bool:
    """Whether ``dropout`` runs the compiled CPU kernel on ``x`` (module docstring)."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and compiled_op_available("cpu")
    )


def dropout_seed() -> int:
    """A 64-bit seed from the default CPU generator (one draw)."""
    return int(torch.empty((), dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)``, through the compiled CPU kernel where it runs (module docstring)."""
    if not (training and 0.0 < p < 1.0 and compiled_path(x)):
        return F.dropout(x, p, training)
    output, _ = torch.ops.ddetr.dropout_forward(x, p, dropout_seed())  # differentiable in x
    return output


class Dropout(nn.Dropout):
    """``nn.Dropout`` through ``dropout`` (same options, no state; checkpoints are unchanged)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(input, self.p, self.training, inplace=True)
        return dropout(input, self.p, self.training)


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same parameters and state-dict keys) whose attention-weight dropout
    goes through ``dropout`` while training on the compiled path; with masks, returned weights,
    batch-second inputs or the other options, and outside training, it is ``nn.MultiheadAttention``."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kwargs):
        plain = (
            not (self.training and 0.0 < self.dropout < 1.0 and compiled_path(query))
            or key_padding_mask is not None
            or attn_mask is not None
            or need_weights
            or kwargs
            or not self.batch_first
            or not self._qkv_same_embed_dim
            or self.in_proj_bias is None
            or self.bias_k is not None
            or self.add_zero_attn
        )
        if plain:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                **kwargs,
            )
        batch_size, num_queries, embed_dim = query.shape
        head_dim = embed_dim // self.num_heads
        projections = zip((query, key, value), self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3), strict=True)
        # (batch_size, length, embed_dim) -> (batch_size, num_heads, length, head_dim)
        q, k, v = (
            F.linear(x, weight, bias).view(batch_size, x.shape[1], self.num_heads, head_dim).transpose(1, 2)
            for x, weight, bias in projections
        )
        weights = torch.softmax((q * head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)  # (B, heads, Q, K)
        attended = dropout(weights, self.dropout, True) @ v  # (B, heads, Q, head_dim)
        attended = attended.transpose(1, 2).reshape(batch_size, num_queries, embed_dim)  # (B, Q, heads * head_dim)
        return self.out_proj(attended), None
