"""The CPU dropout kernel (ddetr.models.dropout, csrc/cpu/dropout_cpu.cpp): its masks' statistics,
its gradient, determinism, the fallbacks, and the attention that uses it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddetr import ops
from ddetr.models.dropout import Dropout, MultiheadAttention, drop_probability, dropout


@pytest.fixture(scope="module", autouse=True)
def compiled_library():
    assert ops.compiled_op_available("cpu"), f"the compiled op did not build: {ops._build.load_error()}"


def _within(count: int, total: int, probability: float, sigmas: float = 6.0) -> bool:
    """Whether ``count`` of ``total`` Bernoulli(probability) draws is within ``sigmas`` standard deviations."""
    return abs(count - total * probability) <= sigmas * math.sqrt(total * probability * (1 - probability))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_scale_and_pairs(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_001)  # odd: the last element has a pair of its own
    y = dropout(x, p, True)
    realised = drop_probability(p)
    assert abs(realised - p) <= 2**-33
    dropped = y == 0
    assert _within(int(dropped.sum()), x.numel(), realised)
    assert torch.equal(y[~dropped], torch.full_like(y[~dropped], 1 / (1 - realised)))  # kept: exactly 1 / (1 - p')
    # the two elements of one 64-bit draw, and neighbours across draws, drop independently
    both = dropped[:-1].view(-1, 2).all(dim=1)
    assert _within(int(both.sum()), both.numel(), realised**2)
    across = dropped[1:-2].view(-1, 2).all(dim=1)  # elements 2k + 1 and 2k + 2
    assert _within(int(across.sum()), across.numel(), realised**2)


def test_gradient_is_the_mask_times_the_scale_and_gradcheck():
    x = torch.randn(3, 70, 11, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.3, True)
    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    kept = y != 0
    scale = 1 / (1 - drop_probability(0.3))
    torch.testing.assert_close(y, torch.where(kept, x * scale, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, torch.where(kept, grad_output * scale, 0.0), rtol=0, atol=0)
    # the op with a fixed seed is a deterministic function: numerical gradients agree
    small = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.ddetr.dropout_forward(t, 0.4, 1234)[0], (small,))


def test_opcheck():
    x = torch.randn(4, 33, requires_grad=True)
    torch.library.opcheck(torch.ops.ddetr.dropout_forward.default, (x, 0.25, 7))
    keep = torch.rand(4, 33) > 0.25
    torch.library.opcheck(torch.ops.ddetr.dropout_backward.default, (torch.randn(4, 33), keep, 0.25))
    torch.library.opcheck(torch.ops.ddetr.relu_dropout_forward.default, (x, 0.25, 7))
    output = torch.ops.ddetr.relu_dropout_forward(x.detach(), 0.25, 7)
    torch.library.opcheck(torch.ops.ddetr.relu_dropout_backward.default, (torch.randn(4, 33), output, 0.25))


def test_relu_dropout_kernel_is_relu_then_the_same_mask():
    """``relu_dropout_forward`` with a seed: ``dropout_forward``'s output for that seed, after a ReLU, on an odd
    size (the last element's own draw) and with NaN and inf like ``torch.relu`` followed by the dropout; its
    backward is the gradient where the output is positive, times the scale."""
    x = torch.randn(3, 1001, dtype=torch.float64)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0])
    for seed in (0, 99, -(2**62)):
        fused = torch.ops.ddetr.relu_dropout_forward(x, 0.3, seed)
        reference, keep = torch.ops.ddetr.dropout_forward(torch.relu(x), 0.3, seed)
        torch.testing.assert_close(fused, reference, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(fused[0, 0]) and fused[0, 2] == 0 and fused[0, 3] == 0
    assert fused[0, 1] == float("inf") or torch.isnan(fused[0, 1])  # inf * scale, or inf * 0 = NaN (dropped)
    grad_output = torch.randn_like(x)
    grad = torch.ops.ddetr.relu_dropout_backward(grad_output, fused, 0.3)
    scale = 1 / (1 - drop_probability(0.3))
    expected = torch.where((x > 0) & keep, grad_output * scale, 0.0)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    # a NaN gradient stays NaN where the output is positive and is 0 elsewhere, as through ReLU's backward
    nan_grad = torch.ops.ddetr.relu_dropout_backward(torch.full_like(x, float("nan")), fused, 0.3)
    assert torch.isnan(nan_grad[fused > 0]).all() and (nan_grad[~(fused > 0)] == 0).all()
    small = (torch.rand(6, 7, dtype=torch.float64) + 0.05) * torch.tensor([1.0, -1.0]).repeat(21).view(6, 7)
    small.requires_grad_(True)  # away from ReLU's kink at 0, where the numerical gradient is undefined
    assert torch.autograd.gradcheck(lambda t: torch.ops.ddetr.relu_dropout_forward(t, 0.4, 1234), (small,))


def test_same_seed_same_masks_on_any_thread_count():
    x = torch.randn(64, 4099)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            torch.manual_seed(5)
            outputs.append(dropout(x, 0.2, True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert not torch.equal(outputs[0], dropout(x, 0.2, True))  # the generator moved on


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_non_finite_values_like_pytorch(dtype):
    x = torch.tensor([float("nan"), float("inf"), -2.0, 3.0] * 500, dtype=dtype)
    y = dropout(x, 0.5, True)
    assert y.dtype == dtype
    dropped_finite = (y[2::4] == 0) | (y[3::4] == 0)
    assert dropped_finite.any()
    assert torch.isnan(y[0::4]).all()  # NaN * 0 and NaN * scale (as F.dropout: x * mask * scale)
    inf = y[1::4]
    assert ((inf == float("inf")) | torch.isnan(inf)).all()  # inf * scale, or inf * 0 = NaN
    reference = F.dropout(x.float(), 0.5, True)
    assert torch.isnan(reference[1::4]).any() == torch.isnan(inf).any()


def test_fallbacks_are_pytorchs_dropout():
    x = torch.randn(8, 16)
    assert torch.equal(dropout(x, 0.5, False), x)
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.5, True)
    module = Dropout(0.5).eval()
    assert torch.equal(module(x), x)
    # under torch.compile the graph has F.dropout (inductor's own random numbers): no graph break
    compiled = torch.compile(lambda t: dropout(t, 0.5, True), fullgraph=True, backend="eager")
    y = compiled(torch.ones(10_000))
    assert _within(int((y == 0).sum()), 10_000, 0.5)
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 2.0))


def test_multihead_attention_matches_pytorchs_and_keeps_its_state_dict():
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4, dropout=1e-12, batch_first=True).train()  # the kernel's path, nothing dropped
    reference = nn.MultiheadAttention(32, 4, dropout=0.0, batch_first=True).train()
    assert ours.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(ours.state_dict())
    query, value = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    results = []
    for module in (ours, reference):
        module.zero_grad()
        out = module(query, query, value, need_weights=False)[0]
        out.square().sum().backward()
        results.append((out, [p.grad for p in module.parameters()]))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    ours.dropout = 0.5  # now it drops attention weights: rows no longer sum to one
    torch.manual_seed(1)
    assert not torch.allclose(ours(query, query, value, need_weights=False)[0], expected)
