"""The deformable transformer: encoder over the flattened levels, two-stage proposals, decoder.

Shapes use ``batch_size`` (B), ``num_values`` (S, all levels flattened), ``num_queries`` (Q),
``num_levels`` (L) and ``hidden_dim`` (D).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from ddetr.models.config import CHECKPOINTING, DeformableDETRConfig, LayerConfig
from ddetr.models.denoising import DenoisingQueries, self_attention_mask
from ddetr.models.dropout import Dropout, MultiheadAttention
from ddetr.models.geometry import (
    boxes_from_reference,
    encoder_output_proposals,
    encoder_reference_points,
    inverse_sigmoid,
    proposal_position_embedding,
    valid_ratios,
)
from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.models.relu_dropout import relu_dropout

__all__ = [
    "CHECKPOINTING",
    "DecoderQueries",
    "DeformableDecoder",
    "DeformableEncoder",
    "DeformableTransformer",
    "FlatLevels",
]


class FlatLevels(NamedTuple):
    """The feature levels flattened one after another into ``num_values``: what every layer needs of them.

    Attributes:
        spatial_shapes: (num_levels, 2) int64 (height, width) of every level, on the device.
        level_start_index: (num_levels,) int64, where every level starts in ``num_values``, on the device.
        shapes: the (height, width) of every level as Python ints (SymInts under ``torch.compile``).
        valid_ratios: (batch_size, num_levels, 2) the unpadded fraction (x, y) of every level.
        padding_mask: (batch_size, num_values) bool, True on padding.
    """

    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    shapes: Sequence[tuple[int, int]]
    valid_ratios: torch.Tensor
    padding_mask: torch.Tensor


class DecoderQueries(NamedTuple):
    """The decoder's input queries (learned, or the top two-stage proposals).

    Attributes:
        content: (batch_size, num_queries, hidden_dim) initial query content (``tgt``).
        position: (batch_size, num_queries, hidden_dim) query position embedding.
        reference_points: (batch_size, num_queries, 2 or 4) initial references in [0, 1].
    """

    content: torch.Tensor
    position: torch.Tensor
    reference_points: torch.Tensor


def _run_layer(layer: nn.Module, checkpointed: bool, *args: object) -> torch.Tensor:
    """``layer(*args)``; with ``checkpointed`` (and autograd on) its activations are not kept but recomputed
    in the backward pass (the random state is replayed, so dropout and gradients are unchanged)."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def _deformable_attention(config: LayerConfig) -> MSDeformAttn:
    return MSDeformAttn(
        config.hidden_dim, config.num_levels, config.num_heads, config.num_points, backend=config.attn_backend
    )


def _attend(
    attention: MSDeformAttn,
    levels: FlatLevels,
    value: torch.Tensor,
    query: torch.Tensor,
    reference_points: torch.Tensor,
) -> torch.Tensor:
    """``attention`` to ``value`` (B, S, D), the flattened levels of ``levels``, from ``query`` (B, Q, D)
    around ``reference_points`` (B, Q, L, 2 or 4). Returns (B, Q, D)."""
    return attention(
        query,
        reference_points,
        value,
        levels.spatial_shapes,
        levels.level_start_index,
        levels.padding_mask,
        shapes=levels.shapes,
    )


def _feed_forward(config: LayerConfig) -> tuple[nn.Module, ...]:
    """(linear1, dropout, linear2, dropout, norm) of a layer's ReLU FFN; the caller xavier-initialises."""
    linear1 = nn.Linear(config.hidden_dim, config.dim_feedforward)
    linear2 = nn.Linear(config.dim_feedforward, config.hidden_dim)
    return linear1, Dropout(config.dropout), linear2, Dropout(config.dropout), nn.LayerNorm(config.hidden_dim)


def _feed_forward_residual(layer: nn.Module, x: torch.Tensor, inner: nn.Module, outer: nn.Module) -> torch.Tensor:
    """``ffn_norm(x + outer(linear2(inner(relu(linear1(x))))))`` with the layer's FFN parts (the ReLU and
    the inner dropout as one ``relu_dropout``, which keeps only its output for backward)."""
    hidden = layer.linear2(relu_dropout(layer.linear1(x), inner.p, inner.training))
    return layer.ffn_norm(x + outer(hidden))


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention (query = src + pos), then a ReLU FFN."""

    def __init__(self, config: LayerConfig) -> None:
        super().__init__()
        self.self_attn = _deformable_attention(config)
        self.dropout1 = Dropout(config.dropout)
        self.self_attn_norm = nn.LayerNorm(config.hidden_dim)
        self.linear1, self.dropout2, self.linear2, self.dropout3, self.ffn_norm = _feed_forward(config)
        for weight in (self.linear1.weight, self.linear2.weight):
            nn.init.xavier_uniform_(weight)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor, levels: FlatLevels
    ) -> torch.Tensor:
        """src, pos: (B, S, D); reference_points: (B, S, L, 2); levels: those of ``src``. Returns (B, S, D)."""
        attended = _attend(self.self_attn, levels, src, src + pos, reference_points)
        src = self.self_attn_norm(src + self.dropout1(attended))
        return _feed_forward_residual(self, src, self.dropout2, self.dropout3)


class DeformableEncoder(nn.Module):
    """A stack of ``config.enc_layers`` deformable encoder layers (``enc_n_points`` points each); with
    ``config.checkpointing`` ``encoder`` or ``all`` each layer is recomputed in backward."""

    def __init__(self, config: DeformableDETRConfig) -> None:
        super().__init__()
        layer = config.layer(config.enc_n_points)
        self.hidden_dim = config.hidden_dim
        self.layers = nn.ModuleList([DeformableEncoderLayer(layer) for _ in range(config.enc_layers)])
        # recompute each layer in backward instead of keeping its activations
        self.checkpointing = config.checkpointing in ("encoder", "all")

    def forward(self, src: torch.Tensor, pos: torch.Tensor, levels: FlatLevels) -> torch.Tensor:
        """Encodes the flattened levels.

        Args:
            src: (batch_size, num_values, hidden_dim) projected features, levels one after another.
            pos: (batch_size, num_values, hidden_dim) position + level embeddings.
            levels: the levels of ``src``.

        Returns:
            memory: (batch_size, num_values, hidden_dim).
        """
        reference_points = encoder_reference_points(levels.shapes, levels.valid_ratios)  # (B, S, L, 2)
        output = src
        for layer in self.layers:
            output = _run_layer(layer, self.checkpointing, output, pos, reference_points, levels)
        return output


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: multi-head self-attention among the queries, deformable cross-attention to the
    encoder memory around the reference points, ReLU FFN."""

    def __init__(self, config: LayerConfig) -> None:
        super().__init__()
        hidden_dim = config.hidden_dim
        self.self_attn = MultiheadAttention(hidden_dim, config.num_heads, dropout=config.dropout, batch_first=True)
        self.dropout1 = Dropout(config.dropout)
        self.self_attn_norm = nn.LayerNorm(hidden_dim)
        self.cross_attn = _deformable_attention(config)
        self.dropout2 = Dropout(config.dropout)
        self.cross_attn_norm = nn.LayerNorm(hidden_dim)
        self.linear1, self.dropout3, self.linear2, self.dropout4, self.ffn_norm = _feed_forward(config)
        attn = self.self_attn
        for weight in (attn.in_proj_weight, attn.out_proj.weight, self.linear1.weight, self.linear2.weight):
            nn.init.xavier_uniform_(weight)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        levels: FlatLevels,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tgt, query_pos: (B, Q, D); reference_points: (B, Q, L, 2 or 4) scaled by the valid ratios;
        memory: (B, S, D); levels: those of ``memory``; self_attn_mask: (Q, Q) bool, True where a query may
        not attend to another, or None. Returns (B, Q, D)."""
        query = tgt + query_pos
        attended = self.self_attn(query, query, tgt, need_weights=False, attn_mask=self_attn_mask)[0]
        tgt = self.self_attn_norm(tgt + self.dropout1(attended))
        attended = _attend(self.cross_attn, levels, memory, tgt + query_pos, reference_points)
        tgt = self.cross_attn_norm(tgt + self.dropout2(attended))
        return _feed_forward_residual(self, tgt, self.dropout3, self.dropout4)


class DeformableDecoder(nn.Module):
    """A stack of ``config.dec_layers`` decoder layers (``dec_n_points`` points each), optionally refining
    the references after every layer; with ``config.checkpointing == "all"`` each layer is recomputed in
    backward. With ``config.look_forward_twice`` (DINO) layer ``l``'s box is refined from layer ``l - 1``'s
    box as predicted, gradient included, instead of from its detached copy; the forward values are the same."""

    def __init__(self, config: DeformableDETRConfig) -> None:
        super().__init__()
        layer = config.layer(config.dec_n_points)
        self.num_layers = config.dec_layers
        self.layers = nn.ModuleList([DeformableDecoderLayer(layer) for _ in range(config.dec_layers)])
        # recompute each layer in backward instead of keeping its activations
        self.checkpointing = config.checkpointing == "all"
        self.look_forward_twice = config.look_forward_twice

    def forward(
        self,
        queries: DecoderQueries,
        memory: torch.Tensor,
        levels: FlatLevels,
        box_heads: Sequence[nn.Module] | None = None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Decodes the queries.

        Args:
            queries: the initial queries and their references.
            memory: (batch_size, num_values, hidden_dim) encoder output.
            levels: the levels of ``memory``.
            box_heads: one box head per layer for iterative refinement: after layer ``l`` the
                reference becomes ``boxes_from_reference(box_heads[l](hidden), reference)``, detached
                (2-d references become boxes after the first layer). None keeps the references fixed.
            self_attn_mask: (num_queries, num_queries) bool, True where a query may not attend to another
                (denoising and one-to-many queries beside the matching ones), or None.

        Returns:
            hidden_states: num_layers tensors (batch_size, num_queries, hidden_dim), one per layer.
            references: num_layers tensors (batch_size, num_queries, 2 or 4), the reference each layer
                used (in [0, 1], not scaled by the valid ratios).
            boxes: with ``box_heads``, num_layers tensors (batch_size, num_queries, 4), every layer's
                refined boxes (the next layer's reference, not detached: they are the layer's predicted
                boxes, so the detector does not run the box heads a second time); else an empty list. With
                look-forward-twice, layer ``l``'s box is refined from ``boxes[l - 1]`` itself.
        """
        if box_heads is not None and len(box_heads) != self.num_layers:
            raise ValueError(f"need one box head per decoder layer ({self.num_layers}), got {len(box_heads)}")
        output, query_pos, reference_points = queries
        ratios = levels.valid_ratios
        hidden_states, references, boxes = [], [], []
        box_scale = torch.cat([ratios, ratios], -1)  # (B, L, 4): (x, y, w, h) scale like (x, y, x, y)
        reference_input = None  # fixed references (no box heads) are scaled once
        previous_boxes = reference_points  # what look-forward-twice refines: the previous box with its gradient
        for index, layer in enumerate(self.layers):
            if reference_input is None or box_heads is not None:
                scale = box_scale if reference_points.shape[-1] == 4 else ratios  # (B, L, 4 or 2)
                reference_input = reference_points[:, :, None] * scale[:, None]  # (B, Q, L, 2 or 4)
            output = _run_layer(
                layer, self.checkpointing, output, query_pos, reference_input, memory, levels, self_attn_mask
            )
            hidden_states.append(output)
            references.append(reference_points)
            if box_heads is not None:
                refined = previous_boxes if self.look_forward_twice else reference_points
                boxes.append(boxes_from_reference(box_heads[index](output), refined))
                previous_boxes = boxes[-1]
                reference_points = boxes[-1].detach()
        return hidden_states, references, boxes


class DeformableTransformer(nn.Module):
    """Flattens the levels, encodes them, builds the queries (learned or two-stage), decodes.

    Owns the learned ``level_embed`` and, without two-stage, the ``reference_points`` projection of the
    query position embedding; with two-stage ``enc_output`` + ``enc_output_norm`` (memory to proposal
    features) and ``pos_trans`` + ``pos_trans_norm`` (proposal embedding to queries), and with mixed query
    selection the learned content queries ``tgt_embed`` (+ ``tgt_embed_one2many`` for the hybrid branch).
    Built from the whole ``config`` (levels, two-stage and queries read there, once).

    In training, denoising queries (given) come before the matching queries and the hybrid branch's
    one-to-many queries after them (two-stage: more proposals selected; learned queries: the rows of
    ``query_embed`` beyond ``num_queries``), all decoded at once under ``self_attention_mask``.
    """

    def __init__(self, config: DeformableDETRConfig) -> None:
        super().__init__()
        hidden_dim = config.hidden_dim
        self.hidden_dim = hidden_dim
        self.encoder = DeformableEncoder(config)
        self.decoder = DeformableDecoder(config)
        self.two_stage = config.two_stage
        self.num_queries = config.num_queries
        self.num_one2many = config.num_one2many_queries  # hybrid matching's extra queries (training only)
        self.mixed_selection = config.query_selection == "mixed"
        if self.mixed_selection:
            self.tgt_embed = nn.Embedding(config.num_queries, hidden_dim)
            if self.num_one2many:
                self.tgt_embed_one2many = nn.Embedding(self.num_one2many, hidden_dim)
        self.level_embed = nn.Parameter(torch.empty(config.num_feature_levels, hidden_dim))
        nn.init.normal_(self.level_embed)
        if self.two_stage:
            self.enc_output = nn.Linear(hidden_dim, hidden_dim)
            self.enc_output_norm = nn.LayerNorm(hidden_dim)
            self.pos_trans = nn.Linear(hidden_dim * 2, hidden_dim * 2)
            self.pos_trans_norm = nn.LayerNorm(hidden_dim * 2)
            nn.init.xavier_uniform_(self.enc_output.weight)
            nn.init.xavier_uniform_(self.pos_trans.weight)
        else:
            self.reference_points = nn.Linear(hidden_dim, 2)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)

    def forward(
        self,
        srcs: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        pos_embeds: Sequence[torch.Tensor],
        query_embed: torch.Tensor | None = None,
        box_heads: Sequence[nn.Module] | None = None,
        proposal_heads: tuple[nn.Module, nn.Module] | None = None,
        denoising: DenoisingQueries | None = None,
    ) -> dict[str, object]:
        """Runs encoder and decoder.

        Args:
            srcs: per level (batch_size, hidden_dim, height_l, width_l) projected features.
            masks: per level (batch_size, height_l, width_l) bool, True on padding.
            pos_embeds: per level (batch_size, hidden_dim, height_l, width_l).
            query_embed: (num_queries [+ num_one2many], 2 * hidden_dim) learned queries (position | content),
                required without two-stage; rows beyond ``num_queries`` are the hybrid branch's.
            box_heads: per decoder layer box heads for iterative refinement, or None.
            proposal_heads: (class_head, box_head) scoring the encoder proposals, required with two-stage.
            denoising: denoising queries to decode before the matching ones (training), or None.

        Returns:
            dict with ``hidden_states`` (list of dec_layers tensors (batch_size, num_decoded, hidden_dim),
            ``num_decoded`` = denoising + matching + one-to-many queries, in that order),
            ``references`` (list of dec_layers tensors (batch_size, num_queries, 2 or 4), the reference of
            each layer in [0, 1]), with ``box_heads`` ``boxes`` (list of dec_layers tensors
            (batch_size, num_queries, 4), each layer's refined boxes) and, with two-stage,
            ``enc_logits`` (batch_size, num_values, num_classes) and ``enc_boxes``
            (batch_size, num_values, 4) for every proposal.
        """
        src_flatten, pos_flatten, levels = self.flatten_levels(srcs, masks, pos_embeds)
        memory = self.encoder(src_flatten, pos_flatten, levels)
        outputs: dict[str, object] = {}
        if self.two_stage:
            if proposal_heads is None:
                raise ValueError("two-stage needs proposal_heads (class_head, box_head)")
            # the hybrid branch's proposals, as many as the maps hold beyond the matching queries'
            num_one2many = min(self.num_one2many, max(memory.shape[1] - self.num_queries, 0)) if self.training else 0
            num_selected = self.num_queries + num_one2many
            queries, outputs["enc_logits"], outputs["enc_boxes"] = self.proposal_queries(
                memory, levels, proposal_heads, num_selected
            )
        else:
            if query_embed is None:
                raise ValueError("query_embed is required without two-stage")
            queries = self.learned_queries(query_embed, memory.shape[0])
        num_one2many = queries.content.shape[1] - self.num_queries
        self_attn_mask = None
        if denoising is not None or num_one2many:
            num_denoising = 0 if denoising is None else denoising.num_queries
            groups = 1 if denoising is None else denoising.num_groups
            self_attn_mask = self_attention_mask(num_denoising, groups, self.num_queries, num_one2many, memory.device)
        if denoising is not None:
            queries = self.with_denoising(queries, denoising)
        hidden_states, references, boxes = self.decoder(queries, memory, levels, box_heads, self_attn_mask)
        outputs["hidden_states"] = hidden_states
        outputs["references"] = references
        if box_heads is not None:
            outputs["boxes"] = boxes
        return outputs

    def flatten_levels(
        self, srcs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, FlatLevels]:
        """The levels one after another: src (batch_size, num_values, hidden_dim), position + level embedding
        (batch_size, num_values, hidden_dim) and their ``FlatLevels``."""
        src_flatten, mask_flatten, pos_flatten, shapes = [], [], [], []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds, strict=True)):
            height, width = src.shape[-2:]
            shapes.append((int(height), int(width)) if not torch.compiler.is_compiling() else (height, width))
            src_flatten.append(src.flatten(2).transpose(1, 2))  # (B, D, H, W) -> (B, H*W, D)
            mask_flatten.append(mask.flatten(1))  # (B, H, W) -> (B, H*W)
            pos = pos.flatten(2).transpose(1, 2)  # (B, D, H, W) -> (B, H*W, D)
            pos_flatten.append(pos + self.level_embed[level].view(1, 1, -1))  # (D,) -> (1, 1, D)
        if len(shapes) != self.level_embed.shape[0]:
            raise ValueError(f"got {len(shapes)} feature levels, the transformer has {self.level_embed.shape[0]}")
        src_flatten = torch.cat(src_flatten, 1)  # (B, S, D)
        pos_flatten = torch.cat(pos_flatten, 1)  # (B, S, D)
        # The op takes `shapes` as ints (SymInts under torch.compile, so image sizes need no recompile);
        # the (L, 2) / (L,) tensors (offset normalisers, hooks) live on the device: no host tensor in the
        # graph, and in eager one small asynchronous copy per forward
        starts = [0]
        for height, width in shapes[:-1]:
            starts.append(starts[-1] + height * width)
        rows = [(height, width, start) for (height, width), start in zip(shapes, starts)]
        device = src_flatten.device
        if torch.compiler.is_compiling():
            level_table = torch.tensor(rows, dtype=torch.long, device=device)  # (L, 3)
        else:
            level_table = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)  # (L, 3)
        levels = FlatLevels(
            spatial_shapes=level_table[:, :2],  # (L, 2)
            level_start_index=level_table[:, 2],  # (L,)
            shapes=shapes,
            valid_ratios=torch.stack([valid_ratios(mask) for mask in masks], 1),  # (B, L, 2)
            padding_mask=torch.cat(mask_flatten, 1),  # (B, S)
        )
        return src_flatten, pos_flatten, levels

    def proposal_queries(
        self,
        memory: torch.Tensor,
        levels: FlatLevels,
        proposal_heads: tuple[nn.Module, nn.Module],
        num_selected: int | None = None,
    ) -> tuple[DecoderQueries, torch.Tensor, torch.Tensor]:
        """Two-stage: every memory position proposes a box; the ``num_selected`` best (default
        ``num_queries``) become the queries: their boxes the references, their box embeddings through
        ``pos_trans`` the positions and (pure selection) the contents; mixed selection takes learned contents.

        Returns:
            queries: from the top proposals (references: their boxes, detached).
            enc_logits: (batch_size, num_values, num_classes) the proposals' class logits.
            enc_boxes: (batch_size, num_values, 4) the proposals' boxes, normalised cxcywh.
        """
        num_selected = self.num_queries if num_selected is None else num_selected
        enc_logits, enc_box_logits = self.scored_proposals(memory, levels, proposal_heads, num_selected)
        top = torch.topk(enc_logits[..., 0], num_selected, dim=1)[1]  # (B, Q)
        top_box_logits = torch.gather(enc_box_logits, 1, top.unsqueeze(-1).repeat(1, 1, 4)).detach()  # (B, Q, 4)
        reference_points = top_box_logits.sigmoid()
        query_pos, tgt = self.box_queries(top_box_logits, memory.dtype)
        if self.mixed_selection:
            tgt = self.content_queries(num_selected, memory.shape[0]).to(query_pos.dtype)
        return DecoderQueries(tgt, query_pos, reference_points), enc_logits, enc_box_logits.sigmoid()

    def scored_proposals(
        self,
        memory: torch.Tensor,
        levels: FlatLevels,
        proposal_heads: tuple[nn.Module, nn.Module],
        num_selected: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-stage: every memory position's proposal, scored: class logits (batch_size, num_values,
        num_classes) and box logits (batch_size, num_values, 4), before the sigmoid. Raises ``ValueError``
        when the maps hold fewer than ``num_selected`` positions."""
        if memory.shape[1] < num_selected:
            raise ValueError(
                f"two-stage selects {num_selected} proposals but the feature maps hold only {memory.shape[1]}"
            )
        class_head, box_head = proposal_heads
        proposal_memory, proposals = encoder_output_proposals(memory, levels.padding_mask, levels.shapes)
        proposal_memory = self.enc_output_norm(self.enc_output(proposal_memory))
        return class_head(proposal_memory), box_head(proposal_memory) + proposals  # (B, S, C), (B, S, 4)

    def box_queries(self, box_logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-stage: (position, content) queries (batch_size, num_boxes, hidden_dim) each from box logits
        (batch_size, num_boxes, 4): the boxes' sine embedding through ``pos_trans`` and ``pos_trans_norm``."""
        embedding = proposal_position_embedding(box_logits, self.hidden_dim // 2).to(dtype)  # (B, Q, 2D)
        query = self.pos_trans_norm(self.pos_trans(embedding))
        query_pos, tgt = torch.split(query, self.hidden_dim, dim=2)  # (B, Q, D) each
        return query_pos, tgt

    def content_queries(self, num_selected: int, batch_size: int) -> torch.Tensor:
        """Mixed selection: the learned contents (batch_size, num_selected, hidden_dim), the matching
        queries' ``tgt_embed`` then, past ``num_queries``, the hybrid branch's ``tgt_embed_one2many``."""
        content = self.tgt_embed.weight  # (Q, D)
        if num_selected > self.num_queries:
            content = torch.cat([content, self.tgt_embed_one2many.weight], 0)  # (Q + Q_one2many, D)
        return content.unsqueeze(0).expand(batch_size, -1, -1)  # (B, Q, D)

    def with_denoising(self, queries: DecoderQueries, denoising: DenoisingQueries) -> DecoderQueries:
        """``queries`` with the denoising queries before them; a denoising query's position comes from its
        noised box as a proposal's does (``box_queries``)."""
        position, _ = self.box_queries(inverse_sigmoid(denoising.boxes), queries.position.dtype)
        return DecoderQueries(
            torch.cat([denoising.content.to(queries.content.dtype), queries.content], 1),  # (B, N + Q, D)
            torch.cat([position, queries.position], 1),  # (B, N + Q, D)
            torch.cat([denoising.boxes.to(queries.reference_points.dtype), queries.reference_points], 1),
        )

    def learned_queries(self, query_embed: torch.Tensor, batch_size: int) -> DecoderQueries:
        """The learned queries ``query_embed`` (num_queries, 2 * hidden_dim) as (position | content) for every
        image, with references projected from the position embedding."""
        query_pos, tgt = torch.split(query_embed, self.hidden_dim, dim=1)  # (Q, D) each
        query_pos = query_pos.unsqueeze(0).expand(batch_size, -1, -1)  # (B, Q, D)
        tgt = tgt.unsqueeze(0).expand(batch_size, -1, -1)  # (B, Q, D)
        reference_points = self.reference_points(query_pos).float().sigmoid()  # (B, Q, 2), float32 under autocast
        return DecoderQueries(tgt, query_pos, reference_points)
