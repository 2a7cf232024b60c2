"""DINO's decoder (Zhang et al. 2022, ``IDEA-Research/DINO``): query positions from the anchor boxes.

The layers are Deformable DETR's (self-attention, deformable cross-attention, FFN); what differs:

- a query's position embedding is not an input but, before every layer, ``ref_point_head`` (a 2-layer
  MLP, 2D -> D -> D) of the sine embedding of its current 4-d anchor box (``anchor_sine_embedding``, of
  the box scaled by the first level's valid ratios, as DINO);
- every layer's output passes one shared LayerNorm (``norm``) before the heads see it, while the
  next anchor is refined from the output before that norm;
- the box heads refine in logit space with DINO's ``inverse_sigmoid`` clamp (1e-3, the official 1e-5).

Shapes use ``batch_size`` (B), ``num_queries`` (Q), ``num_levels`` (L) and ``hidden_dim`` (D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ddetr.models.config import DeformableDETRConfig
from ddetr.models.deformable_transformer import DecoderQueries, DeformableDecoder, FlatLevels, _run_layer
from ddetr.models.geometry import inverse_sigmoid

DINO_EPS = 1e-3  # DINO's inverse_sigmoid clamp (util.misc.inverse_sigmoid)


def anchor_sine_embedding(boxes: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of boxes, coordinates in DINO's order (y, x, w, h).

    Args:
        boxes: (batch_size, num_queries, 4) normalised (cx, cy, w, h).
        num_pos_feats: features per coordinate (DINO: 128, half of its hidden size).

    Returns:
        (batch_size, num_queries, 4 * num_pos_feats): per coordinate ``sin`` of the even and ``cos`` of the
        odd frequencies interleaved, frequencies ``temperature ** (2 * (i // 2) / num_pos_feats)``.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    position = boxes.float()[..., None] * (2 * math.pi) / dim_t  # (B, Q, 4, F)
    # interleave sin and cos: (B, Q, 4, F/2, 2) -> (B, Q, 4, F)
    embedding = torch.stack((position[..., 0::2].sin(), position[..., 1::2].cos()), dim=-1).flatten(-2)
    return embedding[:, :, [1, 0, 2, 3]].flatten(2)  # (y, x, w, h): (B, Q, 4, F) -> (B, Q, 4F)


def refine(box_delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``sigmoid(box_delta + inverse_sigmoid(reference))`` with DINO's clamp; both (..., 4)."""
    return (box_delta + inverse_sigmoid(reference, eps=DINO_EPS)).sigmoid()


class DinoDecoder(DeformableDecoder):
    """``config.dec_layers`` Deformable DETR decoder layers with DINO's anchor-derived query positions
    (``ref_point_head``) and output norm (``norm``); the same interface as ``DeformableDecoder``.

    Look-forward-twice (``config.look_forward_twice``, DINO's): the box layer ``l`` predicts is refined
    from layer ``l - 1``'s refined anchor with its gradient; without it from the detached anchor (the
    forward values are the same).
    """

    def __init__(self, config: DeformableDETRConfig) -> None:
        super().__init__(config)  # the layer stack, checkpointing and look-forward-twice of the base decoder
        from ddetr.models.deformable_detr import MLP  # the detector's MLP (its module imports this one)

        hidden_dim = config.hidden_dim
        self.hidden_dim = hidden_dim
        self.ref_point_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(
        self,
        queries: DecoderQueries,
        memory: torch.Tensor,
        levels: FlatLevels,
        box_heads: Sequence[nn.Module] | None = None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Decodes the queries; ``queries.position`` is not used (positions come from the anchors).

        Args:
            queries: content (B, Q, D) and 4-d anchors ``reference_points`` (B, Q, 4) in [0, 1], detached.
            memory: (batch_size, num_values, hidden_dim) encoder output.
            levels: the levels of ``memory``.
            box_heads: one box head per layer (required: DINO always refines its anchors).
            self_attn_mask: (Q, Q) bool, True where a query may not attend to another, or None.

        Returns:
            hidden_states: num_layers tensors (B, Q, D), every layer's output after ``norm``.
            references: num_layers tensors (B, Q, 4), the anchor each layer attended around.
            boxes: num_layers tensors (B, Q, 4), every layer's predicted boxes:
                ``refine(box_head(hidden_state), anchor)`` (the anchor with its gradient under
                look-forward-twice); the next anchor is ``refine(box_head(output before norm), anchor)``.
        """
        if box_heads is None or len(box_heads) != self.num_layers:
            raise ValueError(f"DINO's decoder needs one box head per layer ({self.num_layers})")
        output, _, reference = queries
        if reference.shape[-1] != 4:
            raise ValueError(f"DINO's decoder refines 4-d anchors, got references of {reference.shape[-1]}")
        ratios = levels.valid_ratios
        box_scale = torch.cat([ratios, ratios], -1)  # (B, L, 4): (x, y, w, h) scale like (x, y, x, y)
        hidden_states, references, boxes = [], [], []
        anchor = reference  # the current anchor with its gradient (look-forward-twice refines from it)
        for index, layer in enumerate(self.layers):
            reference_input = reference[:, :, None] * box_scale[:, None]  # (B, Q, L, 4)
            sine = anchor_sine_embedding(reference_input[:, :, 0], self.hidden_dim // 2)  # (B, Q, 2D)
            query_pos = self.ref_point_head(sine.to(output.dtype))  # (B, Q, D)
            output = _run_layer(
                layer, self.checkpointing, output, query_pos, reference_input, memory, levels, self_attn_mask
            )
            hidden = self.norm(output)
            box_head = box_heads[index]
            boxes.append(refine(box_head(hidden), anchor if self.look_forward_twice else reference))
            hidden_states.append(hidden)
            references.append(reference)
            if index + 1 < self.num_layers:
                anchor = refine(box_head(output), reference)
                reference = anchor.detach()
        return hidden_states, references, boxes
