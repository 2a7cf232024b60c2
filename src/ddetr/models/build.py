"""Builds DeformableDETR and its SetCriterion from a ``DeformableDETRConfig``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ddetr.models.config import DeformableDETRConfig, LossConfig, split_options
from ddetr.models.criterion import DEFAULT_LOSSES, SetCriterion, build_weight_dict
from ddetr.models.deformable_detr import DeformableDETR
from ddetr.models.matcher import HungarianMatcher


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
    return DeformableDETR(_as_config(config, options))


def build_criterion(
    config: DeformableDETRConfig | int | None = None,
    loss: LossConfig | None = None,
    losses: Sequence[str] = DEFAULT_LOSSES,
    **options: Any,
) -> SetCriterion:
    """SetCriterion for the model of ``config`` with the costs and weights of ``loss``, computing the terms
    ``losses`` (names of ``SetCriterion.loss_table``); or from a class count and flat options of both
    (``build_criterion(3, dec_layers=2, cls_loss_coef=1)``)."""
    architecture, loss_options = split_options(options)
    config = _as_config(config, architecture)
    if loss is None:
        loss = LossConfig.from_dict(loss_options)
    # the official matcher keeps its own alpha 0.25 whatever focal_alpha is
    matcher = HungarianMatcher(
        cost_class=loss.set_cost_class,
        cost_bbox=loss.set_cost_bbox,
        cost_giou=loss.set_cost_giou,
        focal_gamma=loss.focal_gamma,
    )
    weight_dict = build_weight_dict(config.dec_layers, config.aux_loss, config.two_stage, loss, config)
    alphas = {"varifocal": loss.varifocal_alpha, "ia_bce": loss.ia_bce_alpha}
    return SetCriterion(
        config.num_classes,
        matcher,
        weight_dict,
        losses=losses,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
        class_loss=loss.class_loss,
        class_loss_alpha=alphas.get(loss.class_loss),
        one2many_k=config.hybrid.k,
    )
