"""Deformable DETR set criterion: Hungarian matching, then focal, L1 and GIoU losses per decoder layer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddetr.boxes import box_cxcywh_to_xyxy, box_iou_elementwise, generalized_box_iou_elementwise
from ddetr.models.config import DeformableDETRConfig, LossConfig
from ddetr.models.denoising import DenoisingQueries
from ddetr.models.hybrid import repeat_targets
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


def iou_aware_targets(
    kind: str, probabilities: torch.Tensor, ious: torch.Tensor, alpha: float = LossConfig.ia_bce_alpha
) -> torch.Tensor:
    """The soft class target of a matched (positive) prediction of an IoU-aware class loss.

    Args:
        kind: ``varifocal`` (VarifocalNet / RT-DETR: the IoU ``u``) or ``ia_bce`` (Align-DETR:
            ``s ** alpha * u ** (1 - alpha)``).
        probabilities: (num_matched,) the predicted score ``s`` at the target class (detached by the caller).
        ious: (num_matched,) the IoU ``u`` of the predicted box with its target (detached by the caller).

    Returns:
        (num_matched,) targets in [0, 1].
    """
    if kind == "varifocal":
        return ious
    if kind == "ia_bce":
        return probabilities.pow(alpha) * ious.pow(1 - alpha)
    raise ValueError(f"unknown IoU-aware class loss {kind!r}; known: varifocal, ia_bce")


def iou_aware_class_terms(
    kind: str, logits: torch.Tensor, one_hot: torch.Tensor, soft_targets: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """The element losses of an IoU-aware class loss, same shape as ``logits``.

    ``varifocal`` (RT-DETR's VFL): ``BCE(logit, q) * w``, ``q`` the soft target at the positive class and 0
    elsewhere, ``w = q`` on positives and ``alpha * p^gamma`` on negatives. ``ia_bce`` (Align-DETR):
    ``BCE(logit, t)`` on positives (weight 1) and ``p^gamma * BCE(logit, 0)`` on negatives.

    Args:
        logits: (..., num_classes).
        one_hot: same shape, 1 at every positive (matched query, its class), else 0.
        soft_targets: same shape, the positive's target (``iou_aware_targets``) at the positives, else 0.
    """
    probabilities = logits.sigmoid().detach()
    negative_weight = probabilities.pow(gamma) * (1 - one_hot)
    if kind == "varifocal":
        weight = alpha * negative_weight + soft_targets
    else:
        weight = negative_weight + one_hot
    return F.binary_cross_entropy_with_logits(logits, soft_targets, weight=weight.detach(), reduction="none")


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
    ``last_layer`` the slice of the matched entries of the last layer (Python ints); ``valid``
    (num_matched,) float32, 1 for a real pair and 0 for padding (``pad_matched``), or None: every
    entry is a real pair.
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
    valid: torch.Tensor | None = None


PADDING_BOX = (0.5, 0.5, 1.0, 1.0)  # the target of a padding pair: any box with an area keeps GIoU finite


def pair_bound(logits: torch.Tensor) -> int:
    """The most pairs a stack can match: every query of every layer and image (num_layers * batch_size
    * num_queries of ``logits`` (N, B, Q, C)); the Hungarian matching gives ``min(Q, num_targets)`` per
    layer and image."""
    num_layers, batch_size, num_queries = logits.shape[:3]
    return num_layers * batch_size * num_queries


def pad_matched(matched: Matched, size: int) -> Matched:
    """``matched`` with its pairs padded to ``size`` entries and ``valid`` marking the real ones: the
    losses see one number of pairs whatever the matching found (one CUDA graph under
    ``model.compile=reduce-overhead``). A padding pair points at layer 0, image 0, query 0, class 0,
    its target ``PADDING_BOX``; the masked losses give it no weight and no gradient.

    Raises:
        ValueError: ``matched`` has more than ``size`` pairs.
    """
    num_matched = matched.layer.shape[0]
    if num_matched > size:
        raise ValueError(f"pad_matched: {num_matched} matched pairs exceed the bound of {size}")
    extra = size - num_matched
    device = matched.layer.device
    indices = torch.zeros(extra, dtype=matched.layer.dtype, device=device)  # (extra,)
    filler = torch.tensor(PADDING_BOX, dtype=matched.target_boxes.dtype, device=device).expand(extra, 4)
    valid = torch.cat([torch.ones(num_matched, device=device), torch.zeros(extra, device=device)])  # (size,)
    return Matched(
        logits=matched.logits,
        boxes=matched.boxes,
        layer=torch.cat([matched.layer, indices]),
        image=torch.cat([matched.image, indices]),
        query=torch.cat([matched.query, indices]),
        labels=torch.cat([matched.labels, indices.to(matched.labels.dtype)]),
        target_boxes=torch.cat([matched.target_boxes, filler]),  # (size, 4)
        num_targets=matched.num_targets,
        last_layer=slice(matched.last_layer.start, num_matched),
        valid=valid if matched.valid is None else torch.cat([matched.valid, valid[num_matched:]]),
    )


class SetCriterion(nn.Module):
    """Deformable DETR loss.

    For the final layer, every auxiliary decoder layer and (two-stage) the encoder proposals: match
    predictions to targets with ``matcher``, then compute each loss in ``losses``:

    - ``labels``: ``loss_ce`` = sigmoid focal loss over one-hot targets (unmatched queries are all
      zeros) * num_queries (or, with ``class_loss`` ``varifocal`` / ``ia_bce``, the IoU-aware loss of
      ``iou_aware_class_terms``, reduced the same way); plus, final layer only, ``class_error`` = 100 -
      top-1 accuracy (%) of the matched queries (logging only; 100 when the batch has no target, as in the
      official).
    - ``boxes``: ``loss_bbox`` = L1 and ``loss_giou`` = 1 - GIoU, summed over matched pairs.
    - ``cardinality``: ``cardinality_error`` = mean |#queries whose max sigmoid > 0.5 - #targets|
      (logging only, no gradient). This follows transformers; the official counts queries whose
      argmax is not the last class, a leftover of DETR's no-object class that is meaningless with
      sigmoid classification.

    Every loss (and the focal term) is divided by ``num_boxes``, see ``average_num_boxes``.

    Training variants, from the model's outputs: ``interm_outputs`` (DINO's selected proposals, matched to
    the real labels: ``<name>_interm``), ``one2many_outputs`` (hybrid matching: matched to the targets
    repeated ``one2many_k`` times, normalised by that many boxes: ``<name>_one2many`` and
    ``<name>_one2many_{i}``) and ``dn_outputs`` (denoising: each positive query assigned its own box, no
    matching, normalised by ``num_boxes * num_groups``: ``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn``
    and ``_dn_{i}`` per earlier layer; zeros when the batch has no box).

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
        class_loss: str = LossConfig.class_loss,
        class_loss_alpha: float | None = None,
        one2many_k: int = 1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        LossConfig(class_loss=class_loss)  # an unknown class loss fails here
        self.class_loss = class_loss
        # the IoU-aware losses' alpha: varifocal's negative weight, ia_bce's score exponent
        defaults = {"varifocal": LossConfig.varifocal_alpha, "ia_bce": LossConfig.ia_bce_alpha}
        self.class_loss_alpha = class_loss_alpha if class_loss_alpha is not None else defaults.get(class_loss)
        self.one2many_k = one2many_k
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
        self.pad_pairs = False  # compile_losses(pad_pairs=True): every stack's pairs padded to pair_bound

    def loss_labels(self, matched: Matched, num_boxes: torch.Tensor, log: bool = True) -> dict[str, torch.Tensor]:
        """``loss_ce`` (num_layers,) and, when ``log``, ``class_error`` of the last layer (scalar)."""
        logits = matched.logits  # (N, B, Q, C)
        num_queries = logits.shape[2]
        one_hot = torch.zeros_like(logits)  # (N, B, Q, C)
        positives = (matched.layer, matched.image, matched.query, matched.labels)
        valid = matched.valid
        if valid is None:
            one_hot[positives] = 1
        else:  # real pairs are distinct; padding pairs add 0 where they point
            one_hot.index_put_(positives, valid, accumulate=True)
        if self.class_loss == "focal":
            terms = sigmoid_focal_loss_terms(logits, one_hot, self.focal_alpha, self.focal_gamma)  # (N, B, Q, C)
        else:
            with torch.no_grad():
                pred = matched.boxes[matched.layer, matched.image, matched.query]  # (M, 4)
                ious = box_iou_elementwise(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(matched.target_boxes))  # (M,)
                scores = logits[positives].sigmoid()  # (M,)
                soft = torch.zeros_like(logits)  # (N, B, Q, C)
                soft_targets = iou_aware_targets(self.class_loss, scores, ious, self.class_loss_alpha)  # (M,)
                if valid is None:
                    soft[positives] = soft_targets
                else:
                    soft.index_put_(positives, soft_targets * valid, accumulate=True)
            terms = iou_aware_class_terms(
                self.class_loss, logits, one_hot, soft, self.class_loss_alpha, self.focal_gamma
            )  # (N, B, Q, C)
        loss_ce = terms.mean(2).sum((1, 2)) / num_boxes * num_queries  # (N,)
        losses = {"loss_ce": loss_ce}
        if log and valid is None:
            last = matched.last_layer
            last_logits = logits[-1][matched.image[last], matched.query[last]]  # (M_last, C)
            losses["class_error"] = 100 - self._top1_accuracy(last_logits, matched.labels[last])
        elif log:
            in_last = valid * (matched.layer == logits.shape[0] - 1)  # (M,) the real pairs of the last layer
            matched_logits = logits[matched.layer, matched.image, matched.query]  # (M, C)
            losses["class_error"] = 100 - self._masked_top1_accuracy(matched_logits, matched.labels, in_last)
        return losses

    @staticmethod
    @torch.no_grad()
    def _masked_top1_accuracy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``_top1_accuracy`` of the rows whose weight is 1 (weights 0 or 1); 0 without such rows."""
        count = weights.sum()
        correct = ((logits.argmax(-1) == labels).float() * weights).sum()
        return torch.where(count > 0, correct / count.clamp(min=1) * 100, torch.zeros_like(count))

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
        giou_cost = 1 - giou  # (M,)
        if matched.valid is not None:  # padding pairs: no value, no gradient
            l1, giou_cost = l1 * matched.valid, giou_cost * matched.valid
        zeros = matched.boxes.new_zeros(matched.boxes.shape[0])  # (N,)
        loss_bbox = zeros.index_add(0, matched.layer, l1) / num_boxes
        loss_giou = zeros.index_add(0, matched.layer, giou_cost) / num_boxes
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
        num_boxes: torch.Tensor | Sequence[torch.Tensor],
    ) -> list[dict[str, torch.Tensor]]:
        """Matches and computes the losses of several stacks of layers.

        Args:
            stacks: ``(logits (N, B, Q, C), boxes (N, B, Q, 4), padded targets, log)`` per stack;
                ``log`` adds the last layer's ``class_error``.
            num_boxes: the normaliser, or one per stack.

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
        normalisers = [num_boxes] * len(stacks) if isinstance(num_boxes, torch.Tensor) else list(num_boxes)
        results = []
        for (logits, boxes, padded, log), layer_indices, indices, normaliser in zip(
            stacks, matches, on_device, normalisers, strict=True
        ):
            matched = self._matched(logits, boxes, padded, layer_indices, indices.unbind(0))
            if self.pad_pairs:
                matched = pad_matched(matched, pair_bound(logits))
            results.append(matched_losses(matched, normaliser, log))
        return results

    def matched_losses(self, matched: Matched, num_boxes: torch.Tensor, log: bool) -> dict[str, torch.Tensor]:
        """Every configured loss of one matched stack: loss name -> (num_layers,) values (``class_error``,
        added when ``log``, a scalar). Device work only, no host read: what ``compile_losses`` compiles."""
        losses: dict[str, torch.Tensor] = {}
        for loss in self.losses:
            kwargs = {"log": log} if loss == "labels" else {}
            losses.update(self.loss_table[loss](matched, num_boxes, **kwargs))
        return losses

    def compile_losses(self, pad_pairs: bool = False, **options) -> None:
        """Runs ``matched_losses`` through ``torch.compile(**options)`` from now on; the matching before
        it stays eager (scipy on the host). Like ``nn.Module.compile``: in place, nothing registered.
        ``pad_pairs``: every stack's matched pairs padded to ``pair_bound`` with a mask (``pad_matched``),
        so the compiled losses see one number of pairs per stack shape (the same losses within float32
        rounding)."""
        self.pad_pairs = pad_pairs
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
            ``<name>_enc`` for ``enc_outputs`` (no ``class_error`` for either); with the training
            variants' outputs (class docstring) ``<name>_interm``, ``<name>_one2many[_{i}]`` and
            ``loss_{ce,bbox,giou}_dn[_{i}]``.
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
            # (suffix, layers first to final, padded targets, normaliser, log) of every matched stack
            stacks = [("", _layers(outputs), padded, num_boxes, True)]
            if "enc_outputs" in outputs:
                stacks.append(("_enc", [outputs["enc_outputs"]], padded.class_agnostic(), num_boxes, False))
            if "interm_outputs" in outputs:
                stacks.append(("_interm", [outputs["interm_outputs"]], padded, num_boxes, False))
            if "one2many_outputs" in outputs:
                repeated = repeat_targets(targets, self.one2many_k)
                stacks.append(
                    (
                        "_one2many",
                        _layers(outputs["one2many_outputs"]),
                        pad_targets(repeated, device),
                        average_num_boxes(repeated, device, sync=sync_num_boxes),
                        False,
                    )
                )
            results = self.stack_losses(
                [(*_stacked(layers), stack_padded, log) for _, layers, stack_padded, _, log in stacks],
                [normaliser for *_, normaliser, _ in stacks],
            )
            losses = {"class_error": results[0]["class_error"]} if "class_error" in results[0] else {}
            for (suffix, layers, *_), result in zip(stacks, results, strict=True):
                losses.update(_named_by_layer(result, suffix, len(layers)))
            if "dn_outputs" in outputs:
                losses.update(self.denoising_losses(outputs["dn_outputs"], outputs["denoising"], padded, num_boxes))
        return losses

    def denoising_losses(
        self, dn_outputs: dict, denoising: DenoisingQueries | None, padded: PaddedTargets, num_boxes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``loss_{ce,bbox,giou}_dn`` and ``_dn_{i}`` per earlier layer: each positive denoising query
        assigned its own box (no matching), normalised by ``num_boxes * num_groups``; zeros (with the
        outputs' gradient, none) when the batch had no box."""
        layers = _layers(dn_outputs)
        logits, boxes = _stacked(layers)
        num_layers = len(layers)
        if denoising is None:
            zeros = logits.sum() * 0 + logits.new_zeros(num_layers)  # (N,), still in the graph
            return _named_by_layer({"loss_ce": zeros, "loss_bbox": zeros, "loss_giou": zeros}, "_dn", num_layers)
        num_positives = len(denoising.positive_query)
        image, query, target = denoising.positive_image, denoising.positive_query, denoising.positive_target
        matched = Matched(
            logits=logits.float(),
            boxes=boxes.float(),
            layer=torch.arange(num_layers, device=logits.device).repeat_interleave(num_positives),
            image=image.repeat(num_layers),
            query=query.repeat(num_layers),
            labels=padded.labels[image, target].repeat(num_layers),
            target_boxes=padded.boxes[image, target].repeat(num_layers, 1),
            num_targets=padded.valid.sum(1).float(),
            last_layer=slice((num_layers - 1) * num_positives, None),
        )
        normaliser = num_boxes * denoising.num_groups
        losses = {**self.loss_labels(matched, normaliser, log=False), **self.loss_boxes(matched, normaliser)}
        return _named_by_layer(losses, "_dn", num_layers)

    def weighted_total(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum(loss_dict[name] * weight)`` over ``weight_dict``; every weighted name must be present, but
        for the training-only branches' (``_dn``, ``_one2many``), which count where present (training)."""
        missing = [name for name in self.weight_dict if name not in loss_dict and not _training_only(name)]
        if missing:
            raise KeyError(
                f"SetCriterion.weighted_total: weighted loss(es) {missing} missing from the loss dict "
                f"(has {sorted(loss_dict)}); do aux_loss / two_stage / dec_layers match the model's outputs?"
            )
        return sum(loss_dict[name] * weight for name, weight in self.weight_dict.items() if name in loss_dict)


TRAINING_ONLY = ("_dn", "_one2many")  # loss-name parts of the branches that exist only in training


def _training_only(name: str) -> bool:
    return any(part in name for part in TRAINING_ONLY)


def _layers(outputs: dict) -> list[dict[str, torch.Tensor]]:
    """The layer outputs of a decoder output dict, first layer first, final (the dict itself) last."""
    return [*(outputs.get("aux_outputs") or []), outputs]


def _stacked(layers: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, B, Q, C), boxes (N, B, Q, 4)) of ``layers``."""
    return torch.stack([layer["pred_logits"] for layer in layers]), torch.stack([layer["pred_boxes"] for layer in layers])


def _named_by_layer(losses: dict[str, torch.Tensor], suffix: str, num_layers: int) -> dict[str, torch.Tensor]:
    """(num_layers,) loss values as scalars: the last layer's ``<name><suffix>``, layer i's
    ``<name><suffix>_{i}``; ``class_error`` left out."""
    named = {}
    for name, value in losses.items():
        if name == "class_error":
            continue
        named[name + suffix] = value[-1]
        named.update({f"{name}{suffix}_{layer}": value[layer] for layer in range(num_layers - 1)})
    return named


def build_weight_dict(
    dec_layers: int,
    aux_loss: bool,
    two_stage: bool,
    loss: LossConfig,
    config: DeformableDETRConfig | None = None,
) -> dict[str, float]:
    """Weights of the final-layer losses plus ``_0``..``_{dec_layers-2}`` (aux) and ``_enc`` copies; with
    ``config``'s training variants also the ``_dn[_{i}]`` copies (denoising) and the ``_one2many[_{i}]``
    ones times ``hybrid.loss_weight``."""
    base = {"loss_ce": loss.cls_loss_coef, "loss_bbox": loss.bbox_loss_coef, "loss_giou": loss.giou_loss_coef}
    layers: Iterable[str] = [""]
    if aux_loss:
        layers = [*layers, *(f"_{layer}" for layer in range(dec_layers - 1))]
    weights = {name + suffix: weight for suffix in layers for name, weight in base.items()}
    if two_stage:  # DINO's encoder loss is on its selected proposals (interm_outputs)
        encoder = "_interm" if config is not None and config.variant == "dino" else "_enc"
        weights.update({name + encoder: weight for name, weight in base.items()})
    if config is not None and config.denoising.enabled:
        weights.update({f"{name}_dn{suffix}": weight for suffix in layers for name, weight in base.items()})
    if config is not None and config.hybrid.enabled:
        factor = config.hybrid.loss_weight
        weights.update({f"{name}_one2many{suffix}": w * factor for suffix in layers for name, w in base.items()})
    return weights
