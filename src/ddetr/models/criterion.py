"""Deformable DETR set criterion: Hungarian matching, then focal, L1 and GIoU losses per decoder layer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddetr.boxes import box_cxcywh_to_xyxy, generalized_box_iou_elementwise
from ddetr.models.config import LossConfig
from ddetr.models.matcher import HungarianMatcher, Indices, PaddedTargets, pad_targets

Targets = list[dict[str, torch.Tensor]]


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_boxes: torch.Tensor | float,
    alpha: float = LossConfig.focal_alpha,
    gamma: float = LossConfig.focal_gamma,
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
    return sigmoid_focal_loss_terms(logits, targets, alpha, gamma).mean(1).sum() / num_boxes


def sigmoid_focal_loss_terms(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """The element losses of :func:`sigmoid_focal_loss`, same shape as ``logits``."""
    probabilities = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def average_num_boxes(targets: Targets, device: torch.device, sync: bool = True) -> torch.Tensor:
    """Number of targets in the batch, averaged over ranks, at least 1.

    With ``sync``, sums over every rank (``all_reduce`` SUM) when ``torch.distributed`` is initialised
    and divides by the world size, so every rank normalises by the same number. Without it (e.g. in
    evaluation, where ranks may run different numbers of steps) it counts this rank's targets only.

    Returns:
        Scalar float32 tensor on ``device``.
    """
    # a fill, not a host-to-device copy: nothing waits for the device
    num_boxes = torch.full((), float(sum(len(target["labels"]) for target in targets)), device=device)
    world_size = 1
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_boxes, op=torch.distributed.ReduceOp.SUM)
        world_size = torch.distributed.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1)


DEFAULT_LOSSES = ("labels", "boxes", "cardinality")  # the terms SetCriterion computes unless told otherwise


@dataclass
class Matched:
    """A stack of layers with its matching, ready for the losses.

    ``logits`` (num_layers, batch_size, num_queries, num_classes) and ``boxes`` (num_layers,
    batch_size, num_queries, 4) float32; ``layer``, ``image``, ``query`` (num_matched,) int64 on the
    device, the matched predictions of every layer one after another; ``labels`` (num_matched,) and
    ``target_boxes`` (num_matched, 4) their targets; ``num_targets`` (batch_size,) float32;
    ``last_layer`` the slice of the matched entries of the last layer (Python ints).
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    layer: torch.Tensor
    image: torch.Tensor
    query: torch.Tensor
    labels: torch.Tensor
    target_boxes: torch.Tensor
    num_targets: torch.Tensor
    last_layer: slice


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

    The decoder layers are treated as one stack (num_layers, batch_size, ...): one cost computation,
    one device-to-host transfer of all costs (with the encoder proposals'), one host-to-device
    transfer of all matched indices, and every loss computed for all layers at once. Losses and
    matching run in float32 with autocast off.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        losses: Sequence[str] = DEFAULT_LOSSES,
        focal_alpha: float = LossConfig.focal_alpha,
        focal_gamma: float = LossConfig.focal_gamma,
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
        self._compiled_losses: Callable[..., dict[str, torch.Tensor]] | None = None  # compile_losses

    def loss_labels(self, matched: Matched, num_boxes: torch.Tensor, log: bool = True) -> dict[str, torch.Tensor]:
        """``loss_ce`` (num_layers,) and, when ``log``, ``class_error`` of the last layer (scalar)."""
        logits = matched.logits  # (N, B, Q, C)
        num_queries = logits.shape[2]
        one_hot = torch.zeros_like(logits)  # (N, B, Q, C)
        one_hot[matched.layer, matched.image, matched.query, matched.labels] = 1
        focal = sigmoid_focal_loss_terms(logits, one_hot, self.focal_alpha, self.focal_gamma)  # (N, B, Q, C)
        loss_ce = focal.mean(2).sum((1, 2)) / num_boxes * num_queries  # (N,)
        losses = {"loss_ce": loss_ce}
        if log:
            last = matched.last_layer
            last_logits = logits[-1][matched.image[last], matched.query[last]]  # (M_last, C)
            losses["class_error"] = 100 - self._top1_accuracy(last_logits, matched.labels[last])
        return losses

    @staticmethod
    @torch.no_grad()
    def _top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Percentage of rows whose argmax is the label; 0 without rows (as the official)."""
        if labels.numel() == 0:
            return torch.zeros((), device=logits.device)
        return (logits.argmax(-1) == labels).float().mean() * 100

    @torch.no_grad()
    def loss_cardinality(self, matched: Matched, num_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """``cardinality_error`` (num_layers,): mean absolute error of the number of confident (> 0.5) queries."""
        num_confident = (matched.logits.sigmoid().amax(-1) > 0.5).sum(2)  # (N, B)
        return {"cardinality_error": (num_confident.float() - matched.num_targets).abs().mean(1)}

    def loss_boxes(self, matched: Matched, num_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss_bbox`` (L1 on cxcywh) and ``loss_giou`` (1 - GIoU), (num_layers,) each, 0 with a
        gradient for a layer without matches."""
        pred = matched.boxes[matched.layer, matched.image, matched.query]  # (M, 4)
        target = matched.target_boxes  # (M, 4)
        l1 = F.l1_loss(pred, target, reduction="none").sum(1)  # (M,)
        giou = generalized_box_iou_elementwise(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))  # (M,)
        zeros = matched.boxes.new_zeros(matched.boxes.shape[0])  # (N,)
        loss_bbox = zeros.index_add(0, matched.layer, l1) / num_boxes
        loss_giou = zeros.index_add(0, matched.layer, 1 - giou) / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _matched(self, logits, boxes, padded: PaddedTargets, layer_indices: list[Indices], index_on_device) -> Matched:
        """A ``Matched`` stack from its host indices, given the device copy of the packed indices."""
        layer, image, query, target = index_on_device
        return Matched(
            logits=logits,
            boxes=boxes,
            layer=layer,
            image=image,
            query=query,
            labels=padded.labels[image, target],
            target_boxes=padded.boxes[image, target],
            num_targets=padded.valid.sum(1).float(),
            last_layer=slice(sum(len(pred) for indices in layer_indices[:-1] for pred, _ in indices), None),
        )

    @staticmethod
    def _pack_indices(layer_indices: list[Indices]) -> np.ndarray:
        """(4, num_matched) int64 host array of (layer, image, query, target) for every matched pair."""
        columns = [
            np.stack([np.full(len(pred), layer), np.full(len(pred), image), pred.numpy(), target.numpy()])
            for layer, indices in enumerate(layer_indices)
            for image, (pred, target) in enumerate(indices)
        ]
        return np.concatenate(columns, 1).astype(np.int64) if columns else np.empty((4, 0), dtype=np.int64)

    def stack_losses(
        self,
        stacks: Sequence[tuple[torch.Tensor, torch.Tensor, PaddedTargets, bool]],
        num_boxes: torch.Tensor,
    ) -> list[dict[str, torch.Tensor]]:
        """Matches and computes the losses of several stacks of layers.

        Args:
            stacks: ``(logits (N, B, Q, C), boxes (N, B, Q, 4), padded targets, log)`` per stack;
                ``log`` adds the last layer's ``class_error``.
            num_boxes: the normaliser.

        Returns:
            Per stack, loss name -> (N,) values (``class_error`` a scalar).
        """
        stacks = [(logits.float(), boxes.float(), padded, log) for logits, boxes, padded, log in stacks]
        matches = self.matcher.match([(logits, boxes, padded) for logits, boxes, padded, _ in stacks])
        packed = [self._pack_indices(layer_indices) for layer_indices in matches]
        host = torch.from_numpy(np.concatenate(packed, 1))  # (4, total matched)
        device = stacks[0][0].device
        if device.type == "cuda":
            host = host.pin_memory()
        on_device = host.to(device, non_blocking=True).split([part.shape[1] for part in packed], 1)
        matched_losses = self._compiled_losses or self.matched_losses
        results = []
        for (logits, boxes, padded, log), layer_indices, indices in zip(stacks, matches, on_device):
            matched = self._matched(logits, boxes, padded, layer_indices, indices.unbind(0))
            results.append(matched_losses(matched, num_boxes, log))
        return results

    def matched_losses(self, matched: Matched, num_boxes: torch.Tensor, log: bool) -> dict[str, torch.Tensor]:
        """Every configured loss of one matched stack: loss name -> (num_layers,) values (``class_error``,
        added when ``log``, a scalar). Device work only, no host read: what ``compile_losses`` compiles."""
        losses: dict[str, torch.Tensor] = {}
        for loss in self.losses:
            kwargs = {"log": log} if loss == "labels" else {}
            losses.update(self.loss_table[loss](matched, num_boxes, **kwargs))
        return losses

    def compile_losses(self, **options) -> None:
        """Runs ``matched_losses`` through ``torch.compile(**options)`` from now on; the matching before
        it stays eager (scipy on the host). Like ``nn.Module.compile``: in place, nothing registered."""
        self._compiled_losses = torch.compile(self.matched_losses, **options)

    def layer_losses(
        self,
        outputs: dict[str, torch.Tensor],
        targets: Targets,
        num_boxes: torch.Tensor,
        suffix: str = "",
        log: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Match one layer's predictions and compute its losses, names suffixed with ``suffix``."""
        padded = pad_targets(targets, outputs["pred_logits"].device)
        stack = (outputs["pred_logits"][None], outputs["pred_boxes"][None], padded, log)
        losses = self.stack_losses([stack], num_boxes)[0]
        return {name + suffix: value.reshape(-1)[-1] for name, value in losses.items()}

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
        device = outputs["pred_logits"].device
        with torch.autocast(device.type, enabled=False):
            num_boxes = average_num_boxes(targets, device, sync=sync_num_boxes)
            padded = pad_targets(targets, device)
            layers = [*(outputs.get("aux_outputs") or []), outputs]  # first layer first, final last
            stacks = [
                (
                    torch.stack([layer["pred_logits"] for layer in layers]),
                    torch.stack([layer["pred_boxes"] for layer in layers]),
                    padded,
                    True,
                )
            ]
            if "enc_outputs" in outputs:
                encoder = outputs["enc_outputs"]
                stacks.append(
                    (encoder["pred_logits"][None], encoder["pred_boxes"][None], padded.class_agnostic(), False)
                )
            results = self.stack_losses(stacks, num_boxes)
        decoder = results[0]
        losses = {name: value if name == "class_error" else value[-1] for name, value in decoder.items()}
        for layer in range(len(layers) - 1):
            losses.update({f"{name}_{layer}": value[layer] for name, value in decoder.items() if name != "class_error"})
        if "enc_outputs" in outputs:
            losses.update({f"{name}_enc": value[0] for name, value in results[1].items() if name != "class_error"})
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
