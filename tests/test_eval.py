"""Evaluation: `python -m ddetr.eval` validates a checkpoint and writes COCO results and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddetr.app import compose
from ddetr.checkpoints import save_checkpoint
from ddetr.data import ensure_synthetic_dataset
from ddetr.training.run import evaluate
from ddetr.training.module import DeformableDETRModule
from ddetr.inference.predict import predict


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic_dataset(root, num_train=2, num_val=4, image_size=64)
    return root


def write_checkpoint(path: Path, dataset: Path, options: dict, num_classes: int | None = None) -> Path:
    """A randomly initialised model of ``options`` (seed 0) for ``dataset``'s categories, saved at ``path``."""
    annotations = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    categories = sorted(annotations["categories"], key=lambda c: c["id"])
    torch.manual_seed(0)
    module = DeformableDETRModule(
        num_classes=num_classes or len(categories),
        **options,
        label_to_category_id=None if num_classes else [c["id"] for c in categories],
    )
    save_checkpoint(module, path, "test")
    return path


def eval_config(checkpoint: Path, dataset: Path, output: Path):
    return compose(
        [
            f"ckpt_path={checkpoint}",
            f"data.root={dataset}",
            "data.num_train=2",
            "data.num_val=4",
            "data.image_size=64",
            "data.num_workers=0",
            "data.batch_size=2",
            "data.val_transforms.size=96",
            "data.val_transforms.max_size=144",
            "trainer.accelerator=cpu",
            "+trainer.enable_progress_bar=false",
            f"paths.output_dir={output}",
            f"paths.log_dir={output}/logs",
        ],
        config_name="eval",
    )


def test_eval_writes_metrics_and_the_same_detections_as_predict(tmp_path, dataset, capsys, micro_options):
    checkpoint = write_checkpoint(tmp_path / "tiny.ckpt", dataset, micro_options())
    metrics = evaluate(eval_config(checkpoint, dataset, tmp_path / "eval"))
    for name in ("val/AP", "val/AP50", "val/AP75", "val/APs", "val/AR100"):
        assert 0.0 <= metrics[name] <= 1.0
    # 64-pixel images hold no object over 96x96 pixels: APl and ARl are undefined, not 0
    assert metrics["val/APl"] is None and metrics["val/ARl"] is None
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["val/AP"] == pytest.approx(metrics["val/AP"])
    assert written["val/APl"] is None  # null in JSON
    out = capsys.readouterr().out
    table = out[out.index("COCO metrics of") :]
    assert [line.split() for line in table.splitlines() if line.startswith("val/APl")] == [["val/APl", "n/a"]]
    assert table.count("n/a: undefined, not zero") == 1
    # per class, keyed by class name: AP, AP50 and the ground-truth boxes, which add up to the file's
    annotations = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    assert set(written["per_class"]) == set(names.values())
    for name in names.values():
        expected_gt = sum(
            1 for a in annotations["annotations"] if names[a["category_id"]] == name and not a.get("iscrowd")
        )
        assert written["per_class"][name]["num_gt"] == expected_gt
        assert f"\n{name} " in table

    # the pycocotools result of the written detections is the reported one
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    ground_truth = COCO(str(dataset / "annotations" / "instances_val.json"))
    coco_eval = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="bbox")
    coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
    assert metrics["val/AP50"] == pytest.approx(max(coco_eval.stats[1], 0.0), abs=1e-6)
    # every reported metric is pycocotools' on the written detections (-1: no ground truth of that size)
    for name, index in (("AP", 0), ("AP50", 1), ("AP75", 2), ("APs", 3), ("APm", 4), ("APl", 5), ("AR100", 8)):
        expected = None if coco_eval.stats[index] < 0 else coco_eval.stats[index]
        assert metrics[f"val/{name}"] == pytest.approx(expected, abs=1e-6), name
    # per class: pycocotools' precision of that category (IoU 0.50:0.95 and 0.50, area all, 100 detections)
    precision = coco_eval.eval["precision"]
    for index, category_id in enumerate(coco_eval.params.catIds):
        curve = precision[:, :, index, 0, 2]
        if (curve > -1).any():
            assert written["per_class"][names[category_id]]["AP"] == pytest.approx(curve[curve > -1].mean(), abs=1e-6)
    # and the evaluation is not blind: the ground truth as detections scores a perfect AP
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in ground_truth.dataset["annotations"]
    ]
    exact = COCOeval(ground_truth, ground_truth.loadRes(perfect), iouType="bbox")
    exact.evaluate(), exact.accumulate(), exact.summarize()
    assert exact.stats[0] == pytest.approx(1.0)

    # prediction on the same files with the same resize gives the same detections
    predict(
        compose(
            [
                f"ckpt_path={checkpoint}",
                f"input={dataset / 'val'}",
                f"output={tmp_path / 'predict'}",
                "size=96",
                "max_size=144",
                "threshold=0.0",
                "device=cpu",
                "progress_bar=false",
                f"annotations={dataset / 'annotations' / 'instances_val.json'}",
                f"paths.log_dir={tmp_path}/logs",
            ],
            config_name="predict",
        )
    )
    predicted = json.loads((tmp_path / "predict" / "detections.json").read_text())
    key = lambda r: (r["image_id"], -round(r["score"], 5), r["category_id"])  # noqa: E731
    assert len(predicted) == len(results)
    for mine, theirs in zip(sorted(predicted, key=key), sorted(results, key=key)):
        assert (mine["image_id"], mine["category_id"]) == (theirs["image_id"], theirs["category_id"])
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
        assert mine["bbox"] == pytest.approx(theirs["bbox"], abs=1e-3)


def test_class_count_mismatch_names_the_checkpoint(tmp_path, dataset, micro_options):
    checkpoint = write_checkpoint(tmp_path / "three_classes.ckpt", dataset, micro_options(), num_classes=3)
    with pytest.raises(ValueError, match="three_classes.ckpt.*3 classes"):
        evaluate(eval_config(checkpoint, dataset, tmp_path / "eval"))
