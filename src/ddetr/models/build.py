"""Builds DeformableDETR and its SetCriterion from a ``DeformableDETRConfig``."""

from __future__ import annotations

from typing import Any

from ddetr.models.backbone import Backbone
from ddetr.models.config import DeformableDETRConfig, LossConfig, split_options
from ddetr.models.criterion import SetCriterion, build_weight_dict
from ddetr.models.deformable_detr import DeformableDETR
from ddetr.models.deformable_transformer import (
    CHECKPOINTING,
    DeformableDecoder,
    DeformableEncoder,
    DeformableTransformer,
)
from ddetr.models.matcher import HungarianMatcher
from ddetr.models.position_encoding import PositionEmbeddingSine


def _as_config(config: DeformableDETRConfig | int | None, options: dict[str, Any]) -> DeformableDETRConfig:
    if config is None:  # the class count given by name
        config = options.pop("num_classes")
    if isinstance(config, DeformableDETRConfig):
        return DeformableDETRConfig.from_dict(config.to_dict(), **options) if options else config
    return DeformableDETRConfig.from_official(num_classes=config, **options)


def build_deformable_detr(config: DeformableDETRConfig | int | None = None, **options: Any) -> DeformableDETR:
    """Deformable DETR from ``config``, or from a class count and flat official options
    (``build_deformable_detr(5, backbone="resnet18", with_box_refine=True)``), defaults from
    ``DeformableDETRConfig``. Backbone weights are read only from ``config.backbone.weights``.
    """
    config = _as_config(config, options)
    if config.hidden_dim % 32:
        raise ValueError(
            f"hidden_dim must be a multiple of 32 (GroupNorm(32) on the input projections), got {config.hidden_dim}"
        )
    if config.num_feature_levels < 1:
        raise ValueError(f"num_feature_levels must be at least 1, got {config.num_feature_levels}")
    backbone = config.backbone
    body = Backbone(
        backbone.name,
        num_levels=min(config.num_feature_levels, 3),
        dilation=backbone.dilation,
        train_backbone=backbone.train_backbone,
        weights=backbone.weights,
        norm=backbone.norm,
        freeze_stem=backbone.freeze_stem,
    )
    if config.checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {config.checkpointing!r}")
    encoder = DeformableEncoder(config.layer(config.enc_n_points), config.enc_layers,
                                checkpointing=config.checkpointing in ("encoder", "all"))  # fmt: skip
    decoder = DeformableDecoder(config.layer(config.dec_n_points), config.dec_layers,
                                checkpointing=config.checkpointing == "all")  # fmt: skip
    transformer = DeformableTransformer(
        encoder, decoder, num_feature_levels=config.num_feature_levels, two_stage=config.two_stage,
        num_queries=config.num_queries,
    )
    return DeformableDETR(
        body,
        transformer,
        num_classes=config.num_classes,
        num_queries=config.num_queries,
        num_feature_levels=config.num_feature_levels,
        aux_loss=config.aux_loss,
        with_box_refine=config.with_box_refine,
        two_stage=config.two_stage,
        position_encoding=PositionEmbeddingSine(config.hidden_dim // 2, normalize=True),
    )


def build_criterion(
    config: DeformableDETRConfig | int | None = None, loss: LossConfig | None = None, **options: Any
) -> SetCriterion:
    """SetCriterion for the model of ``config`` with the costs and weights of ``loss``; or from a class
    count and flat options of both (``build_criterion(3, dec_layers=2, cls_loss_coef=1)``)."""
    architecture, loss_options = split_options(options)
    config = _as_config(config, architecture)
    if loss is None:
        loss = LossConfig.from_dict(loss_options)
    # the official matcher keeps its own alpha 0.25 whatever focal_alpha is
    matcher = HungarianMatcher(cost_class=loss.set_cost_class, cost_bbox=loss.set_cost_bbox, cost_giou=loss.set_cost_giou)
    weight_dict = build_weight_dict(config.dec_layers, config.aux_loss, config.two_stage, loss)
    return SetCriterion(config.num_classes, matcher, weight_dict, focal_alpha=loss.focal_alpha)
