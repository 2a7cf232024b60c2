"""Python side of the compiled ops: fake (shape-only) kernels and the autograd formulas.

Registered once, right after the library is loaded, so ``torch.compile`` can trace
``torch.ops.ddetr.ms_deform_attn_forward`` with fake tensors and autograd can differentiate it; the
backward calls the compiled ``ms_deform_attn_backward`` op.
"""

from __future__ import annotations

import torch

_REGISTERED = False


def register() -> None:
    """Registers the fake kernels and the autograd formulas of ``ddetr::ms_deform_attn_forward`` and
    ``ddetr::dropout_forward`` and ``ddetr::relu_dropout_forward`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_fake("ddetr::ms_deform_attn_forward", _forward_fake)
    torch.library.register_fake("ddetr::ms_deform_attn_backward", _backward_fake)
    torch.library.register_autograd("ddetr::ms_deform_attn_forward", _backward, setup_context=_setup_context)
    torch.library.register_fake("ddetr::dropout_forward", _dropout_forward_fake)
    torch.library.register_fake("ddetr::dropout_backward", _contiguous_like_first)
    torch.library.register_autograd("ddetr::dropout_forward", _dropout_backward, setup_context=_dropout_setup_context)
    torch.library.register_fake("ddetr::relu_dropout_forward", _contiguous_like_first)
    torch.library.register_fake("ddetr::relu_dropout_backward", _contiguous_like_first)
    torch.library.register_autograd(
        "ddetr::relu_dropout_forward", _relu_dropout_backward, setup_context=_relu_dropout_setup_context
    )
    _REGISTERED = True


def _check_fake_inputs(value, spatial_shapes, sampling_locations, attention_weights) -> None:
    """The kernels' checks that concern sizes, with ``torch._check`` so that they hold symbolically under
    ``torch.compile`` (the levels fit in value: with sizes taken from the feature maps this is known, so
    it adds no guard and no recompile)."""
    torch._check(
        value.dim() == 4, lambda: f"value must be (batch_size, num_values, num_heads, head_dim): {value.shape}"
    )
    torch._check(sampling_locations.dim() == 6, lambda: "sampling_locations must have 6 dimensions")
    batch_size, num_values, num_heads, _ = value.shape
    num_levels = sampling_locations.shape[3]
    torch._check(
        len(spatial_shapes) == 2 * num_levels,
        lambda: f"spatial_shapes must hold (height, width) of {num_levels} levels, got {list(spatial_shapes)}",
    )
    torch._check(
        sampling_locations.shape[0] == batch_size and sampling_locations.shape[2] == num_heads,
        lambda: f"sampling_locations {sampling_locations.shape} does not match value {value.shape}",
    )
    torch._check(
        attention_weights.dim() == 5 and all(a == b for a, b in zip(attention_weights.shape, sampling_locations.shape)),
        lambda: f"attention_weights must be {sampling_locations.shape[:5]}, got {attention_weights.shape}",
    )
    total = 0
    for height, width in zip(spatial_shapes[0::2], spatial_shapes[1::2]):
        torch._check(height >= 0)
        torch._check(width >= 0)
        total = total + height * width
    torch._check(total <= num_values, lambda: f"levels {list(spatial_shapes)} do not fit in num_values = {num_values}")


def _forward_fake(value, spatial_shapes, sampling_locations, attention_weights):
    """Output shape only: (batch_size, num_queries, num_heads * head_dim)."""
    _check_fake_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    batch_size, _, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    return value.new_empty((batch_size, num_queries, num_heads * head_dim))


def _backward_fake(grad_output, value, spatial_shapes, sampling_locations, attention_weights):
    """Gradient shapes only: like value, sampling_locations and attention_weights (contiguous)."""
    _check_fake_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.spatial_shapes = spatial_shapes


def _backward(ctx, grad_output):
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_sampling_locations, grad_attention_weights = torch.ops.ddetr.ms_deform_attn_backward(
        grad_output, value, ctx.spatial_shapes, sampling_locations, attention_weights
    )
    return grad_value, None, grad_sampling_locations, grad_attention_weights


def _dropout_forward_fake(input, p, seed):
    """(output like input, keep: bool of input's shape)."""
    return _contiguous_like_first(input), input.new_empty(input.shape, dtype=torch.bool)


def _contiguous_like_first(tensor, *_):
    """The fake kernel of the dropout ops with one output: contiguous, like their first argument."""
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def _dropout_setup_context(ctx, inputs, output):
    _, ctx.p, _ = inputs
    _, keep = output
    ctx.save_for_backward(keep)
    ctx.set_materialize_grads(False)  # keep (bool) has no gradient: no zeros for it


def _dropout_backward(ctx, grad_output, grad_keep):
    (keep,) = ctx.saved_tensors
    if grad_output is None:
        return None, None, None
    return torch.ops.ddetr.dropout_backward(grad_output, keep, ctx.p), None, None


def _relu_dropout_setup_context(ctx, inputs, output):
    _, ctx.p, _ = inputs
    ctx.save_for_backward(output)  # positive exactly where the input was positive and kept


def _relu_dropout_backward(ctx, grad_output):
    (output,) = ctx.saved_tensors
    return torch.ops.ddetr.relu_dropout_backward(grad_output, output, ctx.p), None, None
