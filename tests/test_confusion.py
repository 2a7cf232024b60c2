"""The detection confusion matrix: hand-computed cases, its row sums, and its diagonal against
pycocotools' own matching at IoU 0.5."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools.cocoeval import COCOeval

from ddetr.training.confusion import BACKGROUND, coco_confusion_matrix
from ddetr.training.evaluation import CocoEvaluator

from _detections import coco_ground_truth, random_case
from _detections import prediction as image_prediction


def test_a_hand_built_image_gives_the_hand_counted_matrix():
    # head index i is category i + 1: a, b, c
    coco = coco_ground_truth(
        {
            1: [
                (1, [0, 0, 10, 10], 0),  # A1
                (2, [20, 0, 10, 10], 0),  # B1
                (3, [40, 0, 10, 10], 0),  # C1
                (1, [60, 0, 10, 10], 0),  # A2
                (2, [100, 0, 50, 50], 1),
            ]
        }
    )  # a crowd region (not ground truth)
    prediction = image_prediction(
        [
            (0, [0, 0, 10, 10], 0.9),  # a on A1: a -> a
            (0, [20, 0, 30, 10], 0.8),  # a on B1: ground truth b detected as a
            (2, [41, 0, 51, 10], 0.7),  # c on C1 (IoU 9/11): c -> c
            (0, [0, 0, 10, 10], 0.6),  # a again on A1, already taken: a false detection (background row)
            (1, [150, 150, 170, 170], 0.5),  # b on nothing: a false detection
            (1, [110, 10, 130, 30], 0.5),  # b inside the crowd region of b: ignored
            (2, [110, 20, 130, 40], 0.5),  # c inside the crowd region of b: a false detection (COCOeval's rule)
            (1, [60, 0, 70, 10], 0.2),  # b on A2 below the threshold: dropped, so A2 is missed
        ]
    )
    confusion = coco_confusion_matrix(coco, {1: prediction}, [1, 2, 3], score_threshold=0.3)
    assert confusion.labels == ["a", "b", "c", BACKGROUND]
    expected = [
        [1, 0, 0, 1],  # a: A1 found, A2 missed
        [1, 0, 0, 0],  # b: B1 detected as a
        [0, 0, 1, 0],  # c: C1 found
        [1, 1, 1, 0],
    ]  # background: the duplicate a, the stray b, the c in b's crowd; the b in b's crowd not counted
    assert confusion.matrix.tolist() == expected
    assert confusion.to_json() == {
        "labels": ["a", "b", "c", "background"],
        "matrix": expected,
        "iou": 0.5,
        "score_threshold": 0.3,
    }
    # with the threshold at 0.1 the b detection on A2 counts: A2 is found as b
    lower = coco_confusion_matrix(coco, {1: prediction}, [1, 2, 3], score_threshold=0.1)
    assert lower.matrix[0].tolist() == [1, 1, 0, 0]


def test_a_crowd_ignores_only_detections_of_its_own_class_as_cocoeval_does():
    # one crowd region of b; inside it a detection of each class, nothing else in the image
    coco = coco_ground_truth({1: [(2, [0, 0, 100, 100], 1), (1, [150, 150, 20, 20], 0)]})
    detections = [(0, [10, 10, 40, 40], 0.9), (1, [50, 50, 90, 90], 0.8), (2, [20, 60, 60, 95], 0.7)]
    confusion = coco_confusion_matrix(coco, {1: image_prediction(detections)}, [1, 2, 3], score_threshold=0.3)
    # the reference: COCOeval's detections at IoU 0.5 that match nothing and are not ignored, per category
    evaluator = CocoEvaluator(coco, [1, 2, 3])
    evaluator.update({1: image_prediction(detections)})
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(coco, coco.loadRes(evaluator.results_json()), "bbox")
        reference.evaluate()
    iou50 = int(np.argmin(np.abs(reference.params.iouThrs - 0.5)))
    false_detections = dict.fromkeys((1, 2, 3), 0)
    for image in reference.evalImgs:
        if image is not None and image["aRng"] == reference.params.areaRng[0]:
            unmatched = (image["dtMatches"][iou50] == 0) & ~image["dtIgnore"][iou50].astype(bool)
            false_detections[image["category_id"]] += int(unmatched.sum())
    assert false_detections == {1: 1, 2: 0, 3: 1}  # a and c count, b (in its own crowd) is ignored
    assert confusion.matrix[3, :3].tolist() == [false_detections[c] for c in (1, 2, 3)]
    assert confusion.matrix[0].tolist() == [0, 0, 0, 1]  # the a box: missed


def test_a_detection_takes_its_own_class_first_then_another():
    # G1 (class a) and G2 (class b) overlap; the better-scored b detection overlaps G1 more than G2
    coco = coco_ground_truth({1: [(1, [0, 0, 20, 20], 0), (2, [4, 0, 20, 20], 0)]})
    prediction = image_prediction(
        [
            (1, [0, 0, 20, 20], 0.9),  # b: IoU 1 with G1 (a), 0.67 with G2 (b) -> takes G2, its own class
            (0, [4, 0, 24, 20], 0.8),  # a: IoU 0.67 with G1 (a), 1 with G2 (taken) -> takes G1
        ]
    )
    assert coco_confusion_matrix(coco, {1: prediction}, [1, 2, 3]).matrix.tolist() == [
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    # a lower-scored detection of the right class wins the box over a better-scored confusion, which
    # then counts as a false detection
    coco = coco_ground_truth({1: [(1, [0, 0, 20, 20], 0)]})
    prediction = image_prediction([(1, [0, 0, 20, 20], 0.9), (0, [1, 0, 21, 20], 0.4)])
    assert coco_confusion_matrix(coco, {1: prediction}, [1, 2, 3]).matrix.tolist() == [
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 1, 0, 0],
    ]


def test_images_without_predictions_and_unknown_categories():
    coco = coco_ground_truth({1: [(1, [0, 0, 10, 10], 0)], 2: [(3, [0, 0, 10, 10], 0), (3, [50, 50, 10, 10], 0)]})
    # head 1 -> category 9, which the ground truth does not have (an unused slot): dropped, as COCOeval does
    prediction = image_prediction([(1, [0, 0, 10, 10], 0.9), (5, [0, 0, 10, 10], 0.9)])
    confusion = coco_confusion_matrix(coco, {1: prediction}, [1, 9, 3])
    assert confusion.matrix.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.sampled_from([0.0, 0.3, 0.7]))
def test_rows_sum_to_the_ground_truth_and_columns_to_the_detections(seed, threshold):
    coco, predictions = random_case(seed)
    confusion = coco_confusion_matrix(coco, predictions, [1, 2, 3], score_threshold=threshold)
    matrix = confusion.matrix
    annotations = coco.dataset["annotations"]
    ground_truth = [sum(1 for a in annotations if a["category_id"] == c and not a["iscrowd"]) for c in (1, 2, 3)]
    assert matrix[:3].sum(axis=1).tolist() == ground_truth
    assert matrix[3, 3] == 0
    # every detection above the threshold is counted once, except those left in a crowd region
    counted = [
        sum(int(((p["labels"] == label) & (p["scores"] >= threshold)).sum()) for p in predictions.values())
        for label in range(3)
    ]
    has_crowd = any(a["iscrowd"] for a in annotations)
    columns = matrix[:, :3].sum(axis=0).tolist()
    assert columns == counted if not has_crowd else all(c <= n for c, n in zip(columns, counted))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.sampled_from([0.0, 0.5]))
def test_the_diagonal_is_the_true_positives_pycocotools_counts_at_iou_half(seed, threshold):
    coco, predictions = random_case(seed, num_images=3)
    confusion = coco_confusion_matrix(coco, predictions, [1, 2, 3], score_threshold=threshold)
    evaluator = CocoEvaluator(coco, [1, 2, 3])
    evaluator.update(predictions)
    results = [r for r in evaluator.results_json() if r["score"] >= threshold]
    if not results:
        assert np.trace(confusion.matrix[:3, :3]) == 0
        return
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(coco, coco.loadRes(results), "bbox")
        reference.evaluate()
    iou50 = int(np.argmin(np.abs(reference.params.iouThrs - 0.5)))
    true_positives = dict.fromkeys((1, 2, 3), 0)
    for image in reference.evalImgs:  # one per (category, area range, image); area range "all" only
        if image is None or image["aRng"] != reference.params.areaRng[0]:
            continue
        matched = (image["dtMatches"][iou50] > 0) & ~image["dtIgnore"][iou50].astype(bool)
        true_positives[image["category_id"]] += int(matched.sum())
    assert np.diag(confusion.matrix)[:3].tolist() == [true_positives[c] for c in (1, 2, 3)]


def test_the_evaluator_gives_the_matrix_of_its_predictions():
    coco = coco_ground_truth({1: [(1, [0, 0, 10, 10], 0), (2, [20, 0, 10, 10], 0)]})
    evaluator = CocoEvaluator(coco, [1, 2, 3])
    evaluator.update({1: image_prediction([(1, [0, 0, 10, 10], 0.9)])})
    confusion = evaluator.confusion_matrix(0.5)
    assert confusion.matrix.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert confusion.score_threshold == pytest.approx(0.5) and confusion.iou == pytest.approx(0.5)
