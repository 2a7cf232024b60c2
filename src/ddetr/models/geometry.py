"""Reference geometry of the deformable transformer: valid ratios, reference points, two-stage
proposals and their embedding, and the logit-space box update.

Shapes use ``batch_size`` (B), ``num_values`` (S, all levels flattened), ``num_queries`` (Q) and
``num_levels`` (L).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ddetr.image_list import valid_extent


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with x clamped to [0, 1] and both terms clamped to at least ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def boxes_from_reference(box_delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Applies a box head's output to a reference in logit space.

    Args:
        box_delta: (..., 4) raw output of a box head.
        reference: (..., 4) reference boxes, or (..., 2) reference points, in [0, 1].

    Returns:
        (..., 4) ``sigmoid(box_delta + inverse_sigmoid(reference))``; for 2-d references only the
        centre gets the reference added.
    """
    if reference.shape[-1] == 4:
        return (box_delta + inverse_sigmoid(reference)).sigmoid()
    if reference.shape[-1] == 2:
        centre = box_delta[..., :2] + inverse_sigmoid(reference)
        return torch.cat([centre, box_delta[..., 2:]], dim=-1).sigmoid()
    raise ValueError(f"reference must end in 2 or 4 coordinates, got {reference.shape[-1]}")


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of every image that is not padding.

    Args:
        mask: (batch_size, height, width) bool, True on padding (bottom/right).

    Returns:
        (batch_size, 2) float32 as (valid_width / width, valid_height / height).
    """
    _, height, width = mask.shape
    valid_height, valid_width = valid_extent(mask)
    return torch.stack([valid_width.float() / width, valid_height.float() / height], -1)


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]], ratios: torch.Tensor) -> torch.Tensor:
    """Reference point of every encoder position: its pixel centre, normalised by the valid extent of
    its own level, then expressed in the coordinates of every level.

    Args:
        spatial_shapes: (height, width) of every level.
        ratios: (batch_size, num_levels, 2) valid ratios as (x, y).

    Returns:
        (batch_size, num_values, num_levels, 2) as (x, y).
    """
    references = []
    for level, (height, width) in enumerate(spatial_shapes):
        ref_y, ref_x = torch.meshgrid(
            # arange + 0.5 equals linspace(0.5, size - 0.5, size) and exports to ONNX also for size 1
            torch.arange(height, dtype=torch.float32, device=ratios.device) + 0.5,
            torch.arange(width, dtype=torch.float32, device=ratios.device) + 0.5,
            indexing="ij",
        )  # (H, W) each
        ref_y = ref_y.reshape(-1)[None] / (ratios[:, None, level, 1] * height)  # (B, H*W)
        ref_x = ref_x.reshape(-1)[None] / (ratios[:, None, level, 0] * width)  # (B, H*W)
        references.append(torch.stack((ref_x, ref_y), -1))  # (B, H*W, 2)
    reference_points = torch.cat(references, 1)  # (B, S, 2)
    return reference_points[:, :, None] * ratios[:, None]  # (B, S, L, 2)


def proposal_position_embedding(
    proposals: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0
) -> torch.Tensor:
    """Sine embedding of proposal boxes given in logit space.

    Args:
        proposals: (batch_size, num_queries, 4) box logits (before the sigmoid).
        num_pos_feats: features per coordinate.

    Returns:
        (batch_size, num_queries, 4 * num_pos_feats) float32.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    proposals = proposals.float().sigmoid() * (2 * math.pi)
    position = proposals[:, :, :, None] / dim_t  # (B, Q, 4, F)
    # interleave sin and cos: (B, Q, 4, F/2, 2) -> (B, Q, 4 * F)
    return torch.stack((position[..., 0::2].sin(), position[..., 1::2].cos()), dim=4).flatten(2)


def encoder_output_proposals(
    memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal per encoder position: a box at the pixel centre of side ``0.05 * 2**level``.

    Proposals on padding or with a coordinate outside (0.01, 0.99) are invalid: their logits are +inf
    and their memory is zeroed.

    Args:
        memory: (batch_size, num_values, hidden_dim) encoder output.
        padding_mask: (batch_size, num_values) bool, True on padding.
        spatial_shapes: (height, width) of every level.

    Returns:
        memory: (batch_size, num_values, hidden_dim) with invalid positions zeroed.
        proposals: (batch_size, num_values, 4) box logits (inverse sigmoid of (cx, cy, w, h)).
    """
    batch_size = memory.shape[0]
    proposals = []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        level_mask = padding_mask[:, start : start + height * width].view(batch_size, height, width)  # (B, H, W)
        valid_height, valid_width = valid_extent(level_mask)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=memory.device),
            torch.arange(width, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )  # (H, W) each
        grid = torch.stack([grid_x, grid_y], -1)  # (H, W, 2)
        scale = torch.stack([valid_width, valid_height], -1).view(batch_size, 1, 1, 2)  # (B, 1, 1, 2)
        centres = (grid[None].expand(batch_size, -1, -1, -1) + 0.5) / scale  # (B, H, W, 2)
        sizes = torch.ones_like(centres) * 0.05 * (2.0**level)
        proposals.append(torch.cat((centres, sizes), -1).view(batch_size, height * width, 4))  # (B, H*W, 4)
        start += height * width
    proposals = torch.cat(proposals, 1)  # (B, S, 4)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)  # (B, S, 1)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask.unsqueeze(-1) | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals
