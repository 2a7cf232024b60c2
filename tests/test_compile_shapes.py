"""``model.compile=reduce-overhead`` bounds the shapes its compiled parts see (one CUDA graph each on a
GPU): the matched pairs padded to a fixed maximum with a mask, which gives the unpadded losses, and
the batch padded to an image-size bucket."""

from __future__ import annotations

import pytest
import torch
from _batches import random_targets

from ddetr.models.criterion import Matched, SetCriterion, pad_matched, pair_bound
from ddetr.models.matcher import HungarianMatcher
from ddetr.training.shape_buckets import SIDE_BUCKETS, bucket_side, pad_to_bucket


def matched_stack(per_image: list[list[int]], num_queries: int = 12, seed: int = 0) -> Matched:
    """Random predictions of ``len(per_image)`` layers and ``len(per_image[0])`` images, layer l and image
    b matching ``per_image[l][b]`` distinct queries to random targets."""
    generator = torch.Generator().manual_seed(seed)
    num_layers, batch_size = len(per_image), len(per_image[0])
    logits = torch.randn(num_layers, batch_size, num_queries, 3, generator=generator) * 2
    boxes = torch.rand(num_layers, batch_size, num_queries, 4, generator=generator) * 0.4 + 0.2
    layer, image, query = [], [], []
    for index, counts in enumerate(per_image):
        for b, count in enumerate(counts):
            layer += [index] * count
            image += [b] * count
            query += torch.randperm(num_queries, generator=generator)[:count].tolist()
    num_matched = len(layer)
    last = sum(sum(counts) for counts in per_image[:-1])
    return Matched(
        logits=logits.requires_grad_(),
        boxes=boxes.requires_grad_(),
        layer=torch.tensor(layer, dtype=torch.int64),
        image=torch.tensor(image, dtype=torch.int64),
        query=torch.tensor(query, dtype=torch.int64),
        labels=torch.randint(0, 3, (num_matched,), generator=generator),
        target_boxes=torch.rand(num_matched, 4, generator=generator) * 0.4 + 0.2,
        num_targets=torch.tensor([float(max(col)) for col in zip(*per_image)]),
        last_layer=slice(last, None),
    )


def losses_and_gradients(criterion: SetCriterion, matched: Matched) -> tuple[dict, tuple]:
    terms = criterion.matched_losses(matched, torch.tensor(5.0), True)
    total = terms["loss_ce"].sum() + terms["loss_bbox"].sum() + terms["loss_giou"].sum()
    return terms, torch.autograd.grad(total, (matched.logits, matched.boxes))


@pytest.mark.parametrize("class_loss", ["focal", "varifocal", "ia_bce"])
@pytest.mark.parametrize(
    "per_image",
    [[[3, 2], [3, 2], [2, 4]], [[0, 0], [1, 0]], [[0, 0], [0, 0]]],
    ids=["matched", "layer_without_match", "no_match"],
)
def test_padded_pairs_give_the_unpadded_losses(class_loss, per_image):
    """The masked losses over the fixed maximum of pairs equal today's (unpadded) losses and gradients
    within 1e-6, class and cardinality errors included, for every class loss; also when a layer or the
    whole stack has no match (then the padding points at a query nothing matched)."""
    criterion = SetCriterion(3, HungarianMatcher(), {}, class_loss=class_loss)
    matched = matched_stack(per_image)
    padded = pad_matched(matched, pair_bound(matched.logits))
    assert padded.layer.shape == (len(per_image) * 2 * 12,) and padded.valid.sum() == matched.layer.shape[0]
    (expected, expected_grads), (actual, actual_grads) = (
        losses_and_gradients(criterion, matched),
        losses_and_gradients(criterion, padded),
    )
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-6)
    for grad, expected_grad in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)


def test_more_pairs_than_the_bound_is_an_error():
    matched = matched_stack([[3, 2]])
    with pytest.raises(ValueError, match="5 matched pairs exceed the bound of 4"):
        pad_matched(matched, 4)


class PairRecorder(SetCriterion):
    """Records the number of pairs every call of the losses receives."""

    def matched_losses(self, matched, num_boxes, log):
        self.pairs = [*getattr(self, "pairs", []), (tuple(matched.logits.shape[:3]), matched.layer.shape[0])]
        return super().matched_losses(matched, num_boxes, log)


def test_criterion_pads_every_stack_to_its_bound():
    """With ``pad_pairs`` every stack (decoder layers, encoder proposals, hybrid one-to-many layers with
    the targets repeated twice) reaches the losses with
    num_layers * batch_size * num_queries pairs whatever the targets, and the loss dict is the
    unpadded criterion's within 1e-6."""
    generator = torch.Generator().manual_seed(3)

    def outputs(num_queries: int, num_proposals: int) -> dict:
        def layer(queries):
            return {
                "pred_logits": torch.randn(2, queries, 3, generator=generator),
                "pred_boxes": torch.rand(2, queries, 4, generator=generator) * 0.5 + 0.25,
            }

        one2many = {**layer(9), "aux_outputs": [layer(9)]}
        return {
            **layer(num_queries),
            "aux_outputs": [layer(num_queries)],
            "enc_outputs": layer(num_proposals),
            "one2many_outputs": one2many,
        }

    eager = SetCriterion(3, HungarianMatcher(), {}, one2many_k=2)
    padding = PairRecorder(3, HungarianMatcher(), {}, one2many_k=2)
    padding.pad_pairs = True
    for counts in ((2, 3), (0, 1), (5, 4)):
        batch, targets = outputs(7, 11), random_targets(generator, counts)
        expected, actual = eager(batch, targets, sync_num_boxes=False), padding(batch, targets, sync_num_boxes=False)
        assert sorted(actual) == sorted(expected)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-6)
    assert padding.pairs == [((2, 2, 7), 28), ((1, 2, 11), 22), ((2, 2, 9), 36)] * 3


@pytest.mark.parametrize(
    ("side", "bucket"),
    [
        (1, 64),
        (64, 64),
        (65, 128),
        (200, 256),
        (385, 512),
        (513, 640),
        (800, 896),
        (1025, 1344),
        (1333, 1344),
        (1345, 1408),
    ],
)
def test_bucket_side_rounds_up_to_the_next_bucket(side, bucket):
    assert bucket_side(side) == bucket


def test_pad_to_bucket_keeps_the_batch_and_masks_the_added_pixels():
    images = torch.rand(2, 3, 70, 500)
    mask = torch.zeros(2, 70, 500, dtype=torch.bool)
    mask[1, :, 400:] = True
    padded, padded_mask = pad_to_bucket(images, mask)
    assert padded.shape == (2, 3, 128, 512) and padded_mask.shape == (2, 128, 512)
    assert torch.equal(padded[..., :70, :500], images) and torch.equal(padded_mask[:, :70, :500], mask)
    assert not padded[..., 70:, :].any() and not padded[..., 500:].any()
    assert padded_mask[:, 70:].all() and padded_mask[..., 500:].all()
    same = torch.rand(1, 3, 128, 640)
    assert pad_to_bucket(same, torch.zeros(1, 128, 640, dtype=torch.bool))[0] is same


def test_key_count_is_bounded_on_a_coco_like_pipeline():
    """A few steps of ``python -m ddetr.bench keys`` (small criterion): with the bounds the losses see
    one number of pairs, the forward only bucket shapes; today's pairs follow the targets."""
    from ddetr.benchmarks.graph_keys import count_keys

    result = count_keys(steps=4, num_layers=2, num_queries=20, num_classes=5)
    bounded, today = result["bounded"], result["today"]
    assert bounded["loss_shapes"] == 1 and bounded["mean_pairs"] == 2 * 2 * 20
    assert bounded["keys"] == bounded["forward_shapes"] <= today["forward_shapes"]
    assert today["mean_pairs"] < bounded["mean_pairs"]
    assert bounded["padding_share"] >= today["padding_share"]
    assert max(SIDE_BUCKETS) >= 1344  # the official augmentation's longest side (1333) has a bucket
