"""`data=folder`: every layout written by `_layout_writers` from one in-memory dataset is detected, trains,
evaluates (val and test split) and passes `check_data` with the metrics of the same data as COCO JSON given
file by file (`data=custom`); bad folders are one line naming the path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from _layout_writers import (
    CLASSES,
    TINY,
    WRITERS,
    coco_dict,
    write_coco,
    write_coco_roboflow,
    write_voc_roboflow,
    write_yolo_cvat,
    write_yolo_roboflow,
)
from conftest import TINY_DATA_OVERRIDES

from ddetr.app import compose
from ddetr.data import DatasetError, FolderDataModule, VocDataModule, YoloDataModule, find_layout
from ddetr.training.run import evaluate, train

TINY_RUN = [
    "model=tiny",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar.refresh_rate=0",
    "logger=csv",
]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {name: write(root / name) for name, write in WRITERS.items()}


def _custom(root: Path) -> list[str]:
    """data=custom on write_coco's files, the test split included."""
    return ["data=custom"] + [
        f"data.{split}_{kind}={path}"
        for split in ("train", "val", "test")
        for kind, path in (("images", root / split), ("annotations", root / "annotations" / f"instances_{split}.json"))
    ]


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_layout_is_detected_with_its_splits(layouts, name):
    layout = find_layout(layouts[name])
    assert layout.format == name.split("_")[0]
    assert set(layout.splits) == {"train", "val", "test"}
    expected_val = "valid" if name in ("coco_roboflow", "voc_roboflow") else "val"
    assert layout.splits["val"] == expected_val


def test_folder_datasets_hold_the_coco_records(layouts, caplog):
    """Every layout, through data=folder and (YOLO, VOC) through data=yolo / data=voc, reads the boxes, labels
    and sizes of the COCO files; Roboflow's placeholder category takes no class."""
    reference = FolderDataModule(layouts["coco"], num_workers=0)
    modules = {name: FolderDataModule(root, num_workers=0, eval_split="test") for name, root in layouts.items()}
    modules["data=yolo"] = YoloDataModule(layouts["yolo_roboflow"], num_workers=0, eval_split="test")
    modules["data=yolo cvat"] = YoloDataModule(layouts["yolo_cvat"], num_workers=0, eval_split="test")
    modules["data=voc"] = VocDataModule(layouts["voc_roboflow"], num_workers=0, eval_split="test")
    reference_test = FolderDataModule(layouts["coco"], num_workers=0, eval_split="test").val_dataset
    with caplog.at_level(logging.INFO, logger="ddetr.data"):
        for name, module in modules.items():
            for mine, theirs in ((module.train_dataset, reference.train_dataset), (module.val_dataset, reference_test)):
                np.testing.assert_array_equal(mine.records.boxes, theirs.records.boxes, err_msg=name)
                np.testing.assert_array_equal(mine.box_labels, theirs.box_labels, err_msg=name)
                np.testing.assert_array_equal(mine.records.sizes, theirs.records.sizes, err_msg=name)
                np.testing.assert_array_equal(mine.records.box_offsets, theirs.records.box_offsets, err_msg=name)
            assert module.category_names == CLASSES, name
    # the hand-written table: train image 0's boxes as (x0, y0, x1, y1), label
    first = TINY["train"][0]
    expected = [[x, y, x + w, y + h] for _, x, y, w, h in first.boxes]
    np.testing.assert_array_equal(reference.train_dataset.records[0].boxes, expected)
    messages = [r.getMessage() for r in caplog.records]
    summary = [m for m in messages if m.startswith(f"data=folder: {layouts['coco_roboflow']}:")]
    assert (
        len(summary) == 1 and "Roboflow COCO JSON" in summary[0] and "left out as placeholders: 'peixos'" in summary[0]
    )
    train_boxes = sum(len(image.boxes) for image in TINY["train"])
    assert f"train = train ({layouts['coco_roboflow'] / 'train' / '_annotations.coco.json'}) (6 images, " in summary[0]
    assert f"{train_boxes} boxes)" in summary[0] and "test = test" in summary[0] and ", evaluated)" in summary[0]
    counts = np.bincount([label for image in TINY["train"] for label, *_ in image.boxes], minlength=3)
    assert "3 classes (boxes in train): " + ", ".join(f"{n} ({c})" for n, c in zip(CLASSES, counts)) in summary[0]
    placeholder = [m for m in messages if "'peixos' is the supercategory" in m]
    warned = [r for r in caplog.records if "'peixos' is the supercategory" in r.getMessage() and r.levelno >= 30]
    assert placeholder and len(warned) <= 1  # one warning per process (earlier tests may have given it)


def _imperfect_detections(image, wrong_first: bool) -> dict:
    """Detections of a TinyImage in its pixels: shifted true boxes (with `wrong_first` the first with the wrong
    class) and one false positive, so that AP lies strictly between 0 and 1."""
    import torch

    rows = [
        ((label + 1) % 3 if k == 0 and wrong_first else label, [x + 2, y + 1, x + w + 1, y + h - 2])
        for k, (label, x, y, w, h) in enumerate(image.boxes)
    ] + [(0, [0, 0, image.width / 3, image.height / 3])]
    return {
        "scores": torch.linspace(0.9, 0.3, len(rows)),
        "labels": torch.tensor([r[0] for r in rows]),
        "boxes": torch.tensor([r[1] for r in rows], dtype=torch.float32),
    }


def test_the_same_detections_score_the_same_on_every_layouts_test_split(layouts):
    """The evaluation's ground truth of every layout's test split (data.eval_split=test) is that of the COCO
    files: fixed detections get the same metrics and the same per-class rows (no row for Roboflow's placeholder)."""
    from ddetr.training.evaluation import CocoEvaluator

    results = {}
    for name, root in layouts.items():
        module = FolderDataModule(root, num_workers=0, eval_split="test")
        evaluator = CocoEvaluator(module.val_coco, module.label_to_category_id)
        evaluator.update({i + 1: _imperfect_detections(image, i == 0) for i, image in enumerate(TINY["test"])})
        results[name] = (evaluator.compute(), evaluator.per_class)
    metrics, per_class = results["coco"]
    assert 0 < metrics["AP"] < 1 and list(per_class) == CLASSES
    for name, result in results.items():
        assert result == results["coco"], name


def _train_and_test(data: list[str], output: Path) -> tuple[dict, dict]:
    metrics = train(compose([*data, *TINY_DATA_OVERRIDES, *TINY_RUN, f"paths.output_dir={output}"]))
    checkpoint = next(output.rglob("last.ckpt"))
    tested = evaluate(
        compose(
            [
                f"ckpt_path={checkpoint}",
                *data,
                "data.eval_split=test",
                *TINY_DATA_OVERRIDES,
                "trainer.accelerator=cpu",
                "+trainer.enable_progress_bar=false",
                f"paths.output_dir={output}/eval",
            ],
            config_name="eval",
        )
    )
    return metrics, tested


@pytest.fixture(scope="module")
def coco_reference(layouts, tmp_path_factory):
    return _train_and_test(_custom(layouts["coco"]), tmp_path_factory.mktemp("reference"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WRITERS))
def test_folder_trains_and_evaluates_like_coco_json(layouts, coco_reference, name, tmp_path):
    metrics, tested = _train_and_test(["data=folder", f"data.data_dir={layouts[name]}"], tmp_path)
    reference_metrics, reference_tested = coco_reference
    assert "val/loss" in metrics and "val/AP" in tested
    assert metrics == pytest.approx(reference_metrics, abs=1e-6)
    assert tested == pytest.approx(reference_tested, abs=1e-6)


def test_check_data_on_a_folder_reports_like_coco_json(layouts, tmp_path, capsys):
    from ddetr.training.preflight import check_data

    reports = {}
    for name, data in {
        "custom": _custom(layouts["coco"]),
        "voc_roboflow": ["data=folder", f"data.data_dir={layouts['voc_roboflow']}"],
        "coco_roboflow": ["data=folder", f"data.data_dir={layouts['coco_roboflow']}"],
    }.items():
        cfg = compose([*data, "data.num_workers=0", "num_pictures=1", f"output={tmp_path / name}"], "check_data")
        reports[name] = check_data(cfg)
        printed = capsys.readouterr().out
        assert f"6 images, {sum(len(i.boxes) for i in TINY['train'])} boxes, 3 classes" in printed
    for name, report in reports.items():
        assert {k: v for k, v in report.items() if k != "pictures"} == {
            k: v for k, v in reports["custom"].items() if k != "pictures"
        }, name


# ---------------------------------------------------------------------------------------- bad folders


def test_bad_folders_are_one_line_naming_the_path(tmp_path):
    empty = tmp_path / "nothing"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=rf"^{empty}: no dataset found: looked for COCO JSON .*YOLO .*Pascal VOC"):
        find_layout(empty)

    two = write_coco(tmp_path / "two")
    (two / "train.json").write_text(json.dumps(coco_dict(TINY["train"])))
    with pytest.raises(
        DatasetError, match=r"2 annotation files for the train split \(.*/two/train\.json, .*/two/annotations/"
    ):
        find_layout(two)

    both = write_yolo_roboflow(tmp_path / "both")
    write_voc_roboflow(both)
    with pytest.raises(
        DatasetError, match=r"more than one dataset layout \(YOLO data\.yaml: .*; VOC XML beside the images"
    ):
        find_layout(both)

    yolo = write_yolo_roboflow(tmp_path / "yolo")
    (yolo / "data.yaml").write_text("train: ../train/images\nval: ../missing/images\nnames: [bird, cat, dog]\n")
    module = FolderDataModule(yolo, num_workers=0)
    with pytest.raises(DatasetError) as error:
        module.val_dataset
    message = str(error.value)
    assert "\n" not in message and "'val' entry '../missing/images' is neither a folder nor a .txt list" in message
    assert f"{yolo.parent / 'missing' / 'images'} nor {yolo / 'missing' / 'images'}" in message

    for labels in (yolo / "valid" / "labels", yolo / "train" / "labels"):
        labels.rename(labels.with_name("annotations"))  # labels where Ultralytics does not look
    with pytest.raises(DatasetError) as error:
        FolderDataModule(yolo, num_workers=0).train_dataset
    assert str(error.value) == (
        f"{yolo / 'data.yaml'}: no label file for any of the 6 images of 'train' (looked for "
        f"{yolo / 'train' / 'labels' / TINY['train'][0].stem}.txt and the like: an image's path with its last "
        "/images/ replaced by /labels/, suffix .txt)"
    )

    no_test = write_coco_roboflow(tmp_path / "no_test", {"train": TINY["train"], "val": TINY["val"]})
    with pytest.raises(DatasetError, match=r"no test split in this Roboflow COCO JSON dataset \(found: train, val\)"):
        FolderDataModule(no_test, num_workers=0, eval_split="test").val_dataset

    studio = tmp_path / "label_studio"
    (studio / "images").mkdir(parents=True)
    (studio / "labels").mkdir()
    (studio / "classes.txt").write_text("bird\n")
    with pytest.raises(DatasetError, match=r"Label Studio's YOLO export, classes\.txt, is not read yet"):
        find_layout(studio)

    cvat = write_yolo_cvat(tmp_path / "cvat")
    (cvat / "obj.data").write_text("classes = 3\nnames: data/obj.names\n")
    with pytest.raises(DatasetError, match=r"obj\.data:2: expected 'key = value', got 'names: data/obj\.names'"):
        find_layout(cvat)


def test_voc_class_names_are_collected_sorted_and_other_empty_classes_kept(tmp_path, caplog):
    root = write_voc_roboflow(tmp_path / "voc")
    with caplog.at_level(logging.INFO, logger="ddetr.data"):
        module = VocDataModule(root, num_workers=0)
        assert module.category_names == CLASSES
    counts = {name: 0 for name in CLASSES}
    for images in TINY.values():
        for image in images:
            for label, *_ in image.boxes:
                counts[CLASSES[label]] += 1
    line = ", ".join(f"{name} ({count})" for name, count in counts.items())
    assert any(r.getMessage() == f"{root}: class names from the XML files (boxes): {line}" for r in caplog.records)
    # a COCO category without boxes that is nobody's supercategory keeps its class (check_data flags it)
    data = coco_dict(TINY["train"])
    data["categories"].append({"id": 9, "name": "zebra", "supercategory": "none"})
    (tmp_path / "train.json").write_text(json.dumps(data))
    from ddetr.data import CocoDetection

    dataset = CocoDetection(root / "train", tmp_path / "train.json")
    assert dataset.category_names == [*CLASSES, "zebra"] and dataset.dropped_categories == []


def test_eval_split_of_the_file_by_file_modules(layouts):
    """data=custom evaluates its test files with eval_split=test, says which keys are missing without them, and
    refuses an unknown split name; data=coco's test split is test2017/ with instances_test2017.json."""
    from ddetr.data import CocoDataModule, DetectionDataModule

    root = layouts["coco"]
    files = {
        f"{split}_{kind}": root / (split if kind == "images" else f"annotations/instances_{split}.json")
        for split in ("train", "val")
        for kind in ("images", "annotations")
    }
    tested = DetectionDataModule(
        **files,
        test_images=root / "test",
        test_annotations=root / "annotations" / "instances_test.json",
        eval_split="test",
        num_workers=0,
    )
    assert len(tested.val_dataset) == len(TINY["test"]) and tested.val_dataset.ann_file.name == "instances_test.json"
    with pytest.raises(DatasetError, match=r"^eval_split=test: set data\.test_images and data\.test_annotations$"):
        DetectionDataModule(**files, eval_split="test", num_workers=0).val_dataset
    with pytest.raises(ValueError, match=r"eval_split must be one of val, test, train, got 'holdout'"):
        DetectionDataModule(**files, eval_split="holdout")
    coco = CocoDataModule(root, eval_split="test", num_workers=0)
    with pytest.raises(DatasetError, match=r"annotations/instances_test2017\.json: cannot read annotation file"):
        coco.val_dataset
