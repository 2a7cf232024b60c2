"""Box conversions and pairwise (generalised) intersection over union.

Formats: ``cxcywh`` is (centre x, centre y, width, height); ``xyxy`` is (x0, y0, x1, y1) with
x0 <= x1 and y0 <= y1. Every function works on normalised or absolute coordinates alike.
"""

from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    center_x, center_y, width, height = boxes.unbind(-1)
    return torch.stack(
        [center_x - 0.5 * width, center_y - 0.5 * height, center_x + 0.5 * width, center_y + 0.5 * height], dim=-1
    )


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...,) area ``(x1 - x0) * (y1 - y0)``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of two sets of xyxy boxes.

    Args:
        boxes1: (num_boxes1, 4) xyxy.
        boxes2: (num_boxes2, 4) xyxy.

    Returns:
        iou: (num_boxes1, num_boxes2).
        union: (num_boxes1, num_boxes2), area of the union of every pair (used by the GIoU).
    """
    area1 = box_area(boxes1)  # (N,)
    area2 = box_area(boxes2)  # (M,)
    intersection_top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    intersection_bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    intersection_size = (intersection_bottom_right - intersection_top_left).clamp(min=0)  # (N, M, 2)
    intersection = intersection_size[..., 0] * intersection_size[..., 1]  # (N, M)
    union = area1[:, None] + area2[None, :] - intersection  # (N, M)
    return intersection / union, union


def _check_not_degenerate(boxes: torch.Tensor, name: str) -> None:
    """Raise if any box has x1 < x0 or y1 < y0 (NaN passes: callers detect non-finite values themselves)."""
    degenerate = (boxes[:, 2:] < boxes[:, :2]).any(dim=1)  # (N,)
    if degenerate.any():
        first = int(degenerate.nonzero()[0, 0])
        raise ValueError(
            f"generalized_box_iou: {name} has {int(degenerate.sum())} degenerate box(es) with x1 < x0 or y1 < y0 "
            f"(expected xyxy corners; a negative width/height in cxcywh also causes this), "
            f"e.g. index {first}: {boxes[first].tolist()}"
        )


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of two sets of xyxy boxes.

    ``giou = iou - (enclosing_area - union) / enclosing_area`` where the enclosing box is the smallest
    box holding both. Values lie in [-1, 1].

    Args:
        boxes1: (num_boxes1, 4) xyxy.
        boxes2: (num_boxes2, 4) xyxy.

    Returns:
        (num_boxes1, num_boxes2).

    Raises:
        ValueError: a box has x1 < x0 or y1 < y0 (it would give meaningless or infinite values).
            Boxes from a sigmoid in cxcywh are never degenerate; this catches format mix-ups.
    """
    _check_not_degenerate(boxes1, "boxes1")
    _check_not_degenerate(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    enclosing_top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    enclosing_bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    enclosing_size = (enclosing_bottom_right - enclosing_top_left).clamp(min=0)  # (N, M, 2)
    enclosing_area = enclosing_size[..., 0] * enclosing_size[..., 1]  # (N, M)
    return iou - (enclosing_area - union) / enclosing_area


def _iou_union_elementwise(
    boxes1: torch.Tensor, boxes2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """IoU and union of boxes paired element by element (and the unbound coordinates of both)."""
    x0_1, y0_1, x1_1, y1_1 = first = boxes1.unbind(-1)
    x0_2, y0_2, x1_2, y1_2 = second = boxes2.unbind(-1)
    area1 = (x1_1 - x0_1) * (y1_1 - y0_1)
    area2 = (x1_2 - x0_2) * (y1_2 - y0_2)
    intersection_width = (torch.min(x1_1, x1_2) - torch.max(x0_1, x0_2)).clamp(min=0)
    intersection_height = (torch.min(y1_1, y1_2) - torch.max(y0_1, y0_2)).clamp(min=0)
    intersection = intersection_width * intersection_height
    union = area1 + area2 - intersection
    return intersection / union, union, first, second


def box_iou_elementwise(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes paired element by element, broadcasting: (...) the broadcast shape without the
    last dimension (the arithmetic of :func:`generalized_box_iou_elementwise`'s IoU)."""
    return _iou_union_elementwise(boxes1, boxes2)[0]


def generalized_box_iou_elementwise(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of boxes paired element by element, broadcasting (no degenerate-box check).

    The arithmetic is that of :func:`generalized_box_iou`, so ``generalized_box_iou_elementwise(
    boxes1[:, None], boxes2[None])`` equals ``generalized_box_iou(boxes1, boxes2)``; batched costs
    and matched pairs use it without a device sync. It works on the four coordinates one by one
    (each a (...) tensor): broadcasting a (..., 1, 4) against a (..., T, 4) box tensor runs the CPU's
    kernels over runs of 2 values, many times slower than over the (..., Q, T) planes.

    Args:
        boxes1: (..., 4) xyxy.
        boxes2: (..., 4) xyxy, broadcastable with ``boxes1``.

    Returns:
        (...) the broadcast shape without the last dimension.
    """
    iou, union, (x0_1, y0_1, x1_1, y1_1), (x0_2, y0_2, x1_2, y1_2) = _iou_union_elementwise(boxes1, boxes2)
    enclosing_width = (torch.max(x1_1, x1_2) - torch.min(x0_1, x0_2)).clamp(min=0)
    enclosing_height = (torch.max(y1_1, y1_2) - torch.min(y0_1, y0_2)).clamp(min=0)
    enclosing_area = enclosing_width * enclosing_height
    return iou - (enclosing_area - union) / enclosing_area
