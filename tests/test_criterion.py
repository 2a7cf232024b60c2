"""SetCriterion: hand-computed terms, transformers' loss as an oracle, empty batches, num_boxes across ranks."""

import math

import pytest
import torch
from _runs import run_workers

from ddetr.models.build import build_criterion
from ddetr.models.criterion import (
    SetCriterion,
    average_num_boxes,
    sigmoid_focal_loss,
)
from ddetr.models.matcher import HungarianMatcher

LN2 = math.log(2)


def target(labels, boxes):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)  # (num_targets, 4)
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": boxes}


def random_layer(batch_size, num_queries, num_classes, generator):
    return {
        "pred_logits": torch.randn(batch_size, num_queries, num_classes, generator=generator),
        # valid boxes, as a sigmoid gives them
        "pred_boxes": torch.randn(batch_size, num_queries, 4, generator=generator).sigmoid(),
    }


def random_batch(sizes, num_queries=10, num_classes=5, num_aux=2, seed=0, enc=False):
    generator = torch.Generator().manual_seed(seed)
    outputs = random_layer(len(sizes), num_queries, num_classes, generator)
    outputs["aux_outputs"] = [random_layer(len(sizes), num_queries, num_classes, generator) for _ in range(num_aux)]
    if enc:
        outputs["enc_outputs"] = random_layer(len(sizes), 3 * num_queries, num_classes, generator)
    targets = []
    for size in sizes:
        centers = torch.rand(size, 2, generator=generator) * 0.6 + 0.2
        sizes_wh = torch.rand(size, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, num_classes, (size,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centers, sizes_wh], 1)})
    return outputs, targets


# --- sigmoid focal loss -------------------------------------------------------------------------


def test_focal_loss_single_positive_by_hand():
    # logit 0, target 1: p = p_t = 0.5, BCE = ln 2 -> 0.25 * 0.5^2 * ln 2
    loss = sigmoid_focal_loss(torch.zeros(1, 1, 1), torch.ones(1, 1, 1), num_boxes=1)
    torch.testing.assert_close(loss, torch.tensor(0.0625 * LN2))


def test_focal_loss_mean_over_queries_divided_by_num_boxes_by_hand():
    # query 0: logit 0, target 1 -> 0.0625 ln 2
    # query 1: logit 2, target 0 -> p = sigmoid(2), BCE = ln(1 + e^2), weight (1 - 0.25) * p^2
    p = 1 / (1 + math.exp(-2))
    negative = 0.75 * p**2 * math.log(1 + math.exp(2))
    loss = sigmoid_focal_loss(torch.tensor([[[0.0], [2.0]]]), torch.tensor([[[1.0], [0.0]]]), num_boxes=4)
    torch.testing.assert_close(loss, torch.tensor((0.0625 * LN2 + negative) / 2 / 4))


# --- one hand-computed image ------------------------------------------------------------------


def test_criterion_terms_by_hand():
    # One target, class 1, box (0.5, 0.5, 0.2, 0.2). Query 0 is offset by 0.1 in x, query 1 is far.
    # L1 = 0.1. xyxy: pred (0.5,0.4,0.7,0.6), target (0.4,0.4,0.6,0.6): inter 0.02, union 0.06,
    # enclosing 0.3 x 0.2 = 0.06 -> GIoU = 1/3, loss_giou = 2/3.
    # All logits 0 (p = 0.5): one positive element 0.0625 ln2, three negatives 0.1875 ln2 each;
    # mean over the 2 queries, summed: 0.3125 ln2; / num_boxes 1; * 2 queries = 0.625 ln2.
    outputs = {
        "pred_logits": torch.zeros(1, 2, 2),
        "pred_boxes": torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]]),
    }
    criterion = build_criterion(num_classes=2, aux_loss=False)
    losses = criterion(outputs, [target([1], [0.5, 0.5, 0.2, 0.2])])
    torch.testing.assert_close(losses["loss_ce"], torch.tensor(0.625 * LN2))
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.1))
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(2 / 3))
    # sigmoid(0) = 0.5 is not > 0.5: no confident query, one target
    torch.testing.assert_close(losses["cardinality_error"], torch.tensor(1.0))
    assert set(losses) == {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}


def test_class_error_and_cardinality_by_hand():
    # image 0: matched query 0 predicts class 1 == label -> right; image 1: predicts 0, label 1 -> wrong
    box = [0.5, 0.5, 0.2, 0.2]
    outputs = {
        "pred_logits": torch.tensor([[[-1.0, 1.0], [-3.0, -3.0]], [[2.0, 1.0], [3.0, -3.0]]]),
        "pred_boxes": torch.tensor([[box, [0.1, 0.1, 0.05, 0.05]], [box, [0.9, 0.9, 0.05, 0.05]]]),
    }
    losses = build_criterion(num_classes=2, aux_loss=False)(outputs, [target([1], box), target([1], box)])
    torch.testing.assert_close(losses["class_error"], torch.tensor(50.0))
    # confident queries: image 0 has 1 (target 1) -> 0; image 1 has 2 (target 1) -> 1; mean 0.5
    torch.testing.assert_close(losses["cardinality_error"], torch.tensor(0.5))


# --- transformers as the oracle ---------------------------------------------------------------


def transformers_losses(outputs, targets, num_classes):
    module = pytest.importorskip("transformers.loss.loss_deformable_detr")
    reference = module.DeformableDetrImageLoss(
        matcher=module.DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2),
        num_classes=num_classes,
        focal_alpha=0.25,
        losses=["labels", "boxes", "cardinality"],
    )
    hf_outputs = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    if "aux_outputs" in outputs:
        hf_outputs["auxiliary_outputs"] = [
            {"logits": layer["pred_logits"], "pred_boxes": layer["pred_boxes"]} for layer in outputs["aux_outputs"]
        ]
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    return reference(hf_outputs, hf_targets)


@pytest.mark.parametrize(("sizes", "seed"), [([2, 0, 4], 0), ([1, 6], 1), ([12, 3, 5], 2)])
def test_parity_with_transformers(sizes, seed):
    outputs, targets = random_batch(sizes, num_classes=5, num_aux=2, seed=seed)
    expected = transformers_losses(outputs, targets, num_classes=5)
    losses = build_criterion(num_classes=5, dec_layers=3)(outputs, targets)
    names = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")
    compared = [f"{name}{suffix}" for suffix in ("", "_0", "_1") for name in names]
    assert set(compared) <= set(expected)
    for name in compared:
        reference = torch.as_tensor(expected[name]).reshape(())
        torch.testing.assert_close(losses[name], reference, atol=1e-5, rtol=1e-5, msg=name)
    # transformers leaves class_error out; every other key agrees
    assert set(losses) - set(expected) == {"class_error"}


def test_encoder_terms_are_class_agnostic():
    outputs, targets = random_batch([3, 2], num_classes=5, num_aux=1, seed=3, enc=True)
    original_labels = [t["labels"].clone() for t in targets]
    losses = build_criterion(num_classes=5, dec_layers=2, two_stage=True)(outputs, targets)
    for t, labels in zip(targets, original_labels):
        assert torch.equal(t["labels"], labels)  # the caller's targets are untouched
    zero_labels = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    expected = transformers_losses(outputs["enc_outputs"], zero_labels, num_classes=5)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
        reference = torch.as_tensor(expected[name]).reshape(())
        torch.testing.assert_close(losses[f"{name}_enc"], reference, atol=1e-5, rtol=1e-5, msg=name)
    assert "class_error_enc" not in losses and "class_error_0" not in losses


# --- empty batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[0, 0], [0, 3]])
def test_images_without_targets_give_finite_losses_with_gradient(sizes):
    outputs, targets = random_batch(sizes, num_classes=3, num_aux=1, seed=4)
    leaves = [outputs["pred_logits"], outputs["pred_boxes"]]
    for tensor in leaves:
        tensor.requires_grad_(True)
    criterion = build_criterion(num_classes=3, dec_layers=2)
    losses = criterion(outputs, targets)
    for name, value in losses.items():
        assert value.isfinite(), name
    if sum(sizes) == 0:
        assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
        assert losses["loss_bbox"].requires_grad and losses["loss_giou"].requires_grad
        # all one-hot targets are 0: loss_ce = sum of negative focal terms (num_boxes clamped to 1)
        p = outputs["pred_logits"].detach().sigmoid()
        expected_ce = (0.75 * p**2 * torch.nn.functional.softplus(outputs["pred_logits"].detach())).sum()
        torch.testing.assert_close(losses["loss_ce"], expected_ce)
    criterion.weighted_total(losses).backward()
    for tensor in leaves:
        assert tensor.grad is not None and tensor.grad.isfinite().all()


# --- configuration ----------------------------------------------------------------------------


def test_weight_dict_keys():
    base = {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}
    assert build_criterion(num_classes=3, aux_loss=False).weight_dict == base
    with_aux = build_criterion(num_classes=3, dec_layers=6).weight_dict
    assert set(with_aux) == {f"{name}{suffix}" for name in base for suffix in ["", "_0", "_1", "_2", "_3", "_4"]}
    two_stage = build_criterion(num_classes=3, dec_layers=2, two_stage=True, cls_loss_coef=1).weight_dict
    assert two_stage["loss_ce_enc"] == 1 and two_stage["loss_giou_0"] == 2 and len(two_stage) == 9
    assert "class_error" not in with_aux and "cardinality_error" not in with_aux


def test_weighted_total_by_hand_and_missing_key():
    criterion = build_criterion(num_classes=3, dec_layers=2)
    loss_dict = {
        "loss_ce": torch.tensor(1.0),
        "loss_bbox": torch.tensor(2.0),
        "loss_giou": torch.tensor(3.0),
        "loss_ce_0": torch.tensor(4.0),
        "loss_bbox_0": torch.tensor(5.0),
        "loss_giou_0": torch.tensor(6.0),
        "class_error": torch.tensor(100.0),
    }
    # 2*1 + 5*2 + 2*3 + 2*4 + 5*5 + 2*6 = 63
    torch.testing.assert_close(criterion.weighted_total(loss_dict), torch.tensor(63.0))
    del loss_dict["loss_giou_0"]
    with pytest.raises(KeyError, match="loss_giou_0"):
        criterion.weighted_total(loss_dict)


def test_unknown_loss_and_wrong_num_classes_raise():
    with pytest.raises(ValueError, match=r"unknown loss.*'masks'"):
        SetCriterion(3, HungarianMatcher(), {}, losses=("labels", "masks"))
    outputs, targets = random_batch([1], num_classes=4)
    with pytest.raises(ValueError, match="num_classes=3"):
        build_criterion(num_classes=3)(outputs, targets)


# --- num_boxes across ranks -------------------------------------------------------------------

RANK_SIZES = (3, 1)  # rank 0 has 3 targets, rank 1 has 1: average 2


def _num_boxes_worker(rank: int, store_path: str, result_dir: str) -> None:
    # a forked child must not enter an OpenMP parallel region the parent already used (it hangs)
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=len(RANK_SIZES)
    )
    try:
        outputs, targets = random_batch([RANK_SIZES[rank]], num_aux=1, seed=10 + rank)
        criterion = build_criterion(num_classes=5, dec_layers=2)
        result = {"num_boxes": average_num_boxes(targets, torch.device("cpu")), "losses": criterion(outputs, targets)}
        torch.save(result, f"{result_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_num_boxes_is_averaged_across_ranks(tmp_path):
    run_workers(_num_boxes_worker, (str(tmp_path / "store"), str(tmp_path)), nprocs=len(RANK_SIZES), timeout=60)
    criterion = build_criterion(num_classes=5, dec_layers=2)
    for rank, size in enumerate(RANK_SIZES):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["num_boxes"].item() == 2.0
        outputs, targets = random_batch([size], num_aux=1, seed=10 + rank)
        # single process, with num_boxes 2 given explicitly
        expected = criterion.layer_losses(outputs, targets, torch.tensor(2.0), log=True)
        expected.update(criterion.layer_losses(outputs["aux_outputs"][0], targets, torch.tensor(2.0), suffix="_0"))
        assert set(result["losses"]) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(result["losses"][name], value, msg=name)
        # and the normalised terms are the local ones rescaled by local / average num_boxes
        local = criterion(outputs, targets)
        for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
            torch.testing.assert_close(result["losses"][name], local[name] * size / 2, msg=name)


def test_num_boxes_without_distributed_is_clamped():
    assert average_num_boxes([target([], []), target([], [])], torch.device("cpu")).item() == 1.0
    count = average_num_boxes([target([0, 1], [[0.5] * 4] * 2), target([2], [0.5] * 4)], torch.device("cpu"))
    assert count.dtype == torch.float32 and count.item() == 3.0
