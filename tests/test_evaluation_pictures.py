"""Evaluation pictures: the precision-recall curves against pycocotools' AP, what the pictures name
with 6 and with 80 classes, and the files and logged images of a training run and of ``ddetr.eval``."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from _detections import random_case
from PIL import Image
from pycocotools.cocoeval import COCOeval

from ddetr.pictures.evaluation import (
    PrecisionRecallCurves,
    draw_confusion_matrix,
    draw_pr_curves,
    precision_recall_curves,
    save_figure,
)
from ddetr.training.confusion import ConfusionMatrix
from ddetr.training.evaluation import CocoEvaluator


def test_the_curves_average_to_the_ap_pycocotools_reports():
    coco, predictions = random_case(3, num_images=12, num_classes=4)
    evaluator = CocoEvaluator(coco, [1, 2, 3, 4])
    evaluator.update(predictions)
    metrics = evaluator.compute()
    names = [c["name"] for c in coco.loadCats(evaluator.last_eval.params.catIds)]
    curves = precision_recall_curves(evaluator.last_eval, names)
    assert curves.recall.shape == (101,) and curves.per_class.shape == (4, 101)
    assert np.mean(curves.mean) == pytest.approx(metrics["AP"], abs=1e-12)
    assert np.mean(curves.mean_50) == pytest.approx(metrics["AP50"], abs=1e-12)
    for index, category in enumerate(evaluator.last_eval.params.catIds):  # pycocotools on that class alone
        with contextlib.redirect_stdout(io.StringIO()):
            alone = COCOeval(coco, coco.loadRes(evaluator.results_json()), "bbox")
            alone.params.catIds = [category]
            alone.evaluate(), alone.accumulate(), alone.summarize()
        if alone.stats[1] < 0:  # no ground truth of that class: no curve
            assert np.isnan(curves.per_class[index]).all()
        else:
            assert curves.ap50[index] == pytest.approx(alone.stats[1], abs=1e-12)


def _curves(num_classes: int) -> PrecisionRecallCurves:
    """Curves whose AP50 grows with the class index (class 0 worst); class 1 has no ground truth."""
    recall = np.linspace(0, 1, 101)
    per_class = np.array([np.clip(1.2 - recall * (2 - index / num_classes), 0, 1) for index in range(num_classes)])
    per_class[1] = np.nan
    names = [f"class {index}" for index in range(num_classes)]
    mean_50 = np.nanmean(per_class, axis=0)  # (num_recall,)
    return PrecisionRecallCurves(recall, names, per_class, mean_50 * 0.8, mean_50)


def _legend(figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_the_pr_picture_names_every_class_of_six_and_the_extremes_of_eighty(tmp_path):
    few = _legend(draw_pr_curves(_curves(6)))
    assert [entry.split(" (")[0] for entry in few[:5]] == ["class 5", "class 4", "class 3", "class 2", "class 0"]
    assert few[5].startswith("mean, IoU 0.50:0.95") and few[6].startswith("mean, IoU 0.50 ")
    assert len(few) == 7  # class 1 has no ground truth: no curve, no entry
    figure = draw_pr_curves(_curves(80))
    many = _legend(figure)
    assert many[0] == "the other 69 classes"  # 80 less the one without ground truth, less 10 named
    assert [entry.split(" (")[0] for entry in many[1:11]] == [
        *(f"class {index}" for index in (79, 78, 77, 76, 75)),
        *(f"class {index}" for index in (5, 4, 3, 2, 0)),
    ]
    assert "left out: 1 without ground truth" in figure.axes[0].get_title()
    with Image.open(save_figure(figure, tmp_path / "pr.png")) as picture:
        assert picture.size == (1100, 650)


def test_the_confusion_picture_labels_every_row_and_column(tmp_path):
    labels = ["cat", "dog", "bird", "fish", "frog", "ant", "background"]
    matrix = np.arange(49).reshape(7, 7) % 5
    figure = draw_confusion_matrix(ConfusionMatrix(labels, matrix, 0.5, 0.3))
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == labels == [t.get_text() for t in axis.get_yticklabels()]
    assert sorted(int(t.get_text()) for t in axis.texts) == sorted(matrix[matrix > 0].tolist())  # counts in cells
    large = draw_confusion_matrix(
        ConfusionMatrix([f"c{i}" for i in range(80)] + ["background"], np.eye(81, dtype=int), 0.5, 0.3)
    )
    assert len(large.axes[0].get_yticklabels()) == 81 and not large.axes[0].texts  # too small for numbers
    heights = {}
    for name, picture in (("six", figure), ("eighty", large)):
        with Image.open(save_figure(picture, tmp_path / f"{name}.png")) as image:
            heights[name] = image.size[1]
    assert heights["eighty"] >= 81 * 20 > heights["six"]  # at least 20 pixels per row for 80 classes


@pytest.mark.slow
def test_training_and_eval_write_the_pictures_and_the_matrix(tmp_path, debug_overrides, eval_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddetr.app import compose
    from ddetr.training.run import evaluate, train

    data_root = tmp_path / "synthetic"
    run = tmp_path / "run"
    # threshold 0: the untrained model's detections all count, so every cell can fill
    overrides = ["logger=tensorboard", "confusion_threshold=0.0", "trainer.limit_train_batches=1"]
    train(compose(debug_overrides(run, data_root) + overrides))
    annotations = json.loads((data_root / "annotations" / "instances_val.json").read_text())
    categories = sorted(annotations["categories"], key=lambda c: c["id"])
    ground_truth = [sum(a["category_id"] == c["id"] for a in annotations["annotations"]) for c in categories]
    written = json.loads((run / "metrics.json").read_text())["confusion_matrix"]
    assert written["labels"] == [c["name"] for c in categories] + ["background"]
    assert written["iou"] == 0.5 and written["score_threshold"] == 0.0
    assert np.asarray(written["matrix"])[:-1].sum(axis=1).tolist() == ground_truth
    for name in ("pr_curves.png", "confusion_matrix.png"):  # the last validation's, copied, not drawn again
        assert (run / name).read_bytes() == (run / "eval_pictures" / "epoch_000" / name).read_bytes()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"val/pr_curves", "val/confusion_matrix"} <= set(events.Tags()["images"])

    output = tmp_path / "eval"
    on_eval_data = eval_overrides(run / "checkpoints" / "last.ckpt", data_root, output, output / "logs")
    evaluate(compose([*on_eval_data, "confusion_threshold=0.0"], config_name="eval"))
    evaluated = json.loads((output / "metrics.json").read_text())["confusion_matrix"]
    counts = np.asarray(evaluated["matrix"])
    assert counts[:-1].sum(axis=1).tolist() == ground_truth
    # every detection of results.json is counted once (no crowd region in the synthetic data)
    results = json.loads((output / "results.json").read_text())
    assert counts[:, :-1].sum() == len(results)
    # the same checkpoint on the same images: the matrix of the final validation of the run
    assert evaluated == written
    assert (output / "pr_curves.png").is_file() and (output / "confusion_matrix.png").is_file()
