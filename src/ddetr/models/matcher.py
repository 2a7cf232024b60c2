"""Hungarian matching between predictions and targets (one-to-one, per image)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ddetr.boxes import box_cxcywh_to_xyxy, generalized_box_iou_elementwise
from ddetr.models.config import LossConfig

Indices = list[tuple[torch.Tensor, torch.Tensor]]

# Added inside the logs of the focal class cost, as in the official matcher.
_LOG_EPS = 1e-8


class NonFinitePredictionError(ValueError):
    """The matcher got a NaN or infinite predicted logit or box (the model diverged); the message names
    the image. Found in the matcher's one device-to-host transfer, so the training step needs no check
    (and no synchronisation) of its own before the loss."""


@dataclass(frozen=True)
class PaddedTargets:
    """The targets of a batch padded to the largest count.

    ``labels`` (batch_size, max_targets) int64 (0 on padding); ``boxes`` (batch_size, max_targets, 4)
    float32 cxcywh (a unit box on padding, so costs stay finite); ``valid`` (batch_size, max_targets)
    bool; ``sizes`` the Python count of every image.
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor
    sizes: list[int]

    def class_agnostic(self) -> PaddedTargets:
        """The same targets with every label 0 (the two-stage proposals' single class)."""
        return PaddedTargets(torch.zeros_like(self.labels), self.boxes, self.valid, self.sizes)


def pad_targets(targets: list[dict[str, torch.Tensor]], device: torch.device) -> PaddedTargets:
    """Pads ``labels`` and ``boxes`` of every target dict to the largest count (no device sync)."""
    sizes = [len(target["boxes"]) for target in targets]
    max_targets = max(sizes, default=0)
    labels = torch.zeros(len(targets), max_targets, dtype=torch.int64, device=device)
    boxes = torch.full((len(targets), max_targets, 4), 0.5, device=device)
    boxes[..., 2:] = 1.0
    valid = torch.zeros(len(targets), max_targets, dtype=torch.bool, device=device)
    for image, target in enumerate(targets):  # copies and fills only: nothing waits for the device
        labels[image, : sizes[image]] = target["labels"]
        boxes[image, : sizes[image]] = target["boxes"]
        valid[image, : sizes[image]] = True
    return PaddedTargets(labels, boxes, valid, sizes)


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to targets, minimising

    ``cost_class * focal_class_cost + cost_bbox * L1(boxes) + cost_giou * (-GIoU(boxes))``.

    The class cost at the target's class is the focal-loss difference
    ``alpha * (1 - p)^gamma * (-log(p + 1e-8)) - (1 - alpha) * p^gamma * (-log(1 - p + 1e-8))`` with
    ``p = sigmoid(logit)``. The cost of a whole stack of layers and images is built at once (targets
    padded), moved to the host in one transfer, and the assignment solved per (layer, image) with
    ``scipy.optimize.linear_sum_assignment``. Every image gets
    ``min(num_queries, num_targets)`` pairs.
    """

    def __init__(
        self,
        cost_class: float = LossConfig.set_cost_class,
        cost_bbox: float = LossConfig.set_cost_bbox,
        cost_giou: float = LossConfig.set_cost_giou,
        focal_alpha: float = LossConfig.focal_alpha,
        focal_gamma: float = LossConfig.focal_gamma,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0, the matching would be arbitrary")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def class_cost(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Focal class cost of probabilities already gathered at the target classes (any shape)."""
        alpha, gamma = self.focal_alpha, self.focal_gamma
        positive = alpha * (1 - probabilities) ** gamma * -(probabilities + _LOG_EPS).log()
        negative = (1 - alpha) * probabilities**gamma * -(1 - probabilities + _LOG_EPS).log()
        return positive - negative

    @torch.no_grad()
    def cost_matrix(
        self, logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor, target_boxes: torch.Tensor
    ) -> torch.Tensor:
        """Cost of every query against every (padded) target of its image, for a stack of layers.

        Args:
            logits: (num_layers, batch_size, num_queries, num_classes).
            boxes: (num_layers, batch_size, num_queries, 4) normalised cxcywh.
            target_labels: (batch_size, max_targets) int64, padded.
            target_boxes: (batch_size, max_targets, 4) normalised cxcywh, padded with valid boxes.

        Returns:
            (num_layers, batch_size, num_queries, max_targets) float32; columns past an image's own
            targets are padding.
        """
        num_layers, batch_size, num_queries, _ = logits.shape
        probabilities = logits.float().sigmoid()  # (N, B, Q, C)
        index = target_labels[None, :, None, :].expand(num_layers, batch_size, num_queries, -1)  # (N, B, Q, T)
        class_cost = self.class_cost(probabilities.gather(3, index))  # (N, B, Q, T)
        pred_boxes = boxes.float().flatten(0, 1)  # (N*B, Q, 4)
        target_boxes = target_boxes.float().repeat(num_layers, 1, 1)  # (N*B, T, 4)
        bbox_cost = torch.cdist(pred_boxes, target_boxes, p=1)  # (N*B, Q, T)
        giou = generalized_box_iou_elementwise(
            box_cxcywh_to_xyxy(pred_boxes)[:, :, None], box_cxcywh_to_xyxy(target_boxes)[:, None]
        )  # (N*B, Q, T)
        cost = self.cost_bbox * bbox_cost - self.cost_giou * giou
        return self.cost_class * class_cost + cost.view(num_layers, batch_size, num_queries, -1)

    @torch.no_grad()
    def match(self, groups: Sequence[tuple[torch.Tensor, torch.Tensor, PaddedTargets]]) -> list[list[Indices]]:
        """Matches stacks of layers at once: one cost computation per stack, one device-to-host transfer.

        Args:
            groups: ``(logits (num_layers, batch_size, num_queries, num_classes), boxes (num_layers,
                batch_size, num_queries, 4), padded targets)`` per stack (e.g. the decoder layers, and
                the two-stage proposals with their class-agnostic targets).

        Returns:
            Per group, per layer, the indices of :meth:`forward`.

        Raises:
            NonFinitePredictionError: some predicted logit or box is NaN or inf (the message names the image).
            ValueError: as :meth:`forward`, naming the image; also for target boxes of negative size.
        """
        with torch.autocast(groups[0][0].device.type, enabled=False):
            packed, layout = [], []
            for logits, boxes, padded in groups:
                num_layers, batch_size = logits.shape[:2]
                if padded.labels.shape[0] != batch_size:
                    raise ValueError(
                        f"HungarianMatcher: {padded.labels.shape[0]} target dicts for a batch of {batch_size} images"
                    )
                cost = self.cost_matrix(logits, boxes, padded.labels, padded.boxes)  # (N, B, Q, T)
                finite = (cost.isfinite() | ~padded.valid[None, :, None, :]).flatten(2).all(2)  # (N, B)
                # an infinite logit still gives a finite cost (sigmoid saturates) but a non-finite loss
                finite &= logits.flatten(2).isfinite().all(2) & boxes.flatten(2).isfinite().all(2)
                negative = ((padded.boxes[..., 2:] < 0).any(-1) & padded.valid).any(1)  # (B,)
                packed += [cost.flatten(), finite.flatten().float(), negative.float()]
                layout.append((cost.shape, finite.shape))
            host = torch.cat(packed).cpu().numpy()  # the one device-to-host transfer
        results, offset = [], 0
        for (logits, boxes, padded), (cost_shape, finite_shape) in zip(groups, layout):
            parts = []
            for numel in (cost_shape.numel(), finite_shape.numel(), cost_shape[1]):
                parts.append(host[offset : offset + numel])
                offset += numel
            cost, finite, negative = parts[0].reshape(cost_shape), parts[1].reshape(finite_shape), parts[2]
            results.append(self._assign(cost, finite > 0, negative > 0, logits, boxes, padded))
        return results

    def _assign(self, cost, finite, negative, logits, boxes, padded) -> list[Indices]:
        """scipy's assignment per (layer, image) of a host (numpy) cost (num_layers, batch_size, Q, T)."""
        empty = torch.empty(0, dtype=torch.int64)
        for image in np.flatnonzero(negative):
            raise ValueError(
                f"HungarianMatcher: image {image} of the batch has target boxes of negative width or height "
                "(expected normalised cxcywh)"
            )
        layers = []
        for layer in range(cost.shape[0]):
            indices = []
            for image, size in enumerate(padded.sizes):
                if not finite[layer, image]:
                    outputs = {"pred_logits": logits[layer], "pred_boxes": boxes[layer]}
                    target = {"boxes": padded.boxes[image, :size]}
                    predictions_finite = all(bool(outputs[key][image].isfinite().all()) for key in outputs)
                    error = ValueError if predictions_finite else NonFinitePredictionError
                    raise error(self._non_finite_message(image, outputs, target))
                if size == 0:
                    indices.append((empty, empty))
                    continue
                pred_indices, target_indices = linear_sum_assignment(cost[layer, image, :, :size])
                indices.append(
                    (torch.from_numpy(pred_indices.astype(np.int64)), torch.from_numpy(target_indices.astype(np.int64)))
                )
            layers.append(indices)
        return layers

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> Indices:
        """Match every image's queries to its targets.

        Args:
            outputs: ``pred_logits`` (batch_size, num_queries, num_classes) and ``pred_boxes``
                (batch_size, num_queries, 4) normalised cxcywh. Other keys are ignored.
            targets: one dict per image with ``labels`` int64 (num_targets,) and ``boxes``
                (num_targets, 4) normalised cxcywh.

        Returns:
            One ``(pred_indices, target_indices)`` pair of int64 CPU tensors per image, each of length
            ``min(num_queries, num_targets)``, ``pred_indices`` ascending.

        Raises:
            ValueError: the predictions or the cost of some image are not finite (NaN or inf in its
                predictions or targets); the message names the image's index in the batch and the bad
                input. Non-finite predictions raise the subclass ``NonFinitePredictionError``.
        """
        batch_size = outputs["pred_logits"].shape[0]
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher: {len(targets)} target dicts for a batch of {batch_size} images")
        padded = pad_targets(targets, outputs["pred_logits"].device)
        return self.match([(outputs["pred_logits"][None], outputs["pred_boxes"][None], padded)])[0][0]

    @staticmethod
    def _non_finite_message(image: int, outputs: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> str:
        problems = []
        for name, tensor in (
            ("pred_logits", outputs["pred_logits"][image]),
            ("pred_boxes", outputs["pred_boxes"][image]),
            ("target boxes", target["boxes"]),
        ):
            num_nan = int(tensor.isnan().sum())
            num_inf = int(tensor.isinf().sum())
            if num_nan or num_inf:
                problems.append(f"{name} has {num_nan} NaN and {num_inf} inf value(s)")
        if not problems:
            problems.append("the inputs are finite but the cost overflowed (e.g. zero-area boxes in the GIoU)")
        return (
            f"HungarianMatcher: non-finite matching cost for image {image} of the batch: "
            + "; ".join(problems)
            + ". The model has probably diverged (check the learning rate, gradient clipping and AMP)."
        )
