"""DINO's transformer: Deformable DETR's encoder and two-stage proposals, DINO's query selection and decoder.

``DinoTransformer`` is ``DeformableTransformer`` (``config.variant == "dino"``) with:

- ``DinoDecoder`` (``ddetr.models.dino_decoder``) instead of the official decoder, and no ``pos_trans``:
  the decoder derives every query's position from its anchor;
- mixed query selection as DINO's: the proposals ranked by their best class logit (the official ranks by
  the first class, its class-agnostic objectness), the top boxes the anchors (detached), the contents the
  learned ``tgt_embed``;
- the selected proposals' logits and boxes (with their gradient) as the encoder's outputs, which the
  detector returns as ``interm_outputs`` (matched to the real labels, DINO's encoder loss) in place of the
  official ``enc_outputs`` over every proposal.

Shapes use ``batch_size`` (B), ``num_values`` (S), ``num_queries`` (Q) and ``hidden_dim`` (D).
"""

from __future__ import annotations

import torch
from torch import nn

from ddetr.models.config import DeformableDETRConfig
from ddetr.models.deformable_transformer import DecoderQueries, DeformableTransformer, FlatLevels
from ddetr.models.denoising import DenoisingQueries
from ddetr.models.dino_decoder import DINO_EPS, DinoDecoder


class DinoTransformer(DeformableTransformer):
    """``DeformableTransformer`` with DINO's decoder and query selection (module docstring); needs
    ``config.two_stage`` and ``config.query_selection == "mixed"`` (``DeformableDETRConfig`` checks)."""

    def __init__(self, config: DeformableDETRConfig) -> None:
        super().__init__(config)
        self.decoder = DinoDecoder(config)
        del self.pos_trans, self.pos_trans_norm  # DINO's queries take no position from their proposal

    def proposal_queries(
        self,
        memory: torch.Tensor,
        levels: FlatLevels,
        proposal_heads: tuple[nn.Module, nn.Module],
        num_selected: int | None = None,
    ) -> tuple[DecoderQueries, torch.Tensor, torch.Tensor]:
        """Every memory position proposes a box; the ``num_selected`` (default ``num_queries``) with the best
        class logit give the anchors, ``tgt_embed`` the contents.

        Returns:
            queries: contents (B, num_selected, D), an empty position (B, num_selected, 0) and the anchors
                (B, num_selected, 4), detached.
            logits: (B, num_queries, num_classes) the class logits of the first ``num_queries`` selected.
            boxes: (B, num_queries, 4) their boxes, normalised cxcywh, with their gradient.
        """
        num_selected = self.num_queries if num_selected is None else num_selected
        enc_logits, enc_box_logits = self.scored_proposals(memory, levels, proposal_heads, num_selected)
        top = torch.topk(enc_logits.max(-1)[0], num_selected, dim=1)[1]  # (B, num_selected)
        top_box_logits = torch.gather(enc_box_logits, 1, top.unsqueeze(-1).expand(-1, -1, 4))  # (B, num_selected, 4)
        top_logits = torch.gather(enc_logits, 1, top.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
        content = self.content_queries(num_selected, memory.shape[0]).to(memory.dtype)  # (B, num_selected, D)
        queries = DecoderQueries(content, content.new_zeros(*content.shape[:2], 0), top_box_logits.detach().sigmoid())
        top_boxes = top_box_logits[:, : self.num_queries].sigmoid()  # (B, Q, 4)
        return queries, top_logits[:, : self.num_queries], top_boxes

    def with_denoising(self, queries: DecoderQueries, denoising: DenoisingQueries) -> DecoderQueries:
        """``queries`` with the denoising queries before them; their anchors are the noised boxes, clamped
        as DINO's passage through ``inverse_sigmoid`` clamps them."""
        content = torch.cat([denoising.content.to(queries.content.dtype), queries.content], 1)  # (B, N + Q, D)
        anchors = denoising.boxes.to(queries.reference_points.dtype).clamp(DINO_EPS, 1 - DINO_EPS)  # (B, N, 4)
        return DecoderQueries(
            content,
            content.new_zeros(*content.shape[:2], 0),  # (B, N + Q, 0): positions come from the anchors
            torch.cat([anchors, queries.reference_points], 1),  # (B, N + Q, 4)
        )
