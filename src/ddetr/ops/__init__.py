"""Multi-scale deformable attention.

``ms_deform_attn`` is the one entry point; ``backend`` chooses the implementation:
``"auto"`` (compiled kernel for the tensors' device when it is available, else PyTorch),
``"pytorch"``, ``"cpu"``, ``"cuda"`` or ``"gather"`` (index arithmetic and row gathers instead of
``grid_sample``, for export: ``ddetr.ops.gather_sampling``).

The compiled kernels live in ``csrc/`` and are built on first use (see ``ddetr.ops._build``) or with
``python -m ddetr.ops build``. Importing this package never needs a compiler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddetr.ops import _build
from ddetr.ops.gather_sampling import ms_deform_attn_gather
from ddetr.ops.reference import ms_deform_attn_pytorch, spatial_shapes_list

BACKENDS = ("auto", "pytorch", "cpu", "cuda", "gather")

__all__ = ["BACKENDS", "compiled_op_available", "level_shapes", "ms_deform_attn", "ms_deform_attn_pytorch"]


@torch.compiler.assume_constant_result
def compiled_op_available(device_type: str) -> bool:
    """Whether the compiled op can run on ``device_type`` ("cpu", "cuda"); builds/loads it on first call.

    A failed build warns once and returns False from then on. ``torch.compile`` treats the answer as
    a constant.
    """
    if not _build.load_library():
        return False
    from ddetr.ops import _registration

    _registration.register()
    return device_type in _build.compiled_devices()


def _unavailable_reason(device_type: str) -> str:
    error = _build.load_error()
    if error is not None:
        return f"the compiled library failed to build or load: {error}"
    return (
        f"the compiled library has no {device_type} kernels (CUDA kernels are built only where "
        "torch.cuda.is_available() at build time)"
    )


_REDUCED = (torch.float16, torch.bfloat16)


def op_dtypes(
    value: torch.dtype, sampling_locations: torch.dtype, attention_weights: torch.dtype
) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes the op runs in: (value's, that of sampling_locations and attention_weights).

    A float16/bfloat16 value keeps its dtype (autocast: the value projection runs in half
    precision) while float32 locations and weights stay float32, since rounding locations to half
    precision moves samples by up to a pixel on large levels; locations and weights of another dtype
    go to float32. Otherwise everything is promoted to one dtype. The output and grad_value come in
    value's dtype, the other gradients in the locations' dtype; kernels accumulate in float32.
    """
    locations = torch.promote_types(sampling_locations, attention_weights)
    if value in _REDUCED:
        if locations == value:
            return value, value
        if locations != torch.float64:
            return value, torch.float32
    common = torch.promote_types(value, locations)
    return common, common


def level_shapes(
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    level_start_index: torch.Tensor | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """The (height, width) of every level as ints (SymInts under ``torch.compile``): ``shapes`` if given,
    else ``spatial_shapes`` as a sequence, else read from the ``spatial_shapes`` tensor on the host.

    The levels lie one after another in value, so their start offsets follow from the shapes (the
    kernels derive them); a ``level_start_index`` tensor is checked against them when the shapes are
    read from a tensor (a host read anyway) and raises ``ValueError`` if it differs.
    """
    if shapes is not None:
        return list(shapes)
    if not isinstance(spatial_shapes, torch.Tensor):
        return list(spatial_shapes)
    read = spatial_shapes_list(spatial_shapes)
    if level_start_index is not None and not torch.compiler.is_compiling():
        expected = [0]
        for height, width in read[:-1]:
            expected.append(expected[-1] + height * width)
        given = [int(start) for start in level_start_index.tolist()]
        if given != expected:
            raise ValueError(
                f"ms_deform_attn: level_start_index {given} is not the running sum of height * width of the "
                f"levels {read} ({expected}); the levels must lie one after another in value"
            )
    return read


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
    shapes: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention: bilinear samples (zero padding, align_corners=False) weighted and summed.

    Args:
        value: (batch_size, num_values, num_heads, head_dim), the flattened levels one after another.
        spatial_shapes: (height, width) of every level: a sequence of int pairs (SymInts under
            ``torch.compile``; nothing is read from a tensor), or a (num_levels, 2) int64 tensor, read
            on the host (a device synchronisation for a CUDA tensor, and not traceable by
            ``torch.compile``).
        level_start_index: (num_levels,) int64, where every level starts in ``num_values``, or None.
            The levels lie one after another, so the kernels derive the starts from the shapes; the
            tensor is only checked when ``spatial_shapes`` is a tensor too (see :func:`level_shapes`).
        sampling_locations: (batch_size, num_queries, num_heads, num_levels, num_points, 2), (x, y)
            in [0, 1]; samples outside the map read zeros.
        attention_weights: (batch_size, num_queries, num_heads, num_levels, num_points).
        backend: "auto" (compiled kernel for the tensors' device if available, else PyTorch),
            "pytorch", "cpu" or "cuda" (the compiled kernel; raises if it cannot be used), or
            "gather" (``ms_deform_attn_gather``: no ``grid_sample``, the export form for TensorRT).
        shapes: the level shapes as Python ints (or SymInts), when ``spatial_shapes`` is a tensor:
            then used instead of reading it.

    Returns:
        (batch_size, num_queries, num_heads * head_dim) in value's dtype, differentiable in value,
        sampling_locations and attention_weights (see :func:`op_dtypes` for mixed dtypes).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    value_dtype, location_dtype = op_dtypes(value.dtype, sampling_locations.dtype, attention_weights.dtype)
    value, sampling_locations, attention_weights = (
        value.to(value_dtype),
        sampling_locations.to(location_dtype),
        attention_weights.to(location_dtype),
    )
    if backend == "gather":  # the shapes as data: no host read, no per-level graph
        if not isinstance(spatial_shapes, torch.Tensor):
            spatial_shapes = torch.tensor(list(spatial_shapes), dtype=torch.int64, device=value.device)
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = level_shapes(spatial_shapes, level_start_index, shapes)
    if backend == "pytorch":
        return ms_deform_attn_pytorch(value, shapes, None, sampling_locations, attention_weights)
    device_type = value.device.type
    if backend == "auto":
        if not compiled_op_available(device_type):
            return ms_deform_attn_pytorch(value, shapes, None, sampling_locations, attention_weights)
    else:
        if device_type != backend:
            raise ValueError(f"attention backend {backend!r} needs {backend} tensors, got value on {value.device}")
        if not compiled_op_available(device_type):
            raise RuntimeError(f"attention backend {backend!r} is unavailable: {_unavailable_reason(device_type)}")
    flat_shapes = [size for height_width in shapes for size in height_width]  # height_0, width_0, height_1, ...
    return torch.ops.ddetr.ms_deform_attn_forward(value, flat_shapes, sampling_locations, attention_weights)
