"""Hungarian matching between predictions and targets (one-to-one, per image)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ddetr.models.config import LossConfig
from ddetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# Added inside the logs of the focal class cost, as in the official matcher.
_LOG_EPS = 1e-8


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to targets, minimising

    ``cost_class * focal_class_cost + cost_bbox * L1(boxes) + cost_giou * (-GIoU(boxes))``.

    The class cost at the target's class is the focal-loss difference
    ``alpha * (1 - p)^gamma * (-log(p + 1e-8)) - (1 - alpha) * p^gamma * (-log(1 - p + 1e-8))`` with
    ``p = sigmoid(logit)``. The cost matrix of the whole batch is built at once; the assignment is
    solved per image with ``scipy.optimize.linear_sum_assignment``. Every image gets
    ``min(num_queries, num_targets)`` pairs.
    """

    def __init__(
        self,
        cost_class: float = LossConfig.set_cost_class,
        cost_bbox: float = LossConfig.set_cost_bbox,
        cost_giou: float = LossConfig.set_cost_giou,
        focal_alpha: float = LossConfig.focal_alpha,
        focal_gamma: float = 2.0,
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
    def cost_matrix(self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Cost of every query of the batch against every target of the batch.

        Returns:
            (batch_size, num_queries, total_num_targets) float32; only the block of image ``i``'s own
            targets is used for image ``i``.
        """
        batch_size, num_queries = outputs["pred_logits"].shape[:2]
        probabilities = outputs["pred_logits"].flatten(0, 1).float().sigmoid()  # (B*Q, C)
        pred_boxes = outputs["pred_boxes"].flatten(0, 1).float()  # (B*Q, 4)
        target_labels = torch.cat([target["labels"] for target in targets])  # (T,)
        target_boxes = torch.cat([target["boxes"] for target in targets]).float()  # (T, 4)

        class_cost = self.class_cost(probabilities[:, target_labels])  # (B*Q, T)
        bbox_cost = torch.cdist(pred_boxes, target_boxes, p=1)  # (B*Q, T)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))  # (B*Q, T)
        cost = self.cost_class * class_cost + self.cost_bbox * bbox_cost + self.cost_giou * giou_cost
        return cost.view(batch_size, num_queries, -1)  # (B, Q, T)

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
                input.
        """
        batch_size, num_queries = outputs["pred_logits"].shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher: {len(targets)} target dicts for a batch of {batch_size} images")
        sizes = [len(target["boxes"]) for target in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]

        cost = self.cost_matrix(outputs, targets)  # (B, Q, T)
        per_image_cost = cost.split(sizes, dim=-1)  # B tensors (B, Q, num_targets_i)
        # one device->host transfer for the finiteness flags of every image
        finite = torch.stack([block[image].isfinite().all() for image, block in enumerate(per_image_cost)])  # (B,)
        # an infinite logit still gives a finite cost (sigmoid saturates) but a non-finite loss: refuse it too
        finite &= outputs["pred_logits"].flatten(1).isfinite().all(dim=1)
        finite &= outputs["pred_boxes"].flatten(1).isfinite().all(dim=1)
        finite = finite.cpu().tolist()
        cost = cost.cpu()
        per_image_cost = cost.split(sizes, dim=-1)

        indices = []
        for image, block in enumerate(per_image_cost):
            if not finite[image]:
                raise ValueError(self._non_finite_message(image, outputs, targets[image]))
            if sizes[image] == 0:
                indices.append((empty, empty))
                continue
            pred_indices, target_indices = linear_sum_assignment(block[image].numpy())
            indices.append(
                (torch.as_tensor(pred_indices, dtype=torch.int64), torch.as_tensor(target_indices, dtype=torch.int64))
            )
        return indices

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
