"""Contrastive denoising (DINO, Zhang et al. 2022): noised ground truth as extra decoder queries in training.

Every ground-truth box of an image enters each of ``num_groups`` groups twice: as a *positive* query (its
box moved a little, to be reconstructed) and as a *negative* query (moved further, to be classified as no
object). A query's content is the label book's embedding of its (possibly flipped) label, its reference the
noised box. The groups sit before the matching queries in the decoder; a self-attention mask keeps the
matching queries from seeing any denoising query and every group from seeing the others, so the matching
queries' outputs are those of a model without denoising.

Layout of the ``num_denoising = num_groups * 2 * group_size`` queries (``group_size``: the most boxes of an
image in the batch): group ``g`` holds the positive query of box ``j`` of an image at
``g * 2 * group_size + j`` and its negative at ``g * 2 * group_size + group_size + j``; the slots of an image
with fewer boxes are padding (zero content, a centred box, no loss).

Shapes use ``batch_size`` (B), ``num_denoising`` (N) and ``hidden_dim`` (D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ddetr.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ddetr.models.config import DenoisingConfig

Targets = list[dict[str, torch.Tensor]]


@dataclass
class DenoisingQueries:
    """The denoising queries of one batch and the bookkeeping the loss needs.

    Attributes:
        content: (batch_size, num_denoising, hidden_dim) label embeddings (zeros on padding).
        boxes: (batch_size, num_denoising, 4) noised boxes, normalised cxcywh in [0, 1].
        num_groups: the groups of positive and negative queries.
        group_size: slots per half group: the most boxes of an image in the batch.
        positive_image, positive_query, positive_target: (num_positives,) int64 on the device: for every
            positive query, its image, its index among the denoising queries and the index of its box in
            the image's targets (every group's positives one group after another).
    """

    content: torch.Tensor
    boxes: torch.Tensor
    num_groups: int
    group_size: int
    positive_image: torch.Tensor
    positive_query: torch.Tensor
    positive_target: torch.Tensor

    @property
    def num_queries(self) -> int:
        return self.num_groups * 2 * self.group_size


def num_groups(num_queries: int, group_size: int) -> int:
    """DINO's group count: ``num_queries`` (its ``dn_number``) positive queries over the most boxes of an
    image, at least one group."""
    return max(1, num_queries // group_size) if group_size else 1


def noised_labels(labels: torch.Tensor, num_classes: int, ratio: float) -> torch.Tensor:
    """``labels`` with each replaced, with probability ``ratio / 2``, by a uniformly drawn class (which may
    be the same one)."""
    flip = torch.rand(labels.shape, device=labels.device) < ratio * 0.5
    random_labels = torch.randint_like(labels, 0, num_classes)
    return torch.where(flip, random_labels, labels)


def noised_boxes(boxes: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """Every corner of each box moved by ``sign * magnitude * scale`` times half the box's size in that
    direction, the magnitude uniform in [0, 1) for a positive and [1, 2) for a ``negative``, the result
    clipped to the image.

    Args:
        boxes: (num_boxes, 4) normalised cxcywh.
        negative: (num_boxes,) bool.
        scale: the box noise scale (0: no noise).

    Returns:
        (num_boxes, 4) normalised cxcywh.
    """
    if scale <= 0:
        return boxes
    corners = box_cxcywh_to_xyxy(boxes)  # (M, 4)
    half_size = boxes[:, 2:].repeat(1, 2) / 2  # (M, 4): (w/2, h/2, w/2, h/2)
    sign = torch.randint(0, 2, boxes.shape, device=boxes.device).to(boxes.dtype) * 2 - 1
    magnitude = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)  # (M, 4)
    corners = (corners + sign * magnitude * half_size * scale).clamp(0, 1)
    return box_xyxy_to_cxcywh(corners)


class ContrastiveDenoising(nn.Module):
    """Builds the denoising queries of a batch from its targets; owns the label book ``label_embed``
    (num_classes, hidden_dim), which only these queries use (it is absent from inference and export)."""

    def __init__(self, num_classes: int, hidden_dim: int, config: DenoisingConfig) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.config = config
        self.label_embed = nn.Embedding(num_classes, hidden_dim)

    def forward(self, targets: Targets) -> DenoisingQueries | None:
        """The denoising queries for ``targets`` (one dict per image with ``labels`` (num_boxes,) int64 and
        ``boxes`` (num_boxes, 4) normalised cxcywh), or None when no image of the batch has a box."""
        sizes = [len(target["labels"]) for target in targets]
        group_size = max(sizes, default=0)
        if group_size == 0:
            return None
        groups = num_groups(self.config.num_queries, group_size)
        device = self.label_embed.weight.device
        labels = torch.cat([target["labels"] for target in targets]).to(device)  # (M,)
        boxes = torch.cat([target["boxes"] for target in targets]).to(device, torch.float32)  # (M, 4)
        image = torch.cat([torch.full((size,), index, dtype=torch.long) for index, size in enumerate(sizes)])
        within = torch.cat([torch.arange(size) for size in sizes])  # (M,) index of each box in its image
        # every box once per group and half: (groups, 2, M), negatives in the second half
        group = torch.arange(groups)[:, None, None].expand(groups, 2, len(labels))
        half = torch.arange(2)[None, :, None].expand(groups, 2, len(labels))
        slot = (group * 2 + half) * group_size + within  # (G, 2, M) query index in the image's row
        image_all = image.expand(groups, 2, -1).reshape(-1).to(device)  # (G * 2 * M,)
        slot_all = slot.reshape(-1).to(device)  # (G * 2 * M,)
        negative = (half.reshape(-1) == 1).to(device)  # (G * 2 * M,)

        repeated_labels = labels.repeat(groups * 2)  # (G * 2 * M,) in the (G, 2, M) order
        repeated_boxes = boxes.repeat(groups * 2, 1)  # (G * 2 * M, 4)
        query_labels = noised_labels(repeated_labels, self.num_classes, self.config.label_noise_ratio)
        query_boxes = noised_boxes(repeated_boxes, negative, self.config.box_noise_scale)

        batch_size, num_denoising = len(targets), groups * 2 * group_size
        weight = self.label_embed.weight
        content = weight.new_zeros(batch_size, num_denoising, weight.shape[1])  # (B, N, D)
        content[image_all, slot_all] = self.label_embed(query_labels).to(content.dtype)
        query_boxes_padded = boxes.new_full((batch_size, num_denoising, 4), 0.5)  # (B, N, 4) centred padding
        query_boxes_padded[image_all, slot_all] = query_boxes
        positive = ~negative
        return DenoisingQueries(
            content=content,
            boxes=query_boxes_padded,
            num_groups=groups,
            group_size=group_size,
            positive_image=image_all[positive],
            positive_query=slot_all[positive],
            positive_target=within.repeat(groups * 2).to(device)[positive],
        )


def self_attention_mask(
    num_denoising: int, num_groups: int, num_queries: int, num_one2many: int, device: torch.device
) -> torch.Tensor | None:
    """The decoder's self-attention mask over [denoising | matching (num_queries) | one-to-many] queries,
    True where a row may not attend to a column; None when there are only matching queries.

    Matching queries see only matching queries; one-to-many queries only one-to-many ones; a denoising
    group sees itself and the matching queries (DINO), not the other groups nor the one-to-many queries.
    """
    if num_denoising == 0 and num_one2many == 0:
        return None
    total = num_denoising + num_queries + num_one2many
    kind = torch.zeros(total, dtype=torch.long, device=device)  # 0 denoising, 1 matching, 2 one-to-many
    kind[num_denoising : num_denoising + num_queries] = 1
    kind[num_denoising + num_queries :] = 2
    group = torch.full((total,), -1, dtype=torch.long, device=device)
    if num_denoising:
        group[:num_denoising] = torch.arange(num_denoising, device=device) // (num_denoising // num_groups)
    blocked = kind[:, None] != kind[None, :]  # (T, T) each set alone ...
    denoising_row = kind[:, None] == 0
    blocked &= ~(denoising_row & (kind[None, :] == 1))  # ... but denoising queries see the matching ones
    blocked |= denoising_row & (kind[None, :] == 0) & (group[:, None] != group[None, :])  # and their own group
    return blocked
