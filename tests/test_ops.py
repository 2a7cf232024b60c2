"""Multi-scale deformable attention: compiled kernels against the pure-PyTorch grid_sample path.

The first test builds the library (cached afterwards, see ddetr.ops._build). A build failure fails
these tests instead of skipping them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ddetr import ops
from ddetr.ops import _build, ms_deform_attn, ms_deform_attn_pytorch

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def compiled_library():
    """Builds/loads the compiled op once for this module; fails loudly with the build error."""
    assert ops.compiled_op_available("cpu"), f"the compiled op did not build: {_build.load_error()}"


def make_inputs(
    batch_size=2,
    shapes=((6, 5), (3, 7), (2, 2)),
    num_heads=2,
    head_dim=5,
    num_queries=7,
    num_points=4,
    dtype=torch.float64,
    device="cpu",
    low=-0.2,
    high=1.2,
    seed=0,
):
    """Random inputs; locations uniform in [low, high] so some fall outside the maps."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_values, num_levels = int(sizes.sum()), len(shapes)
    value = torch.randn(batch_size, num_values, num_heads, head_dim, generator=generator, dtype=torch.float64)
    sampling_locations = (
        torch.rand(
            batch_size, num_queries, num_heads, num_levels, num_points, 2, generator=generator, dtype=torch.float64
        )
        * (high - low)
        + low
    )  # (B, Lq, M, L, P, 2)
    attention_weights = torch.rand(
        batch_size, num_queries, num_heads, num_levels, num_points, generator=generator, dtype=torch.float64
    )
    value, sampling_locations, attention_weights = (
        t.to(device=device, dtype=dtype) for t in (value, sampling_locations, attention_weights)
    )
    return value, spatial_shapes.to(device), level_start_index.to(device), sampling_locations, attention_weights


def flat(spatial_shapes) -> list[int]:
    """The op schema's level list: height_0, width_0, height_1, width_1, ..."""
    return [int(size) for size in torch.as_tensor(spatial_shapes).flatten().tolist()]


def output_and_grads(inputs, backend, grad_output=None):
    """Output and (grad_value, grad_sampling_locations, grad_attention_weights) for a fixed grad_output."""
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, sampling_locations, attention_weights)]
    output = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], backend=backend)
    if grad_output is None:
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(output, leaves, grad_output.to(output), allow_unused=True)
    return output.detach(), grads


def assert_matches_reference(inputs, backend="cpu", atol=1e-10, rtol=0.0):
    output, grads = output_and_grads(inputs, backend)
    expected_output, expected_grads = output_and_grads(inputs, "pytorch")
    torch.testing.assert_close(output, expected_output, atol=atol, rtol=rtol)
    for name, grad, expected in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        torch.testing.assert_close(grad, expected, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


CONFIGS = {
    # name: make_inputs kwargs
    "base": {},
    "head_dim30_one_level_one_point": dict(head_dim=30, shapes=((5, 9),), num_points=1, num_heads=3),
    "head_dim71_five_levels_eight_points": dict(
        batch_size=1, head_dim=71, shapes=((7, 3), (4, 4), (1, 6), (3, 1), (1, 1)), num_points=8, num_queries=5
    ),
    "two_points_two_levels_batch3": dict(batch_size=3, num_heads=1, head_dim=8, shapes=((4, 9), (9, 4)), num_points=2),
    "far_outside": dict(low=-3.0, high=4.0, num_queries=16),
    "inside_only": dict(low=0.0, high=1.0, num_points=3, shapes=((8, 8), (4, 4))),
    # >= 4 samples per pixel and head: the CPU backward switches to its heads-outer layout
    "many_samples_per_pixel": dict(shapes=((3, 2), (1, 2)), num_queries=12, num_heads=3, head_dim=6),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_reference_float64(config):
    assert_matches_reference(make_inputs(**config))


@pytest.mark.parametrize("num_points", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("num_levels", [1, 2, 4, 5])
def test_levels_and_points(num_levels, num_points):
    shapes = ((5, 3), (4, 6), (2, 2), (1, 3), (3, 1))[:num_levels]
    assert_matches_reference(make_inputs(shapes=shapes, num_points=num_points, num_queries=3, seed=num_points))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_backward_with_more_threads_than_heads(dtype):
    """batch_size * num_heads < threads: the backward splits the queries over private grad_value copies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        inputs = make_inputs(batch_size=1, num_heads=1, num_queries=9, dtype=dtype)
        assert_close_to_reference_in(inputs, dtype)
        # two heads, many samples per pixel: the heads-outer layout with chunks
        inputs = make_inputs(batch_size=1, num_heads=2, num_queries=12, shapes=((3, 2), (1, 2)), dtype=dtype)
        assert_close_to_reference_in(inputs, dtype)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("num_queries", [300, 1000])
def test_multithreaded_matches_reference(num_queries):
    """Enough queries that the forward splits them over threads (and the backward over heads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert_matches_reference(
            make_inputs(batch_size=2, shapes=((6, 5), (3, 3)), num_heads=2, head_dim=8, num_queries=num_queries)
        )
    finally:
        torch.set_num_threads(threads)


def assert_close_to_reference_in(inputs, dtype):
    """float64: output and gradients within 1e-10; bfloat16: grad_value within bfloat16 tolerance."""
    if dtype == torch.float64:
        assert_matches_reference(inputs)
        return
    _, grads = output_and_grads(inputs, "cpu")
    rounded = [t.double() if t.is_floating_point() else t for t in inputs]
    _, expected = output_and_grads(rounded, "pytorch")
    torch.testing.assert_close(grads[0].double(), expected[0], atol=3e-2, rtol=2e-2)


def test_border_locations():
    """Exactly on the map border, on the outer pixel edge (pixel -1 / size), and far outside."""
    inputs = make_inputs(batch_size=1, shapes=((4, 8), (2, 4)), num_heads=1, head_dim=3, num_queries=8, num_points=8)
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    # coordinates that are exact in binary for these power-of-two sizes
    borders = torch.tensor([0.0, 1.0, -0.5 / 8, -0.5 / 4, 1 + 0.5 / 8, 1e6, -1e6, 0.5], dtype=torch.float64)
    grid_x, grid_y = torch.meshgrid(borders, borders, indexing="ij")
    pairs = torch.stack([grid_x.flatten(), grid_y.flatten()], -1)  # (64, 2) all combinations
    sampling_locations = pairs.reshape(1, 8, 1, 1, 8, 2).expand(1, 8, 1, 2, 8, 2).contiguous()  # (B, Lq, M, L, P, 2)
    assert_matches_reference((value, spatial_shapes, level_start_index, sampling_locations, attention_weights))


def test_gradcheck():
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs(
        batch_size=2, shapes=((3, 4), (2, 3)), num_heads=2, head_dim=3, num_queries=3, num_points=2
    )
    leaves = [t.requires_grad_() for t in (value, sampling_locations, attention_weights)]

    def function(value, sampling_locations, attention_weights):
        levels = flat(spatial_shapes)
        return torch.ops.ddetr.ms_deform_attn_forward(value, levels, sampling_locations, attention_weights)

    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("empty", ["batch", "queries"])
def test_empty(empty):
    config = dict(batch_size=0) if empty == "batch" else dict(num_queries=0)
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs(**config)
    leaves = [t.requires_grad_() for t in (value, sampling_locations, attention_weights)]
    output = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, "cpu")
    assert output.shape == (value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3])
    grads = torch.autograd.grad(output.sum(), leaves)
    for grad, leaf in zip(grads, leaves):
        assert grad.shape == leaf.shape and not grad.any()


def test_non_contiguous_inputs():
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs()
    # the same numbers, laid out differently
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)
    padded = sampling_locations.new_zeros(*sampling_locations.shape[:-1], 3)
    padded[..., :2] = sampling_locations
    locations_t = padded[..., :2]  # every row strided by 3
    weights_t = attention_weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    assert_matches_reference((value_t, spatial_shapes, level_start_index, locations_t, weights_t))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reduced_precision_cpu(dtype):
    """Reduced precision accumulates in float32: compare with float64 on the same (rounded) inputs."""
    inputs = make_inputs(dtype=dtype, head_dim=32, num_queries=9, shapes=((8, 6), (4, 3)))
    output, grads = output_and_grads(inputs, "cpu")
    assert output.dtype == dtype and all(grad.dtype == dtype for grad in grads)
    rounded = [t.to(torch.float64) if t.is_floating_point() else t for t in inputs]
    expected_output, expected_grads = output_and_grads(rounded, "pytorch")
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]

    def check(actual, expected, name):
        scale = expected.abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            actual.double(), expected, atol=tolerance * scale, rtol=tolerance, msg=lambda m: f"{name}: {m}"
        )

    check(output, expected_output, "output")
    for name, grad, expected in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        check(grad, expected, f"grad of {name}")


def test_opcheck_forward_and_backward():
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs(
        dtype=torch.float32, num_queries=4, num_points=2
    )
    leaves = [t.requires_grad_() for t in (value, sampling_locations, attention_weights)]
    torch.library.opcheck(
        torch.ops.ddetr.ms_deform_attn_forward.default, (leaves[0], flat(spatial_shapes), leaves[1], leaves[2])
    )
    grad_output = torch.randn(value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3])
    torch.library.opcheck(
        torch.ops.ddetr.ms_deform_attn_backward.default,
        (grad_output, value.detach(), flat(spatial_shapes), sampling_locations.detach(), attention_weights.detach()),
    )


def test_torch_compile_fullgraph():
    """Inductor on the CPU traces through the op (fake kernel + autograd formula) with the same numbers."""
    inputs = make_inputs(dtype=torch.float32, num_queries=6)
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs

    def attend(value, sampling_locations, attention_weights):
        output = ms_deform_attn(
            value * 2,
            spatial_shapes,
            level_start_index,
            sampling_locations.sigmoid(),
            attention_weights,
            backend="auto",
        )
        return output.tanh()

    compiled = torch.compile(attend, fullgraph=True)
    results = []
    for function in (attend, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (value, sampling_locations, attention_weights)]
        output = function(*leaves)
        results.append((output.detach(), torch.autograd.grad(output.square().sum(), leaves)))
    (eager_output, eager_grads), (compiled_output, compiled_grads) = results
    torch.testing.assert_close(compiled_output, eager_output)
    for grad, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(grad, expected)


def test_backend_selection_and_errors():
    inputs = make_inputs(dtype=torch.float32)
    expected = ms_deform_attn(*inputs, backend="pytorch")
    torch.testing.assert_close(ms_deform_attn(*inputs, backend="auto"), expected)
    torch.testing.assert_close(ms_deform_attn(*inputs, backend="cpu"), expected)
    with pytest.raises(ValueError, match="unknown attention backend"):
        ms_deform_attn(*inputs, backend="triton")
    with pytest.raises(ValueError, match="needs cuda tensors"):
        ms_deform_attn(*inputs, backend="cuda")


@pytest.mark.parametrize(
    "dtypes, expected",
    [
        # (value, sampling_locations, attention_weights) -> (value's, locations' and weights')
        ((torch.bfloat16, torch.float32, torch.float32), (torch.bfloat16, torch.float32)),  # autocast
        ((torch.float16, torch.float32, torch.float16), (torch.float16, torch.float32)),
        ((torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.bfloat16)),
        ((torch.float16, torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)),
        ((torch.bfloat16, torch.float64, torch.float32), (torch.float64, torch.float64)),
        ((torch.float32, torch.float64, torch.float32), (torch.float64, torch.float64)),
        ((torch.float32, torch.bfloat16, torch.float32), (torch.float32, torch.float32)),
    ],
)
def test_op_dtypes_rule(dtypes, expected):
    assert ops.op_dtypes(*dtypes) == expected


@pytest.mark.parametrize("backend", ["cpu", "pytorch"])
@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16])
def test_half_value_with_float32_locations(backend, value_dtype):
    """Autocast's mix: the output and grad_value in value's dtype, the other gradients in float32, and
    the numbers those of float64 on the same (rounded) inputs, within half-precision rounding."""
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs(
        head_dim=32, num_queries=9, shapes=((8, 6), (4, 3))
    )
    inputs = (
        value.to(value_dtype),
        spatial_shapes,
        level_start_index,
        sampling_locations.float(),
        attention_weights.float(),
    )
    output, grads = output_and_grads(inputs, backend)
    assert output.dtype == value_dtype
    assert [grad.dtype for grad in grads] == [value_dtype, torch.float32, torch.float32]
    rounded = [t.to(torch.float64) if t.is_floating_point() else t for t in inputs]
    expected_output, expected_grads = output_and_grads(rounded, "pytorch")
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 3e-3}[value_dtype]
    for name, actual, expected in zip(
        ("output", "value", "sampling_locations", "attention_weights"),
        (output, *grads),
        (expected_output, *expected_grads),
    ):
        scale = expected.abs().max().clamp_min(1.0)
        # the float32 gradients only see value's rounding through grad_output: same tolerance
        torch.testing.assert_close(
            actual.double(), expected, atol=tolerance * scale, rtol=tolerance, msg=lambda m: f"{name}: {m}"
        )


def test_unsupported_dtype_mix_raises():
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs()
    with pytest.raises(RuntimeError, match="float32 for a float16/bfloat16 value"):
        torch.ops.ddetr.ms_deform_attn_forward(
            value.float(), flat(spatial_shapes), sampling_locations, attention_weights
        )
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.ddetr.ms_deform_attn_forward(
            value.bfloat16(), flat(spatial_shapes), sampling_locations.float(), attention_weights
        )


def test_invalid_levels_raise():
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs()
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.ddetr.ms_deform_attn_forward(value, flat(spatial_shapes * 2), sampling_locations, attention_weights)
    with pytest.raises(RuntimeError, match="must hold \\(height, width\\) of num_levels = 3 levels, that is 6 ints"):
        torch.ops.ddetr.ms_deform_attn_forward(value, flat(spatial_shapes[:2]), sampling_locations, attention_weights)
    # the wrapper's tensor form: starts that are not the running sum of the sizes
    with pytest.raises(ValueError, match="not the running sum"):
        ms_deform_attn(value, spatial_shapes, level_start_index + 1, sampling_locations, attention_weights, "cpu")


def test_fake_kernel_checks_the_levels():
    """The fake (shape) kernels check what the compiled ones check about sizes, so a wrong level list is
    caught while tracing (torch.compile, export), not only when the kernel runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    value, spatial_shapes, _, sampling_locations, attention_weights = make_inputs()
    levels, too_big, too_few = flat(spatial_shapes), flat(spatial_shapes * 2), flat(spatial_shapes[:2])
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (value, sampling_locations, attention_weights)]
        output = torch.ops.ddetr.ms_deform_attn_forward(fake[0], levels, fake[1], fake[2])
        assert output.shape == (2, 7, 10)
        with pytest.raises(RuntimeError, match="do not fit in num_values = 55"):
            torch.ops.ddetr.ms_deform_attn_forward(fake[0], too_big, fake[1], fake[2])
        with pytest.raises(RuntimeError, match="of 3 levels"):
            torch.ops.ddetr.ms_deform_attn_forward(fake[0], too_few, fake[1], fake[2])
        grad_output = torch.empty(2, 7, 10, dtype=value.dtype)
        with pytest.raises(RuntimeError, match="do not fit"):
            torch.ops.ddetr.ms_deform_attn_backward(grad_output, fake[0], too_big, fake[1], fake[2])


def test_shapes_as_ints_tensors_and_starts_agree():
    """The level list, the (L, 2) tensor (read on the host) and the tensor with ``shapes`` give one result."""
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs()
    pairs = [tuple(pair) for pair in spatial_shapes.tolist()]
    expected = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, "cpu")
    for shapes_argument, starts, shapes in (
        (pairs, None, None),
        (spatial_shapes, None, None),
        (spatial_shapes, level_start_index, pairs),
    ):
        output = ms_deform_attn(value, shapes_argument, starts, sampling_locations, attention_weights, "cpu", shapes)
        torch.testing.assert_close(output, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "shapes",
    [
        [[2**61, 8], [3, 7], [2, 2]],  # 2^64 pixels: the product wraps around to 0 in int64
        [[2**62, 4], [3, 7], [2, 2]],
        [[6, 5], [2**32 + 1, 2**32 - 1], [2, 2]],  # (2^64 - 1) pixels: -1 in int64
        [[6, 5], [2**62, 2], [2**62, 2]],  # each 2^63 pixels: the running sum wraps around
        [[6, 5], [3, 7], [-2, -3]],  # a negative size whose product is positive
        [[0, 2**63 - 1], [6, 5], [2**63 - 1, 1]],  # empty levels fit whatever their width, the third does not
    ],
    ids=[
        "product_wraps_to_zero",
        "product_wraps_negative",
        "product_is_minus_one",
        "sum_overflows",
        "negative_sizes",
        "huge_empty_levels",
    ],
)
def test_overflowing_levels_raise(shapes):
    """Level sizes whose product (or running sum) overflows int64 are rejected, forward and backward,
    instead of passing the bounds check and reading or writing outside value."""
    value, _, _, sampling_locations, attention_weights = make_inputs()
    levels = [size for pair in shapes for size in pair]
    with pytest.raises(RuntimeError, match="does not fit in num_values = 55"):
        torch.ops.ddetr.ms_deform_attn_forward(value, levels, sampling_locations, attention_weights)
    grad_output = torch.ones(2, 7, 10, dtype=value.dtype)
    with pytest.raises(RuntimeError, match="does not fit in num_values = 55"):
        torch.ops.ddetr.ms_deform_attn_backward(grad_output, value, levels, sampling_locations, attention_weights)


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    """A build failure: "auto" uses the PyTorch path after one warning; a forced backend raises why."""

    def failing_build(with_cuda=None, verbose=False):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(_build, "_STATE", _build._LoadState())
    monkeypatch.setattr(_build, "build", failing_build)
    inputs = make_inputs(dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ms_deform_attn(*inputs)
        second = ms_deform_attn(*inputs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated compiler failure" in messages[0]
    expected = ms_deform_attn_pytorch(*inputs)
    torch.testing.assert_close(first, expected, atol=0, rtol=0)
    torch.testing.assert_close(second, expected, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="simulated compiler failure"):
        ms_deform_attn(*inputs, backend="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
class TestCuda:
    @pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
    def test_matches_reference_float64(self, config):
        assert ops.compiled_op_available("cuda"), _build.load_error()
        assert_matches_reference(make_inputs(device="cuda", **config), backend="cuda")

    def test_border_locations_and_large_head_dim(self):
        inputs = make_inputs(device="cuda", head_dim=71, num_heads=3, low=-1.0, high=2.0, num_queries=33)
        assert_matches_reference(inputs, backend="cuda")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_reduced_precision(self, dtype):
        inputs = make_inputs(device="cuda", dtype=dtype, head_dim=32, num_queries=9, shapes=((8, 6), (4, 3)))
        output, grads = output_and_grads(inputs, "cuda")
        rounded = [t.to(torch.float64) if t.is_floating_point() else t for t in inputs]
        expected_output, expected_grads = output_and_grads(rounded, "pytorch")
        tolerance = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]
        for actual, expected in zip((output, *grads), (expected_output, *expected_grads)):
            scale = expected.abs().max().clamp_min(1.0)
            torch.testing.assert_close(actual.double(), expected, atol=tolerance * scale, rtol=tolerance)

    def test_cpu_spatial_shapes_and_empty(self):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs(device="cuda")
        output = ms_deform_attn(
            value, spatial_shapes.cpu(), level_start_index.cpu(), sampling_locations, attention_weights, backend="cuda"
        )
        torch.testing.assert_close(
            output,
            ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights),
        )
        empty = make_inputs(device="cuda", batch_size=0)
        assert ms_deform_attn(*empty, backend="cuda").shape == (0, 7, 10)

    def test_opcheck(self):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs(
            device="cuda", dtype=torch.float32
        )
        leaves = [t.requires_grad_() for t in (value, sampling_locations, attention_weights)]
        torch.library.opcheck(
            torch.ops.ddetr.ms_deform_attn_forward.default, (leaves[0], flat(spatial_shapes), leaves[1], leaves[2])
        )

    @pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16])
    def test_half_value_with_float32_locations(self, value_dtype):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs(
            device="cuda", head_dim=32, num_queries=9, shapes=((8, 6), (4, 3))
        )
        inputs = (
            value.to(value_dtype),
            spatial_shapes.cpu(),
            level_start_index.cpu(),
            sampling_locations.float(),
            attention_weights.float(),
        )
        output, grads = output_and_grads(inputs, "cuda")
        assert output.dtype == value_dtype
        assert [grad.dtype for grad in grads] == [value_dtype, torch.float32, torch.float32]
        # the CPU kernel follows the same rule: the same numbers up to float32 summation order
        cpu_output, cpu_grads = output_and_grads([t.cpu() for t in inputs], "cpu")
        for actual, expected in zip((output, *grads), (cpu_output, *cpu_grads)):
            scale = expected.abs().max().clamp_min(1.0).item()
            torch.testing.assert_close(actual.cpu().double(), expected.double(), atol=1e-2 * scale, rtol=1e-2)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_encoder_like_shape_many_samples_per_pixel(self, dtype):
        """head_dim 32, 8 heads: the vectorised paths (float4 / 8 x 16 bit) and their atomics."""
        inputs = make_inputs(
            device="cuda",
            batch_size=2,
            shapes=((12, 17), (6, 9), (3, 5), (2, 3)),
            num_heads=8,
            head_dim=32,
            num_queries=300,
            num_points=4,
            low=-0.1,
            high=1.1,
        )
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
        typed = (
            value.to(dtype),
            spatial_shapes.cpu(),
            level_start_index.cpu(),
            sampling_locations.float(),
            attention_weights.float(),
        )
        output, grads = output_and_grads(typed, "cuda")
        rounded = [t.to(torch.float64) if t.is_floating_point() else t for t in typed]
        expected_output, expected_grads = output_and_grads(rounded, "pytorch")
        tolerance = {torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
        for actual, expected in zip((output, *grads), (expected_output, *expected_grads)):
            scale = expected.abs().max().clamp_min(1.0).item()
            torch.testing.assert_close(
                actual.double(), expected.to(actual.device), atol=tolerance * scale, rtol=tolerance
            )

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_misaligned_value_uses_the_scalar_path(self, dtype):
        """A contiguous value that starts 1 element into its storage cannot use 16-byte loads."""
        inputs = make_inputs(device="cuda", dtype=dtype, head_dim=32, num_queries=9, shapes=((8, 6), (4, 3)))
        value = inputs[0]
        storage = torch.empty(value.numel() + 1, dtype=dtype, device="cuda")
        misaligned = storage[1:].view(value.shape)
        misaligned.copy_(value)
        assert misaligned.data_ptr() % 16 != 0
        output, grads = output_and_grads((misaligned, *inputs[1:]), "cuda")
        aligned_output, aligned_grads = output_and_grads(inputs, "cuda")
        torch.testing.assert_close(output, aligned_output)
        for grad, expected in zip(grads, aligned_grads):
            torch.testing.assert_close(grad, expected)

    @pytest.mark.parametrize(
        "shapes",
        [[[12, 10], [6, 14], [4, 4]], [[2**61, 8], [3, 7], [2, 2]], [[0, 2**40], [6, 5], [3, 7]]],
        ids=["too_big", "overflowing", "not_int"],
    )
    def test_invalid_levels_raise(self, shapes):
        value, _, _, sampling_locations, attention_weights = make_inputs(device="cuda")
        levels = [size for pair in shapes for size in pair]
        match = "above 2\\^31 - 1" if shapes[0][0] == 0 else "does not fit"
        with pytest.raises(RuntimeError, match=match):
            torch.ops.ddetr.ms_deform_attn_forward(value, levels, sampling_locations, attention_weights)
        grad_output = torch.ones(
            value.shape[0],
            sampling_locations.shape[1],
            value.shape[2] * value.shape[3],
            dtype=value.dtype,
            device="cuda",
        )
        with pytest.raises(RuntimeError, match=match):
            torch.ops.ddetr.ms_deform_attn_backward(grad_output, value, levels, sampling_locations, attention_weights)

    def test_deterministic_mode_alerts(self):
        inputs = make_inputs(device="cuda", dtype=torch.float32)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
                output_and_grads(inputs, "cuda")
        finally:
            torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("fault", ["nan_weight", "nan_location", "nan_weight_outside", "inf_weight_outside"])
def test_non_finite_inputs_propagate_like_the_reference(fault):
    """A diverged model must show up as NaN output, never be masked by skipped sample points."""
    from ddetr.ops import ms_deform_attn

    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    value = torch.randn(1, 26, 2, 4, dtype=torch.float64, generator=generator)
    locations = torch.rand(1, 3, 2, 2, 2, 2, dtype=torch.float64, generator=generator)
    weights = torch.rand(1, 3, 2, 2, 2, dtype=torch.float64, generator=generator)
    if fault == "nan_weight":
        weights[0, 0, 0, 0, 0] = float("nan")
    elif fault == "nan_location":
        locations[0, 1, 0, 0, 0, 0] = float("nan")
    else:
        locations[0, 2, 1, 1, 1] = 5.0  # far outside the map
        weights[0, 2, 1, 1, 1] = float("nan") if fault == "nan_weight_outside" else float("inf")
    reference = ms_deform_attn(value, shapes, starts, locations, weights, backend="pytorch")
    compiled = ms_deform_attn(value, shapes, starts, locations, weights, backend="cpu")
    assert torch.isnan(reference).any()
    assert torch.equal(torch.isnan(compiled), torch.isnan(reference))
    finite = ~torch.isnan(reference)
    assert torch.allclose(compiled[finite], reference[finite], atol=1e-10)
