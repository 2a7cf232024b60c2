"""Model outputs -> per-image detections (top-k over queries x classes, absolute xyxy boxes)."""

from __future__ import annotations

import torch
from torch import nn

from ddetr.boxes import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Keep the ``num_select`` highest (query, class) sigmoid scores of every image.

    A query may appear several times with different classes, as in the official.
    """

    def __init__(self, num_select: int) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"PostProcess: num_select must be >= 1, got {num_select}")
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections of every image.

        Args:
            outputs: ``pred_logits`` (batch_size, num_queries, num_classes) and ``pred_boxes``
                (batch_size, num_queries, 4) normalised cxcywh.
            target_sizes: (batch_size, 2) as (height, width) to scale the boxes to: the original
                image size for evaluation, the augmented unpadded size for visualisation.

        Returns:
            One dict per image: ``scores`` (K,) sigmoid probabilities, descending; ``labels`` (K,)
            int64 head indices; ``boxes`` (K, 4) absolute (x0, y0, x1, y1). K is
            ``min(num_select, num_queries * num_classes)``. Scores and boxes are float32 whatever the
            outputs' dtype (bfloat16 or float16 under mixed precision).
        """
        logits, pred_boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        batch_size, num_queries, num_classes = logits.shape
        if target_sizes.shape != (batch_size, 2):
            raise ValueError(
                f"PostProcess: target_sizes must be (batch_size={batch_size}, 2) as (h, w), "
                f"got {tuple(target_sizes.shape)}"
            )
        num_select = min(self.num_select, num_queries * num_classes)
        scores = logits.sigmoid().reshape(batch_size, num_queries * num_classes)  # (B, Q*C)
        top_scores, top_indices = scores.topk(num_select, dim=1)  # (B, K)
        labels = top_indices % num_classes  # (B, K)
        query_indices = top_indices // num_classes  # (B, K)
        boxes = box_cxcywh_to_xyxy(pred_boxes)  # (B, Q, 4)
        boxes = boxes.gather(1, query_indices.unsqueeze(-1).expand(-1, -1, 4))  # (B, K, 4)
        height, width = target_sizes.to(boxes).unbind(1)  # (B,), (B,)
        scale = torch.stack([width, height, width, height], dim=1)  # (B, 4)
        boxes = boxes * scale[:, None, :]  # (B, K, 4)
        return [
            {"scores": image_scores, "labels": image_labels, "boxes": image_boxes}
            for image_scores, image_labels, image_boxes in zip(top_scores, labels, boxes)
        ]
