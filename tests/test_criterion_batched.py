"""The batched criterion (all decoder layers and the encoder proposals at once) equals the loss computed
one layer at a time, image by image, as the official code does."""

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ddetr.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from ddetr.models.build import build_criterion
from ddetr.models.criterion import sigmoid_focal_loss
from test_criterion import random_batch

ALPHA, COSTS = 0.25, (2.0, 5.0, 2.0)  # focal alpha; class, L1, GIoU matcher costs


def reference_match(logits, boxes, targets):
    """Per image: the official cost (focal class cost, L1, -GIoU) and scipy's assignment."""
    indices = []
    for image, target in enumerate(targets):
        if len(target["labels"]) == 0:
            indices.append(([], []))
            continue
        p = logits[image].sigmoid()[:, target["labels"]]  # (Q, T)
        class_cost = ALPHA * (1 - p) ** 2 * -(p + 1e-8).log() - (1 - ALPHA) * p**2 * -(1 - p + 1e-8).log()
        l1 = torch.cdist(boxes[image], target["boxes"], p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[image]), box_cxcywh_to_xyxy(target["boxes"]))
        cost = COSTS[0] * class_cost + COSTS[1] * l1 - COSTS[2] * giou
        rows, cols = linear_sum_assignment(cost.numpy())
        indices.append((rows.tolist(), cols.tolist()))
    return indices


def reference_layer(layer, targets, num_boxes, log):
    """The loss terms of one layer, computed the way of the official per-layer criterion."""
    logits, boxes = layer["pred_logits"], layer["pred_boxes"]
    indices = reference_match(logits.detach(), boxes.detach(), targets)
    one_hot = torch.zeros_like(logits)
    matched_pred, matched_target, matched_logits, matched_labels = [], [], [], []
    for image, (rows, cols) in enumerate(indices):
        for row, col in zip(rows, cols):
            label = targets[image]["labels"][col]
            one_hot[image, row, label] = 1
            matched_pred.append(boxes[image, row])
            matched_target.append(targets[image]["boxes"][col])
            matched_logits.append(logits[image, row])
            matched_labels.append(label)
    losses = {"loss_ce": sigmoid_focal_loss(logits, one_hot, num_boxes, ALPHA) * logits.shape[1]}
    if matched_pred:
        pred, target = torch.stack(matched_pred), torch.stack(matched_target)
        losses["loss_bbox"] = F.l1_loss(pred, target, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)))
        losses["loss_giou"] = (1 - giou).sum() / num_boxes
    else:
        losses["loss_bbox"] = losses["loss_giou"] = torch.zeros(())
    if log:
        correct = [int(lg.argmax() == lb) for lg, lb in zip(matched_logits, matched_labels)]
        losses["class_error"] = torch.tensor(100 - (100 * sum(correct) / len(correct) if correct else 0.0))
    confident = (logits.sigmoid().amax(-1) > 0.5).sum(1).float()
    counts = torch.tensor([float(len(t["labels"])) for t in targets])
    losses["cardinality_error"] = (confident - counts).abs().mean()
    return losses


@pytest.mark.parametrize(("sizes", "seed"), [([2, 0, 4], 0), ([1, 6], 1), ([12, 3, 5], 2), ([0, 0], 3)])
def test_batched_equals_per_layer(sizes, seed):
    outputs, targets = random_batch(sizes, num_classes=5, num_aux=3, seed=seed, enc=True)
    criterion = build_criterion(num_classes=5, dec_layers=4, two_stage=True)
    losses = criterion(outputs, targets)
    num_boxes = max(float(sum(sizes)), 1.0)
    expected = reference_layer(outputs, targets, num_boxes, log=True)
    for layer, aux in enumerate(outputs["aux_outputs"]):
        expected.update({f"{k}_{layer}": v for k, v in reference_layer(aux, targets, num_boxes, False).items()})
    agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    expected.update(
        {f"{k}_enc": v for k, v in reference_layer(outputs["enc_outputs"], agnostic, num_boxes, False).items()}
    )
    assert set(losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value.to(losses[name].dtype), atol=1e-6, rtol=1e-6, msg=name)


def test_batched_losses_run_in_float32_under_autocast():
    outputs, targets = random_batch([3, 2], num_classes=5, num_aux=1, seed=5, enc=True)
    half = {
        **{k: v.bfloat16() for k, v in outputs.items() if k.startswith("pred_")},
        "aux_outputs": [{k: v.bfloat16() for k, v in layer.items()} for layer in outputs["aux_outputs"]],
        "enc_outputs": {k: v.bfloat16() for k, v in outputs["enc_outputs"].items()},
    }
    criterion = build_criterion(num_classes=5, dec_layers=2, two_stage=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = criterion(half, targets)
    assert all(value.dtype == torch.float32 for value in losses.values())
