"""Multi-scale deformable attention as index arithmetic and one row gather per bilinear corner.

The export form without ``GridSample``: TensorRT before 8.6 has no GridSample layer and some later
versions build engines that sample wrongly (NVIDIA/TensorRT #4813); RT-DETRv2's "discrete sampling"
avoids it the same way. Every sample reads its four neighbouring pixels with ``index_select`` (ONNX
``Gather`` on axis 0) from the value rows of all levels flattened into one table, so the graph has
no loop over levels and no shape arithmetic: the level sizes enter as data (``spatial_shapes``),
which keeps the batch size and the image size dynamic in an exported graph.

Semantics are those of ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``:
the location (x, y) in [0, 1] is the pixel coordinate ``x * width - 0.5`` (pixel centres at
integers), and a corner outside the map contributes zero.
"""

from __future__ import annotations

import torch

# the four bilinear corners as (dx, dy) steps from the top-left one
_CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``index_select`` (no ``grid_sample``).

    Args:
        value: (batch_size, num_values, num_heads, head_dim), the flattened levels one after another.
        spatial_shapes: (num_levels, 2) int64 (height, width) of every level (on value's device).
        sampling_locations: (batch_size, num_queries, num_heads, num_levels, num_points, 2),
            (x, y) normalised to [0, 1]; outside that range samples read zeros.
        attention_weights: (batch_size, num_queries, num_heads, num_levels, num_points).

    Returns:
        (batch_size, num_queries, num_heads * head_dim) in value's dtype; the samples are computed in
        the highest dtype of the three inputs, as ``ddetr.ops.reference.ms_deform_attn_pytorch``.
    """
    output_dtype = value.dtype
    dtype = torch.promote_types(value.dtype, torch.promote_types(sampling_locations.dtype, attention_weights.dtype))
    batch_size, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # the value rows as one table: row (b * num_heads + m) * num_values + s holds value[b, s, m]
    table = value.to(dtype).transpose(1, 2).reshape(batch_size * num_heads * num_values, head_dim)  # (B*M*S, D)

    shapes = spatial_shapes.to(device=value.device, dtype=torch.int64)  # (L, 2) as (H, W)
    heights, widths = shapes[:, 0], shapes[:, 1]  # (L,), (L,)
    level_starts = torch.cumsum(heights * widths, 0) - heights * widths  # (L,)
    # per-(b, m) row offset into the table, broadcast against (B, Lq, M, L, P)
    batch_head = torch.arange(batch_size, device=value.device)[:, None] * num_heads + torch.arange(
        num_heads, device=value.device
    )  # (B, M)
    row_base = (batch_head * num_values)[:, None, :, None, None]  # (B, 1, M, 1, 1)
    level_base = level_starts[:, None]  # (L, 1): broadcast over the points
    height, width = heights[:, None], widths[:, None]  # (L, 1) each

    # pixel coordinates with centres at integers (align_corners=False)
    locations = sampling_locations.to(dtype)
    x = locations[..., 0] * width.to(dtype) - 0.5  # (B, Lq, M, L, P)
    y = locations[..., 1] * height.to(dtype) - 0.5  # (B, Lq, M, L, P)
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0  # fractions towards the right and lower corners
    x0, y0 = x0.to(torch.int64), y0.to(torch.int64)
    weights = attention_weights.to(dtype)  # (B, Lq, M, L, P)

    output = None
    for dx, dy in _CORNERS:
        column, row = x0 + dx, y0 + dy  # (B, Lq, M, L, P) each
        inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
        corner_weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        corner_weight = torch.where(inside, corner_weight * weights, torch.zeros_like(corner_weight))
        index = row_base + level_base + row * width + column  # (B, Lq, M, L, P)
        index = torch.where(inside, index, torch.zeros_like(index))  # outside: any valid row, weight 0
        rows = table.index_select(0, index.reshape(-1))  # (B*Lq*M*L*P, D)
        rows = rows.view(batch_size * num_queries * num_heads, num_levels * num_points, head_dim)  # (B*Lq*M, L*P, D)
        # (B*Lq*M, 1, L*P) @ (B*Lq*M, L*P, D) -> (B*Lq*M, 1, D): the weighted sum over levels and points
        summed = torch.bmm(corner_weight.reshape(-1, 1, num_levels * num_points), rows)
        output = summed if output is None else output + summed
    return output.view(batch_size, num_queries, num_heads * head_dim).to(output_dtype)  # (B, Lq, M*D)
