"""CocoEvaluator against pycocotools run directly on the same data."""

from __future__ import annotations

import contextlib
import io
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ddetr.training.evaluation import METRIC_NAMES, CocoEvaluator

LABEL_TO_CATEGORY = [3, 7]  # head index -> category id


def _gt(num_images: int = 3) -> COCO:
    """Images 1..n of 100x80; image i has one cat-3 box, odd images also a cat-7 box."""
    images, annotations = [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 80})
        boxes = [(3, [10 + i, 10, 30, 20])] + ([(7, [50, 30, 40, 40])] if i % 2 else [])
        for category, bbox in boxes:
            box = {"bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category, **box})
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 3, "name": "c"}, {"id": 7, "name": "g"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _perfect(coco: COCO, image_ids=None) -> dict:
    predictions = {}
    for image_id in image_ids or coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        boxes = [
            [
                a["bbox"][0],
                a["bbox"][1],
                a["bbox"][0] + a["bbox"][2],
                a["bbox"][1] + a["bbox"][3],
            ]
            for a in anns
        ]
        labels = [LABEL_TO_CATEGORY.index(a["category_id"]) for a in anns]
        predictions[image_id] = {
            "scores": torch.linspace(0.9, 0.5, len(anns)),
            "labels": torch.tensor(labels),
            "boxes": torch.tensor(boxes, dtype=torch.float32),
        }
    return predictions


def _jittered(predictions: dict, seed: int, sigma: float) -> dict:
    """``predictions`` with Gaussian noise of ``sigma`` pixels (numpy generator ``seed``) added to every box
    coordinate, image by image in order."""
    rng = np.random.default_rng(seed)
    for prediction in predictions.values():
        prediction["boxes"] = prediction["boxes"] + torch.tensor(rng.normal(0, sigma, prediction["boxes"].shape))
    return predictions


def _reference(coco: COCO, results: list) -> dict:
    """pycocotools directly: the reference numbers."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: None if v < 0 else float(v) for name, v in zip(METRIC_NAMES, evaluation.stats)}


def test_perfect_predictions_give_one(capsys):
    coco = _gt()
    evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY)
    evaluator.update(_perfect(coco))
    metrics = evaluator.compute()
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    # the boxes are 30x20 and 40x40 pixels: no large ground truth, so APl and ARl are undefined, not 0
    assert metrics["APl"] is None and metrics["ARl"] is None
    assert all(isinstance(v, float) for k, v in metrics.items() if k not in ("APl", "ARl"))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)
    assert capsys.readouterr().out == ""  # pycocotools kept quiet


def test_half_detected_matches_hand_value_and_pycocotools():
    """One category, two GT boxes, one found exactly: precision 1 up to recall 0.5, then 0.

    COCO's 101-point interpolation gives AP50 = 51/101 (recall thresholds 0.00..0.50).
    """
    coco = _gt(num_images=2)  # cat 3: one box in each image; cat 7: one box in image 1
    predictions = {
        1: {
            "scores": [0.9, 0.8],
            "labels": [0, 1],
            "boxes": [[11, 10, 41, 30], [50, 30, 90, 70]],
        },
        2: {
            "scores": [0.3],
            "labels": [1],
            "boxes": [[0, 0, 5, 5]],
        },  # a false positive of cat 7
    }
    evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY)
    evaluator.update(predictions)
    metrics = evaluator.compute()
    per_category = evaluator.last_eval.eval["precision"][0, :, :, 0, 2]  # IoU .5, all recall, cats, area all, 100 dets
    ap50_cat3 = per_category[:, 0].mean()
    assert ap50_cat3 == pytest.approx(51 / 101)
    assert per_category[:, 1].mean() == pytest.approx(1.0)  # cat 7: the 0.3 false positive ranks after the hit
    assert metrics["AP50"] == pytest.approx((51 / 101 + 1.0) / 2)
    assert metrics == pytest.approx(_reference(coco, evaluator.results_json()))
    # per class: the same hand values, by class name, with the number of ground-truth boxes
    assert evaluator.per_class["c"]["AP50"] == pytest.approx(51 / 101)
    assert evaluator.per_class["g"]["AP50"] == pytest.approx(1.0)
    assert evaluator.per_class["c"]["AP"] == pytest.approx(51 / 101)  # the hit is exact: every IoU threshold
    assert [row["num_gt"] for row in evaluator.per_class.values()] == [2, 1]


def test_per_class_ap_is_pycocotools_on_that_class_alone():
    """Property: a class's AP and AP50 are pycocotools' summary when evaluated on that category only."""
    coco = _gt(num_images=6)
    evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY)
    evaluator.update(_jittered(_perfect(coco), seed=1, sigma=5))
    evaluator.compute()
    for category_id, name in ((3, "c"), (7, "g")):
        with contextlib.redirect_stdout(io.StringIO()):
            alone = COCOeval(coco, coco.loadRes(evaluator.results_json()), "bbox")
            alone.params.catIds = [category_id]
            alone.evaluate(), alone.accumulate(), alone.summarize()
        assert evaluator.per_class[name]["AP"] == pytest.approx(alone.stats[0]), name
        assert evaluator.per_class[name]["AP50"] == pytest.approx(alone.stats[1]), name
        assert 0.0 < evaluator.per_class[name]["AP"] < 1.0
    assert evaluator.per_class["c"]["num_gt"] == 6 and evaluator.per_class["g"]["num_gt"] == 3


def test_imperfect_boxes_match_pycocotools():
    coco = _gt(num_images=5)
    evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY)
    evaluator.update(_jittered(_perfect(coco), seed=0, sigma=4))
    metrics = evaluator.compute()
    assert 0.0 < metrics["AP"] < 1.0
    assert metrics == pytest.approx(_reference(coco, evaluator.results_json()))


def test_zero_predictions_give_zero():
    evaluator = CocoEvaluator(_gt(), LABEL_TO_CATEGORY)
    # zero where ground truth exists; undefined (None) where none does (no box over 96x96 pixels)
    assert evaluator.compute() == {**dict.fromkeys(METRIC_NAMES, 0.0), "APl": None, "ARl": None}
    assert evaluator.per_class == {
        "c": {"AP": 0.0, "AP50": 0.0, "num_gt": 3},
        "g": {"AP": 0.0, "AP50": 0.0, "num_gt": 2},
    }
    evaluator.update({1: {"scores": [], "labels": [], "boxes": np.zeros((0, 4))}})
    assert evaluator.compute()["AP"] == 0.0


def test_all_gt_images_count():
    coco = _gt(num_images=4)
    evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY)
    evaluator.update(_perfect(coco, image_ids=[1, 2]))
    metrics = evaluator.compute()
    assert metrics["AR100"] < 1.0  # images 3 and 4 count as missed
    assert metrics == pytest.approx(_reference(coco, evaluator.results_json()))


def test_category_mapping_round_trip_and_dedupe():
    coco = _gt()
    evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY)
    evaluator.update({1: {"scores": [0.5], "labels": [1], "boxes": [[10.0, 20.0, 40.0, 60.0]]}})
    evaluator.update({1: {"scores": [0.9], "labels": [0], "boxes": [[0.0, 0.0, 1.0, 1.0]]}})  # duplicate: ignored
    results = evaluator.results_json()
    assert results == [
        {
            "image_id": 1,
            "category_id": 7,
            "bbox": [10.0, 20.0, 30.0, 40.0],
            "score": 0.5,
        }
    ]
    assert results[0]["category_id"] == LABEL_TO_CATEGORY[1]
    # labels outside the head and categories unknown to the GT (coco91 "N/A" slots) are ignored
    coco91 = CocoEvaluator(coco, list(range(8)))
    coco91.update(
        {
            2: {
                "scores": [0.9, 0.8, 0.7],
                "labels": [0, 3, 99],
                "boxes": [[12, 10, 42, 30]] * 3,
            }
        }
    )
    assert [r["category_id"] for r in coco91.results_json()] == [0, 3]
    assert coco91.compute()["AP"] > 0
    evaluator.reset()
    assert evaluator.results_json() == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        coco = _gt(num_images=5)
        evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY)
        predictions = _perfect(coco, image_ids=[1, 2, 3, 4])  # image 5 gets none
        for image_id, prediction in predictions.items():
            prediction["boxes"] = prediction["boxes"] + image_id  # imperfect, image-dependent
        mine = {i: p for i, p in predictions.items() if i % world_size == rank}
        if rank == 1:
            mine[1] = predictions[1]  # a padding sampler repeated image 1 on this rank
        evaluator.update(mine)
        evaluator.synchronize()
        out[rank] = evaluator.compute()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_result():
    coco = _gt(num_images=5)
    single = CocoEvaluator(coco, LABEL_TO_CATEGORY)
    predictions = _perfect(coco, image_ids=[1, 2, 3, 4])
    for image_id, prediction in predictions.items():
        prediction["boxes"] = prediction["boxes"] + image_id
    single.update(predictions)
    expected = single.compute()

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    assert out[0] == pytest.approx(expected) and out[1] == pytest.approx(expected)
