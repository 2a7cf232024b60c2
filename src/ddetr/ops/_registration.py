"""Python side of the compiled ops: fake (shape-only) kernels and the autograd formula.

Registered once, right after the library is loaded, so ``torch.compile`` can trace
``torch.ops.ddetr.ms_deform_attn_forward`` with fake tensors and autograd can differentiate it; the
backward calls the compiled ``ms_deform_attn_backward`` op.
"""

from __future__ import annotations

import torch

_REGISTERED = False


def register() -> None:
    """Registers the fake kernels and the autograd formula of ``ddetr::ms_deform_attn_forward`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_fake("ddetr::ms_deform_attn_forward", _forward_fake)
    torch.library.register_fake("ddetr::ms_deform_attn_backward", _backward_fake)
    torch.library.register_autograd("ddetr::ms_deform_attn_forward", _backward, setup_context=_setup_context)
    _REGISTERED = True


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Output shape only: (batch_size, num_queries, num_heads * head_dim)."""
    batch_size, _, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    return value.new_empty((batch_size, num_queries, num_heads * head_dim))


def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Gradient shapes only: like value, sampling_locations and attention_weights (contiguous)."""
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_sampling_locations, grad_attention_weights = torch.ops.ddetr.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_sampling_locations, grad_attention_weights
