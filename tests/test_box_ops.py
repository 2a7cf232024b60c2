"""Box conversions and (G)IoU against values computed by hand."""

import pytest
import torch

from ddetr.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    generalized_box_iou_elementwise,
)

UNIT = [0.0, 0.0, 1.0, 1.0]


def test_cxcywh_to_xyxy_by_hand():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), expected)


def test_xyxy_to_cxcywh_by_hand_and_round_trip():
    boxes = torch.tensor([[8.0, 17.0, 12.0, 23.0]])
    torch.testing.assert_close(box_xyxy_to_cxcywh(boxes), torch.tensor([[10.0, 20.0, 4.0, 6.0]]))
    generator = torch.Generator().manual_seed(0)
    random_boxes = torch.rand(2, 7, 4, generator=generator)  # any leading dims
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(random_boxes)), random_boxes)


def test_box_area_by_hand():
    torch.testing.assert_close(box_area(torch.tensor([UNIT, [1.0, 2.0, 4.0, 2.5]])), torch.tensor([1.0, 1.5]))


def test_iou_and_union_of_unit_squares_offset_by_half():
    # intersection 0.5 x 1 = 0.5, union 1 + 1 - 0.5 = 1.5 -> IoU 1/3
    iou, union = box_iou(torch.tensor([UNIT]), torch.tensor([[0.5, 0.0, 1.5, 1.0]]))
    torch.testing.assert_close(iou, torch.tensor([[1 / 3]]))
    torch.testing.assert_close(union, torch.tensor([[1.5]]))


def test_giou_by_hand():
    boxes1 = torch.tensor([UNIT])
    boxes2 = torch.tensor(
        [
            UNIT,  # identical: 1
            [0.5, 0.0, 1.5, 1.0],  # enclosing box == union (1.5): GIoU = IoU = 1/3
            [0.5, 0.5, 1.5, 1.5],  # inter 0.25, union 1.75, enclosing 2.25: 1/7 - 0.5/2.25 = -5/63
            [2.0, 0.0, 3.0, 1.0],  # disjoint: IoU 0, union 2, enclosing 3: -1/3
            [-1.0, -1.0, 2.0, 2.0],  # contains the unit square: IoU 1/9, enclosing == union: 1/9
        ]
    )
    expected = torch.tensor([[1.0, 1 / 3, -5 / 63, -1 / 3, 1 / 9]])
    torch.testing.assert_close(generalized_box_iou(boxes1, boxes2), expected)
    iou, _ = box_iou(boxes1, boxes2)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 1 / 3, 1 / 7, 0.0, 1 / 9]]))


def test_giou_properties_on_random_boxes():
    generator = torch.Generator().manual_seed(1)
    boxes1 = box_cxcywh_to_xyxy(torch.rand(6, 4, generator=generator) * 0.9 + 0.05)
    boxes2 = box_cxcywh_to_xyxy(torch.rand(5, 4, generator=generator) * 0.9 + 0.05)
    giou = generalized_box_iou(boxes1, boxes2)
    iou, _ = box_iou(boxes1, boxes2)
    assert giou.shape == (6, 5)
    assert (giou <= iou + 1e-6).all()
    assert (giou >= -1).all() and (giou <= 1).all()
    torch.testing.assert_close(generalized_box_iou(boxes2, boxes1), giou.T)
    torch.testing.assert_close(torch.diag(generalized_box_iou(boxes1, boxes1)), torch.ones(6))


def test_giou_rejects_degenerate_boxes():
    good = torch.tensor([UNIT])
    bad = torch.tensor([UNIT, [0.6, 0.0, 0.4, 1.0]])  # x1 < x0
    with pytest.raises(ValueError, match=r"boxes2 has 1 degenerate.*x1 < x0.*index 1"):
        generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="boxes1"):
        generalized_box_iou(bad, good)


def test_giou_passes_nan_through():
    # NaN is not "degenerate": it reaches the result so the matcher can report it per image
    giou = generalized_box_iou(torch.tensor([[float("nan")] * 4]), torch.tensor([UNIT]))
    assert giou.isnan().all()


def test_empty_inputs():
    assert generalized_box_iou(torch.zeros(0, 4), torch.tensor([UNIT])).shape == (0, 1)
    assert box_iou(torch.tensor([UNIT]), torch.zeros(0, 4))[0].shape == (1, 0)


def _giou_by_corners(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """A straightforward broadcast GIoU on the (x0, y0) / (x1, y1) corner pairs (the earlier code)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    inter = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    intersection = inter[..., 0] * inter[..., 1]
    union = area1 + area2 - intersection
    encl = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    enclosing = encl[..., 0] * encl[..., 1]
    return intersection / union - (enclosing - union) / enclosing


def test_giou_elementwise_broadcast_equals_pairwise_and_corner_formula():
    torch.manual_seed(0)
    # (layers * images, queries, 1, 4) against (layers * images, 1, targets, 4), as the matcher's cost
    centres, sizes = torch.rand(6, 30, 2), torch.rand(6, 30, 2) * 0.5 + 0.01
    pred = box_cxcywh_to_xyxy(torch.cat([centres, sizes], -1))
    target = box_cxcywh_to_xyxy(torch.cat([torch.rand(6, 5, 2), torch.rand(6, 5, 2) * 0.5 + 0.01], -1))
    target[:, 0] = pred[:, 0]  # identical boxes (GIoU 1) and ties in every min / max
    cost = generalized_box_iou_elementwise(pred[:, :, None], target[:, None])  # (6, 30, 5)
    assert cost.shape == (6, 30, 5)
    assert torch.equal(cost, _giou_by_corners(pred[:, :, None], target[:, None]))
    for index in range(6):
        assert torch.equal(cost[index], generalized_box_iou(pred[index], target[index]))
    assert torch.allclose(cost[:, 0, 0], torch.ones(6))


def test_giou_elementwise_gradients_equal_the_corner_formula():
    torch.manual_seed(1)
    pred = torch.cat([torch.rand(40, 2), torch.rand(40, 2) * 0.5 + 0.01], -1).double().requires_grad_()
    target = torch.cat([torch.rand(40, 2), torch.rand(40, 2) * 0.5 + 0.01], -1).double()
    target[:5] = pred[:5].detach()  # ties
    giou = generalized_box_iou_elementwise(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    got = torch.autograd.grad(giou.sum(), pred)[0]
    want = torch.autograd.grad(_giou_by_corners(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)).sum(), pred)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
