"""DeformableDETR: backbone levels -> input projections -> deformable transformer -> class and box heads."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.image_list import pad_images, resize_mask
from ddetr.models.backbones import build_backbone
from ddetr.models.backbones.base import place_conv_weights
from ddetr.models.config import DeformableDETRConfig
from ddetr.models.deformable_transformer import DeformableTransformer
from ddetr.models.denoising import ContrastiveDenoising
from ddetr.models.dino_transformer import DinoTransformer
from ddetr.models.geometry import boxes_from_reference
from ddetr.models.hybrid import split_queries
from ddetr.models.position_encoding import PositionEmbeddingSine

Targets = list[dict[str, torch.Tensor]]

Images = Sequence[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList([nn.Linear(dims[i], dims[i + 1]) for i in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _input_projection(in_channels: int, hidden_dim: int, kernel_size: int, stride: int) -> nn.Sequential:
    """Conv (xavier weight, zero bias) + GroupNorm(32) bringing a level to ``hidden_dim`` channels."""
    conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(32, hidden_dim))


class DeformableDETR(nn.Module):
    """Deformable DETR (Zhu et al., ICLR 2021), built from the whole ``DeformableDETRConfig``.

    The backbone comes from the registry (``config.backbone.name``; ``ddetr.models.backbones``) and
    returns ``config.num_backbone_levels`` levels with their channel counts and strides.

    Backbone levels are projected to ``hidden_dim`` by a 1x1 conv + GroupNorm each; levels beyond the
    backbone's come from a 3x3 stride-2 conv + GroupNorm, the first on the raw last backbone output,
    the next ones on the previous projected level.

    Heads: without ``with_box_refine`` one class head and one box head (``class_embed.0``,
    ``bbox_embed.0``) serve every decoder layer; with it each layer has its own, and layer ``l``'s box
    head also refines the references for layer ``l + 1``. With ``two_stage`` separate heads
    ``enc_class_embed`` / ``enc_bbox_embed`` score the encoder proposals, and there is no
    ``query_embed`` (the queries come from the top proposals).

    Training-only parts (absent from inference, its outputs and its exported graph): with
    ``config.denoising.enabled`` the label book ``denoising.label_embed`` and the denoising queries built from
    the targets; with ``config.hybrid.enabled`` the one-to-many queries (``query_embed_one2many`` for learned
    queries; two-stage selects more proposals).
    """

    def __init__(self, config: DeformableDETRConfig) -> None:
        super().__init__()
        hidden_dim = config.hidden_dim
        self.backbone = build_backbone(config)
        dino = config.variant == "dino"  # DINO's model (docs/dino.md): its position offset, transformer, shared heads
        self.position_encoding = PositionEmbeddingSine(
            hidden_dim // 2, temperature=config.position_temperature, normalize=True, offset=0.0 if dino else 0.5
        )
        self.transformer = DinoTransformer(config) if dino else DeformableTransformer(config)
        self.variant = config.variant
        self.dec_layers = config.dec_layers
        self.num_classes = config.num_classes
        self.num_queries = config.num_queries
        self.num_feature_levels = config.num_feature_levels
        self.aux_loss = config.aux_loss
        self.with_box_refine = config.with_box_refine
        self.two_stage = config.two_stage

        backbone_channels = self.backbone.num_channels
        projections = [_input_projection(channels, hidden_dim, 1, 1) for channels in backbone_channels]
        projections += [
            _input_projection(
                backbone_channels[-1] if level == len(backbone_channels) else hidden_dim, hidden_dim, 3, 2
            )
            for level in range(len(backbone_channels), config.num_feature_levels)
        ]
        self.input_proj = nn.ModuleList(projections)
        # the projections take the backbone's maps: their weights in the backbone's memory format
        place_conv_weights(self.input_proj, self.backbone.channels_last)
        self.num_one2many = config.num_one2many_queries  # the hybrid branch's queries (training only)
        if not self.two_stage:
            self.query_embed = nn.Embedding(config.num_queries, hidden_dim * 2)
            if self.num_one2many:
                self.query_embed_one2many = nn.Embedding(config.num_one2many_queries, hidden_dim * 2)
        self.denoising = (
            ContrastiveDenoising(config.num_classes, hidden_dim, config.denoising) if config.denoising.enabled else None
        )

        num_heads = config.dec_layers if self.with_box_refine and not dino else 1
        self.class_embed = nn.ModuleList([nn.Linear(hidden_dim, config.num_classes) for _ in range(num_heads)])
        self.bbox_embed = nn.ModuleList([MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_heads)])
        if self.two_stage:
            self.enc_class_embed = nn.Linear(hidden_dim, config.num_classes)
            self.enc_bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self._reset_head_parameters()

    def _reset_head_parameters(self) -> None:
        """The official head initialisation: class bias for a 0.01 prior; box heads output 0 except a
        bias of -2 on the size of the first (or shared) head when not two-stage."""
        prior_prob = 0.01
        bias_value = -math.log((1 - prior_prob) / prior_prob)
        class_heads = list(self.class_embed) + ([self.enc_class_embed] if self.two_stage else [])
        box_heads = list(self.bbox_embed) + ([self.enc_bbox_embed] if self.two_stage else [])
        for head in class_heads:
            nn.init.constant_(head.bias, bias_value)
        for head in box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if not self.two_stage:
            with torch.no_grad():
                self.bbox_embed[0].layers[-1].bias[2:] = -2.0

    def feature_levels(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Projected features (batch_size, hidden_dim, height_l, width_l) and their padding masks
        (batch_size, height_l, width_l) for all ``num_feature_levels`` levels."""
        features = self.backbone(images, mask)
        srcs = [
            projection(feature)
            for projection, (feature, _) in zip(self.input_proj[: len(features)], features, strict=True)
        ]
        masks = [level_mask for _, level_mask in features]
        for level in range(len(features), self.num_feature_levels):
            source = features[-1][0] if level == len(features) else srcs[-1]
            src = self.input_proj[level](source)
            masks.append(resize_mask(mask, src.shape[-2:]))
            srcs.append(src)
        return srcs, masks

    def _apply(self, fn, recurse=True):
        """``nn.Module``'s device and dtype moves; then the input projections' weights take the memory
        format of the backbone's maps on the new device (``place_conv_weights``; the backbone places its own)."""
        super()._apply(fn, recurse)
        place_conv_weights(self.input_proj, self.backbone.channels_last)
        return self

    def level_strides(self) -> list[int]:
        """Stride in input pixels of every feature level: the backbone's, then doubled for every extra
        level (the 3x3 stride-2 projections)."""
        strides = list(self.backbone.strides)
        while len(strides) < self.num_feature_levels:
            strides.append(strides[-1] * 2)
        return strides

    def forward(self, images: Images, targets: Targets | None = None) -> dict[str, object]:
        """Detects objects.

        Args:
            images: a list of normalised (3, height_i, width_i) tensors, or a padded batch
                ``(images (batch_size, 3, height, width), mask (batch_size, height, width) bool, True on padding)``.
            targets: training with denoising only: one dict per image with ``labels`` (num_boxes,) int64 and
                ``boxes`` (num_boxes, 4) normalised cxcywh, from which the denoising queries are built.

        Returns:
            dict with
            - ``pred_logits``: (batch_size, num_queries, num_classes) class logits of the last layer.
            - ``pred_boxes``: (batch_size, num_queries, 4) boxes (cx, cy, w, h) in [0, 1] of the unpadded image.
            - ``aux_outputs`` (when ``aux_loss``): list of dec_layers - 1 dicts with ``pred_logits`` and
              ``pred_boxes`` of the earlier layers, first layer first.
            - ``enc_outputs`` (two-stage): dict with ``pred_logits`` (batch_size, num_values, num_classes)
              and ``pred_boxes`` (batch_size, num_values, 4) of every encoder proposal.
            - ``interm_outputs`` (``variant=dino``, instead of ``enc_outputs``): dict with ``pred_logits``
              (batch_size, num_queries, num_classes) and ``pred_boxes`` (batch_size, num_queries, 4) of the
              selected proposals.
            In training only:
            - ``dn_outputs`` (denoising): dict with ``pred_logits`` (batch_size, num_denoising, num_classes),
              ``pred_boxes`` (batch_size, num_denoising, 4) and ``aux_outputs`` as above, of the denoising
              queries (empty, num_denoising 0, when the batch has no box or no targets were given), and
              ``denoising``: their ``DenoisingQueries`` (None when there are none).
            - ``one2many_outputs`` (hybrid): dict with ``pred_logits`` (batch_size, num_one2many,
              num_classes), ``pred_boxes`` (batch_size, num_one2many, 4) and ``aux_outputs``.
        """
        if isinstance(images, (list, tuple)) and len(images) == 2 and images[0].dim() == 4:
            batch, mask = images
        else:
            batch, mask = pad_images(list(images))
        srcs, masks = self.feature_levels(batch, mask)
        pos_embeds = [
            self.position_encoding(level_mask).to(src.dtype) for src, level_mask in zip(srcs, masks, strict=True)
        ]
        training_denoising = self.denoising is not None and self.training
        denoising = self.denoising(targets) if training_denoising and targets is not None else None
        decoded = self.transformer(
            srcs,
            masks,
            pos_embeds,
            query_embed=None if self.two_stage else self._query_embed(),
            box_heads=self._layer_heads(self.bbox_embed) if self.with_box_refine else None,
            proposal_heads=(self.enc_class_embed, self.enc_bbox_embed) if self.two_stage else None,
            denoising=denoising,
        )
        hidden_states, references = decoded["hidden_states"], decoded["references"]
        if self.with_box_refine:  # one head per layer; the decoder already applied the box heads
            heads = self._layer_heads(self.class_embed)
            logits = [head(hidden) for head, hidden in zip(heads, hidden_states, strict=True)]
            boxes = decoded["boxes"]
        else:  # shared heads: all layers at once, (num_layers, B, Q, D) -> (num_layers, B, Q, C or 4)
            stacked = torch.stack(hidden_states)
            logits = self.class_embed[0](stacked).unbind(0)
            boxes = boxes_from_reference(self.bbox_embed[0](stacked), torch.stack(references)).unbind(0)
        layer_outputs = [
            {"pred_logits": layer_logits, "pred_boxes": layer_boxes}
            for layer_logits, layer_boxes in zip(logits, boxes, strict=True)
        ]
        extra_outputs = {}
        num_denoising = 0 if denoising is None else denoising.num_queries
        num_one2many = layer_outputs[0]["pred_logits"].shape[1] - num_denoising - self.num_queries
        if training_denoising or num_one2many:
            sets = split_queries(layer_outputs, (num_denoising, self.num_queries, num_one2many))
            layer_outputs = sets[1]
            if training_denoising:
                if denoising is None:  # the label book joins the graph all the same (DDP expects its gradient)
                    sets[0][0]["pred_logits"] = sets[0][0]["pred_logits"] + self.denoising.label_embed.weight[0, 0] * 0
                extra_outputs["dn_outputs"] = self._with_aux(sets[0])
                extra_outputs["denoising"] = denoising
            if num_one2many:
                extra_outputs["one2many_outputs"] = self._with_aux(sets[2])
        outputs = self._with_aux(layer_outputs)
        if self.two_stage:
            # DINO: the selected proposals, matched to the real labels; official: every proposal, class-agnostic
            encoder_key = "interm_outputs" if self.variant == "dino" else "enc_outputs"
            outputs[encoder_key] = {"pred_logits": decoded["enc_logits"], "pred_boxes": decoded["enc_boxes"]}
        return {**outputs, **extra_outputs}

    def _layer_heads(self, heads: nn.ModuleList) -> list[nn.Module]:
        """One head per decoder layer: ``heads`` itself, or its one head repeated (DINO shares them)."""
        return list(heads) if len(heads) == self.dec_layers else [heads[0]] * self.dec_layers

    def _with_aux(self, layer_outputs: list[dict[str, torch.Tensor]]) -> dict[str, object]:
        """The last layer's outputs, with the earlier layers' as ``aux_outputs`` when ``aux_loss``."""
        outputs: dict[str, object] = dict(layer_outputs[-1])
        if self.aux_loss:
            outputs["aux_outputs"] = layer_outputs[:-1]
        return outputs

    def _query_embed(self) -> torch.Tensor:
        """The learned queries (num_queries [+ num_one2many in training], 2 * hidden_dim)."""
        if self.training and self.num_one2many:
            return torch.cat([self.query_embed.weight, self.query_embed_one2many.weight], 0)
        return self.query_embed.weight
