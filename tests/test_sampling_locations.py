"""MSDeformAttn's sampling locations (computed with operands expanded to contiguous blocks for speed)
against the plain broadcast formula of the official model: the same values bit for bit in float32,
and the same gradients in float64."""

from __future__ import annotations

import pytest
import torch

from ddetr.models.ms_deform_attn import MSDeformAttn

NUM_LEVELS, NUM_HEADS, NUM_POINTS, HIDDEN = 3, 4, 4, 32
SHAPES = torch.tensor([[6, 5], [3, 3], [2, 1]])
STARTS = torch.tensor([0, 30, 39])
NUM_VALUES = 41


def _broadcast_formula(offsets: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The official arithmetic: offsets (B, Q, M, L, P, 2) around references (B, Q, L, 2 or 4)."""
    if reference.shape[-1] == 2:
        normalizer = SHAPES.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
        return reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    return reference[:, :, None, :, None, :2] + offsets / NUM_POINTS * reference[:, :, None, :, None, 2:] * 0.5


def _module(dtype: torch.dtype) -> MSDeformAttn:
    torch.manual_seed(0)
    module = MSDeformAttn(HIDDEN, NUM_LEVELS, NUM_HEADS, NUM_POINTS, backend="pytorch").to(dtype)
    for parameter in module.parameters():  # away from the initialisation's round offsets
        torch.nn.init.normal_(parameter, std=0.5)
    return module


@pytest.mark.parametrize("coordinates", [2, 4])
def test_sampling_locations_equal_the_broadcast_formula(coordinates):
    module = _module(torch.float32)
    query = torch.randn(2, 7, HIDDEN)
    reference = torch.rand(2, 7, NUM_LEVELS, coordinates)
    value = torch.randn(2, NUM_VALUES, HIDDEN)
    _, locations, _ = module(query, reference, value, SHAPES, STARTS, return_attention=True)
    offsets = module.sampling_offsets(query).view(2, 7, NUM_HEADS, NUM_LEVELS, NUM_POINTS, 2)
    expected = _broadcast_formula(offsets, reference)
    assert locations.shape == expected.shape == (2, 7, NUM_HEADS, NUM_LEVELS, NUM_POINTS, 2)
    assert torch.equal(locations, expected)


@pytest.mark.parametrize("coordinates", [2, 4])
def test_sampling_location_gradients_equal_the_broadcast_formula(coordinates):
    module = _module(torch.float64)
    query = torch.randn(2, 5, HIDDEN, dtype=torch.float64, requires_grad=True)
    reference = torch.rand(2, 5, NUM_LEVELS, coordinates, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, NUM_VALUES, HIDDEN, dtype=torch.float64)
    _, locations, _ = module(query, reference, value, SHAPES, STARTS, return_attention=True)
    # the module keeps the offsets in float32 (also under autocast); the formula gets the same ones
    offsets = module.sampling_offsets(query).float().view(2, 5, NUM_HEADS, NUM_LEVELS, NUM_POINTS, 2)
    expected = _broadcast_formula(offsets, reference)
    weights = torch.randn(locations.shape, dtype=torch.float64)
    got = torch.autograd.grad((locations * weights).sum(), [query, reference])
    want = torch.autograd.grad((expected * weights).sum(), [query, reference])
    for name, a, b in zip(("query", "reference"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("size", [1, 8, 12, 16, 20])
def test_softmax_last_dim_equals_the_softmax(size):
    from ddetr.models.ms_deform_attn import softmax_last_dim

    torch.manual_seed(0)
    logits = torch.randn(3, 50, 4, size, dtype=torch.float64) * 4
    expected = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)  # the definition, in float64
    # float32 against the float64 definition: within float32 rounding, as torch.softmax
    torch.testing.assert_close(softmax_last_dim(logits.float()).double(), expected, rtol=2e-6, atol=1e-7)
    logits.requires_grad_(True)
    weights = torch.randn(logits.shape, dtype=torch.float64)
    got = torch.autograd.grad((softmax_last_dim(logits) * weights).sum(), logits)[0]
    want = torch.autograd.grad((torch.softmax(logits, -1) * weights).sum(), logits)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert softmax_last_dim(logits).is_contiguous()
