"""Pure-PyTorch multi-scale deformable attention (the reference and fallback path).

It samples every level with ``grid_sample`` and sums the samples weighted by the attention weights.
It materialises ``batch_size * num_heads * head_dim * num_queries * num_levels * num_points`` values,
which is why the compiled kernels exist; it stays as the oracle that tests compare them against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.compiler.assume_constant_result
def _constant_shapes_list(spatial_shapes: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(height), int(width)) for height, width in spatial_shapes.tolist()]


def spatial_shapes_list(spatial_shapes: torch.Tensor) -> list[tuple[int, int]]:
    """The (height, width) of every level as Python ints.

    Under ``torch.export`` (strict) the shapes are taken as constants of the exported program (its
    input size is fixed), since ``tolist()`` would otherwise make them data-dependent; elsewhere
    (eager, ``torch.compile``, TorchScript tracing) it is a plain ``tolist()``.
    """
    if torch.compiler.is_exporting():
        return _constant_shapes_list(spatial_shapes)
    return [(int(height), int(width)) for height, width in spatial_shapes.tolist()]


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    shapes: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``grid_sample``.

    Args:
        value: (batch_size, num_values, num_heads, head_dim), the flattened levels one after another.
        spatial_shapes: (height, width) of every level, as a sequence of int pairs or a
            (num_levels, 2) int64 tensor.
        level_start_index: (num_levels,) int64, where every level starts in ``num_values``, or None
            (unused here: the levels are split by their sizes).
        sampling_locations: (batch_size, num_queries, num_heads, num_levels, num_points, 2),
            (x, y) normalised to [0, 1]; outside that range samples read zeros.
        attention_weights: (batch_size, num_queries, num_heads, num_levels, num_points).
        shapes: ``spatial_shapes`` as Python ints, when the caller has them (under ``torch.export``
            with dynamic sizes they are the symbolic sizes of the feature maps; read from the tensor
            when None).

    Returns:
        (batch_size, num_queries, num_heads * head_dim) in value's dtype. Mixed dtypes are sampled
        in the highest of them (``grid_sample`` takes one dtype); see ``ddetr.ops.op_dtypes``.
    """
    del level_start_index
    output_dtype = value.dtype
    compute_dtype = torch.promote_types(
        value.dtype, torch.promote_types(sampling_locations.dtype, attention_weights.dtype)
    )
    value, sampling_locations, attention_weights = (
        t.to(compute_dtype) for t in (value, sampling_locations, attention_weights)
    )
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if shapes is None:
        shapes = spatial_shapes_list(spatial_shapes) if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
    sizes = [height * width for height, width in shapes]
    value_per_level = value.split(sizes, dim=1)
    # grid_sample wants coordinates in [-1, 1]; align_corners=False makes -1 the left edge of pixel 0
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(shapes):
        level_value = value_per_level[level].flatten(2).transpose(1, 2)  # (B, M*D, H*W)
        level_value = level_value.reshape(batch_size * num_heads, head_dim, height, width)  # (B*M, D, H, W)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*M, Lq, P, 2)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*M, D, Lq, P)
    # (B, Lq, M, L, P) -> (B*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch_size * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*M, D, Lq)
    output = output.view(batch_size, num_heads * head_dim, num_queries)  # (B, M*D, Lq)
    return output.transpose(1, 2).contiguous().to(output_dtype)  # (B, Lq, M*D)
