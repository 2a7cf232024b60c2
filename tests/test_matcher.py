"""HungarianMatcher: known optimal assignments, batching, empty targets, non-finite inputs, transformers."""

import math

import pytest
import torch

from ddetr.models.matcher import HungarianMatcher, NonFinitePredictionError


def box_at(center_x: float, center_y: float = 0.5, size: float = 0.1) -> list[float]:
    return [center_x, center_y, size, size]


def make_outputs(logits, boxes):
    return {"pred_logits": torch.tensor(logits), "pred_boxes": torch.tensor(boxes)}


def make_target(labels, boxes):
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor(boxes).reshape(-1, 4)}


def as_lists(indices):
    return [(pred.tolist(), target.tolist()) for pred, target in indices]


def random_batch(sizes, num_queries=7, num_classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(sizes)
    outputs = {
        "pred_logits": torch.randn(batch_size, num_queries, num_classes, generator=generator),
        "pred_boxes": torch.rand(batch_size, num_queries, 4, generator=generator) * 0.5 + 0.25,
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (size,), generator=generator),
            "boxes": torch.rand(size, 4, generator=generator) * 0.5 + 0.25,
        }
        for size in sizes
    ]
    return outputs, targets


def test_class_cost_by_hand():
    matcher = HungarianMatcher()
    # p = 0.5: 0.25 * 0.25 * ln 2 - 0.75 * 0.25 * ln 2 = -0.125 ln 2
    torch.testing.assert_close(matcher.class_cost(torch.tensor(0.5)), torch.tensor(-0.125 * math.log(2)))
    # p = 0.9: 0.25 * 0.01 * -ln 0.9 - 0.75 * 0.81 * -ln 0.1
    expected = 0.25 * 0.01 * -math.log(0.9) - 0.75 * 0.81 * -math.log(0.1)
    torch.testing.assert_close(matcher.class_cost(torch.tensor(0.9)), torch.tensor(expected))


def test_l1_only_optimum_beats_greedy():
    # L1 costs (x only differs): q0-t0 0.05, q0-t1 0.40, q1-t0 0.05, q1-t1 0.50.
    # Greedy (q0-t0 first) totals 0.55; the optimum q0-t1, q1-t0 totals 0.45.
    matcher = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0)
    outputs = make_outputs([[[0.0], [0.0]]], [[box_at(0.5), box_at(0.6)]])
    targets = [make_target([0, 0], [box_at(0.55), box_at(0.1)])]
    assert as_lists(matcher(outputs, targets)) == [([0, 1], [1, 0])]


def test_class_cost_decides_between_identical_boxes():
    matcher = HungarianMatcher()  # official costs
    box = box_at(0.5)
    # query 0 is confident in class 1, query 1 in class 0, all boxes identical
    outputs = make_outputs([[[-4.0, 4.0], [4.0, -4.0], [-4.0, -4.0]]], [[box, box, box]])
    targets = [make_target([0, 1], [box, box])]
    assert as_lists(matcher(outputs, targets)) == [([0, 1], [1, 0])]


def test_more_targets_than_queries_gives_one_pair_per_query():
    matcher = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0)
    outputs = make_outputs([[[0.0], [0.0]]], [[box_at(0.2), box_at(0.8)]])
    targets = [make_target([0, 0, 0, 0], [box_at(0.5), box_at(0.81), box_at(0.6), box_at(0.19)])]
    assert as_lists(matcher(outputs, targets)) == [([0, 1], [3, 1])]


def test_batched_equals_per_image():
    matcher = HungarianMatcher()
    outputs, targets = random_batch([3, 0, 5, 1], seed=1)
    batched = matcher(outputs, targets)
    for image, (pred, target) in enumerate(batched):
        single = matcher({key: value[image : image + 1] for key, value in outputs.items()}, [targets[image]])[0]
        assert pred.dtype == target.dtype == torch.int64
        assert pred.tolist() == single[0].tolist() and target.tolist() == single[1].tolist()
        assert len(pred) == min(7, len(targets[image]["labels"]))
        assert pred.tolist() == sorted(pred.tolist())


def test_no_targets_at_all():
    matcher = HungarianMatcher()
    outputs, targets = random_batch([0, 0])
    indices = matcher(outputs, targets)
    assert len(indices) == 2
    for pred, target in indices:
        assert pred.numel() == target.numel() == 0 and pred.dtype == target.dtype == torch.int64


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("pred_boxes", float("nan"), r"image 1 of the batch: pred_boxes has 1 NaN and 0 inf"),
        ("pred_logits", float("nan"), r"image 1 of the batch: pred_logits has 1 NaN"),
        ("pred_logits", float("inf"), r"image 1 of the batch: pred_logits has 0 NaN and 1 inf"),
    ],
)
def test_non_finite_predictions_raise_naming_the_image(key, value, message):
    matcher = HungarianMatcher()
    outputs, targets = random_batch([2, 3, 1])
    outputs[key][1, 4, 0] = value
    with pytest.raises(NonFinitePredictionError, match=message):  # a ValueError the training step catches
        matcher(outputs, targets)


def test_non_finite_targets_are_a_data_error_not_a_diverged_model():
    outputs, targets = random_batch([2, 3, 1])
    targets[1]["boxes"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image 1 of the batch: target boxes has 1 NaN") as caught:
        HungarianMatcher()(outputs, targets)
    assert not isinstance(caught.value, NonFinitePredictionError)


def test_transformers_matcher_agrees():
    transformers_loss = pytest.importorskip("transformers.loss.loss_deformable_detr")
    reference = transformers_loss.DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    for seed in range(3):
        outputs, targets = random_batch([4, 0, 9, 2], num_queries=12, num_classes=5, seed=seed)
        expected = reference(
            {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]},
            [{"class_labels": target["labels"], "boxes": target["boxes"]} for target in targets],
        )
        assert as_lists(matcher(outputs, targets)) == as_lists(expected)
