"""Builds DeformableDETR from flat, official-named options."""

from __future__ import annotations

from pathlib import Path

from ddetr.models.backbone import Backbone
from ddetr.models.deformable_detr import DeformableDETR
from ddetr.models.deformable_transformer import DeformableDecoder, DeformableEncoder, DeformableTransformer
from ddetr.models.position_encoding import PositionEmbeddingSine


def build_deformable_detr(
    num_classes: int,
    backbone: str = "resnet50",
    dilation: bool = False,
    backbone_weights: str | Path | None = None,
    train_backbone: bool = True,
    backbone_norm: str = "frozen",
    freeze_stem: bool = True,
    num_feature_levels: int = 4,
    hidden_dim: int = 256,
    nheads: int = 8,
    enc_layers: int = 6,
    dec_layers: int = 6,
    dim_feedforward: int = 1024,
    dropout: float = 0.1,
    num_queries: int = 300,
    enc_n_points: int = 4,
    dec_n_points: int = 4,
    with_box_refine: bool = False,
    two_stage: bool = False,
    aux_loss: bool = True,
    attn_backend: str = "auto",
) -> DeformableDETR:
    """Deformable DETR with the official option names and defaults (multi-scale, R-50, 300 queries).

    The variants of the paper: single-scale ``num_feature_levels=1``; DC5 ``+ dilation=True``;
    multi-scale ``num_feature_levels=4``; ``with_box_refine=True``; two-stage ``two_stage=True``.
    ``backbone_weights`` is an optional local torchvision ResNet state dict; nothing is downloaded.
    ``backbone_norm="batch"`` and ``freeze_stem=False`` suit training the backbone from scratch.
    """
    if hidden_dim % 32:
        raise ValueError(
            f"hidden_dim must be a multiple of 32 (GroupNorm(32) on the input projections), got {hidden_dim}"
        )
    if num_feature_levels < 1:
        raise ValueError(f"num_feature_levels must be at least 1, got {num_feature_levels}")
    body = Backbone(
        backbone,
        num_levels=min(num_feature_levels, 3),
        dilation=dilation,
        train_backbone=train_backbone,
        weights=backbone_weights,
        norm=backbone_norm,
        freeze_stem=freeze_stem,
    )
    layer_options = dict(
        hidden_dim=hidden_dim,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        num_levels=num_feature_levels,
        num_heads=nheads,
        attn_backend=attn_backend,
    )
    encoder = DeformableEncoder(enc_layers, num_points=enc_n_points, **layer_options)
    decoder = DeformableDecoder(dec_layers, num_points=dec_n_points, **layer_options)
    transformer = DeformableTransformer(
        encoder, decoder, num_feature_levels=num_feature_levels, two_stage=two_stage, num_queries=num_queries
    )
    return DeformableDETR(
        body,
        transformer,
        num_classes=num_classes,
        num_queries=num_queries,
        num_feature_levels=num_feature_levels,
        aux_loss=aux_loss,
        with_box_refine=with_box_refine,
        two_stage=two_stage,
        position_encoding=PositionEmbeddingSine(hidden_dim // 2, normalize=True),
    )
