"""Deformable DETR set criterion: Hungarian matching, then focal, L1 and GIoU losses per decoder layer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from ddetr.models.config import LossConfig
from ddetr.models.matcher import HungarianMatcher

Targets = list[dict[str, torch.Tensor]]
Indices = list[tuple[torch.Tensor, torch.Tensor]]


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_boxes: torch.Tensor | float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) in the official DETR-family reduction.

    Per element: ``alpha_t * (1 - p_t)^gamma * BCE(logit, target)`` with ``p_t = p`` for a
    positive and ``1 - p`` for a negative, ``alpha_t = alpha`` for a positive and ``1 - alpha``
    for a negative (no alpha weighting when ``alpha < 0``).

    Args:
        logits: (batch_size, num_queries, num_classes).
        targets: same shape, 0 or 1 (float).
        num_boxes: normaliser.

    Returns:
        Scalar: the element losses averaged over dim 1 (queries), summed, divided by ``num_boxes``.
    """
    probabilities = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.mean(1).sum() / num_boxes


def average_num_boxes(targets: Targets, device: torch.device, sync: bool = True) -> torch.Tensor:
    """Number of targets in the batch, averaged over ranks, at least 1.

    With ``sync``, sums over every rank (``all_reduce`` SUM) when ``torch.distributed`` is initialised
    and divides by the world size, so every rank normalises by the same number. Without it (e.g. in
    evaluation, where ranks may run different numbers of steps) it counts this rank's targets only.

    Returns:
        Scalar float32 tensor on ``device``.
    """
    num_boxes = torch.tensor(float(sum(len(target["labels"]) for target in targets)), device=device)
    world_size = 1
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_boxes, op=torch.distributed.ReduceOp.SUM)
        world_size = torch.distributed.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1)


def class_agnostic(targets: Targets) -> Targets:
    """Copies of the target dicts with every label set to 0 (the two-stage encoder's single class)."""
    return [{**target, "labels": torch.zeros_like(target["labels"])} for target in targets]


class SetCriterion(nn.Module):
    """Deformable DETR loss.

    For the final layer, every auxiliary decoder layer and (two-stage) the encoder proposals: match
    predictions to targets with ``matcher``, then compute each loss in ``losses``:

    - ``labels``: ``loss_ce`` = sigmoid focal loss over one-hot targets (unmatched queries are all
      zeros) * num_queries; plus, final layer only, ``class_error`` = 100 - top-1 accuracy (%) of the
      matched queries (logging only; 100 when the batch has no target, as in the official).
    - ``boxes``: ``loss_bbox`` = L1 and ``loss_giou`` = 1 - GIoU, summed over matched pairs.
    - ``cardinality``: ``cardinality_error`` = mean |#queries whose max sigmoid > 0.5 - #targets|
      (logging only, no gradient). This follows transformers; the official counts queries whose
      argmax is not the last class, a leftover of DETR's no-object class that is meaningless with
      sigmoid classification.

    Every loss (and the focal term) is divided by ``num_boxes``, see ``average_num_boxes``.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        losses: Sequence[str] = ("labels", "boxes", "cardinality"),
        focal_alpha: float = LossConfig.focal_alpha,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.loss_table: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
            "labels": self.loss_labels,
            "boxes": self.loss_boxes,
            "cardinality": self.loss_cardinality,
        }
        unknown = [loss for loss in losses if loss not in self.loss_table]
        if unknown:
            raise ValueError(f"SetCriterion: unknown loss(es) {unknown}; known: {sorted(self.loss_table)}")
        self.losses = tuple(losses)

    @staticmethod
    def matched_query_index(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, query index) of every matched prediction, both (num_matched,) int64."""
        batch_index = torch.cat([torch.full_like(pred, image) for image, (pred, _) in enumerate(indices)])
        query_index = torch.cat([pred for pred, _ in indices])
        return batch_index, query_index

    def loss_labels(
        self,
        outputs: dict[str, torch.Tensor],
        targets: Targets,
        indices: Indices,
        num_boxes: torch.Tensor,
        log: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``loss_ce`` (and ``class_error`` when ``log``)."""
        logits = outputs["pred_logits"].float()  # (B, Q, C)
        num_queries = logits.shape[1]
        batch_index, query_index = self.matched_query_index(indices)
        batch_index, query_index = batch_index.to(logits.device), query_index.to(logits.device)
        matched_labels = torch.cat(
            [target["labels"][target_index] for target, (_, target_index) in zip(targets, indices)]
        ).to(logits.device)  # (num_matched,)

        one_hot = torch.zeros_like(logits)  # (B, Q, C)
        one_hot[batch_index, query_index, matched_labels] = 1
        loss_ce = sigmoid_focal_loss(logits, one_hot, num_boxes, self.focal_alpha, self.focal_gamma) * num_queries
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = 100 - self._top1_accuracy(logits[batch_index, query_index], matched_labels)
        return losses

    @staticmethod
    @torch.no_grad()
    def _top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Percentage of rows whose argmax is the label; 0 without rows (as the official)."""
        if labels.numel() == 0:
            return torch.zeros((), device=logits.device)
        return (logits.argmax(-1) == labels).float().mean() * 100

    @torch.no_grad()
    def loss_cardinality(
        self, outputs: dict[str, torch.Tensor], targets: Targets, indices: Indices, num_boxes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``cardinality_error``: mean absolute error of the number of confident (> 0.5) queries."""
        logits = outputs["pred_logits"]
        num_targets = torch.tensor([len(target["labels"]) for target in targets], device=logits.device)
        num_confident = (logits.sigmoid().amax(-1) > 0.5).sum(1)  # (B,)
        return {"cardinality_error": F.l1_loss(num_confident.float(), num_targets.float())}

    def loss_boxes(
        self, outputs: dict[str, torch.Tensor], targets: Targets, indices: Indices, num_boxes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``loss_bbox`` (L1 on cxcywh) and ``loss_giou`` (1 - GIoU), 0 with a gradient when nothing matched."""
        pred_boxes = outputs["pred_boxes"].float()  # (B, Q, 4)
        batch_index, query_index = self.matched_query_index(indices)
        matched_pred = pred_boxes[batch_index.to(pred_boxes.device), query_index.to(pred_boxes.device)]  # (M, 4)
        matched_target = torch.cat(
            [target["boxes"][target_index] for target, (_, target_index) in zip(targets, indices)]
        ).to(matched_pred)  # (M, 4)
        loss_bbox = F.l1_loss(matched_pred, matched_target, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(matched_pred), box_cxcywh_to_xyxy(matched_target)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def layer_losses(
        self,
        outputs: dict[str, torch.Tensor],
        targets: Targets,
        num_boxes: torch.Tensor,
        suffix: str = "",
        log: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Match one layer's predictions and compute its losses, names suffixed with ``suffix``."""
        indices = self.matcher(outputs, targets)
        losses: dict[str, torch.Tensor] = {}
        for loss in self.losses:
            kwargs = {"log": log} if loss == "labels" else {}
            losses.update(self.loss_table[loss](outputs, targets, indices, num_boxes, **kwargs))
        return {name + suffix: value for name, value in losses.items()}

    def forward(self, outputs: dict, targets: Targets, sync_num_boxes: bool = True) -> dict[str, torch.Tensor]:
        """Unweighted loss terms.

        ``sync_num_boxes``: average the normaliser ``num_boxes`` over ranks (the official training
        behaviour, a collective call on every rank); pass False where ranks may run different
        numbers of steps, as in distributed evaluation.

        Args:
            outputs: ``pred_logits`` (batch_size, num_queries, num_classes), ``pred_boxes``
                (batch_size, num_queries, 4) normalised cxcywh; optionally ``aux_outputs`` (list of
                dicts with the same two keys, one per earlier decoder layer) and ``enc_outputs`` (dict
                with the same two keys, two-stage proposals).
            targets: one dict per image: ``labels`` int64 (num_targets,), ``boxes`` (num_targets, 4)
                normalised cxcywh.

        Returns:
            Scalars: ``loss_ce, loss_bbox, loss_giou, class_error, cardinality_error`` for the final
            layer (those of the configured losses); ``<name>_{i}`` for ``aux_outputs[i]`` and
            ``<name>_enc`` for ``enc_outputs`` (no ``class_error`` for either).
        """
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            raise ValueError(
                f"SetCriterion: pred_logits has {outputs['pred_logits'].shape[-1]} classes, "
                f"the criterion was built for num_classes={self.num_classes}"
            )
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device, sync=sync_num_boxes)
        losses = self.layer_losses(outputs, targets, num_boxes, log=True)
        for layer, aux_outputs in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self.layer_losses(aux_outputs, targets, num_boxes, suffix=f"_{layer}"))
        if "enc_outputs" in outputs:
            losses.update(self.layer_losses(outputs["enc_outputs"], class_agnostic(targets), num_boxes, suffix="_enc"))
        return losses

    def weighted_total(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum(loss_dict[name] * weight)`` over ``weight_dict``; every weighted name must be present."""
        missing = [name for name in self.weight_dict if name not in loss_dict]
        if missing:
            raise KeyError(
                f"SetCriterion.weighted_total: weighted loss(es) {missing} missing from the loss dict "
                f"(has {sorted(loss_dict)}); do aux_loss / two_stage / dec_layers match the model's outputs?"
            )
        return sum(loss_dict[name] * weight for name, weight in self.weight_dict.items())


def build_weight_dict(dec_layers: int, aux_loss: bool, two_stage: bool, loss: LossConfig) -> dict[str, float]:
    """Weights of the final-layer losses plus ``_0``..``_{dec_layers-2}`` (aux) and ``_enc`` copies."""
    base = {"loss_ce": loss.cls_loss_coef, "loss_bbox": loss.bbox_loss_coef, "loss_giou": loss.giou_loss_coef}
    suffixes: Iterable[str] = [""]
    if aux_loss:
        suffixes = [*suffixes, *(f"_{layer}" for layer in range(dec_layers - 1))]
    if two_stage:
        suffixes = [*suffixes, "_enc"]
    return {name + suffix: weight for suffix in suffixes for name, weight in base.items()}
