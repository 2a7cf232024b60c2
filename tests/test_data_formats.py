"""YOLO and Pascal VOC beside COCO: one small dataset written in the three formats loads to the same
boxes and labels and evaluates to the same metrics; each format's bad input is one error or a counted skip."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr.data import DatasetError, DetectionDataModule, VocDataModule, YoloDataModule, make_val_transforms

CLASSES = ["cat", "dog", "bird"]
# (file stem, width, height, [(class index, x, y, w, h) in whole pixels, 0-based])
IMAGES = [
    ("img0", 64, 48, [(0, 4, 6, 40, 30), (2, 30, 10, 34, 38)]),
    ("img1", 48, 64, [(1, 0, 0, 48, 50)]),
    ("img2", 64, 64, []),  # a negative
    ("img3", 56, 40, [(2, 10, 5, 30, 20), (0, 1, 1, 54, 38), (1, 20, 20, 12, 12)]),
]


def _pixels(index: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_coco(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for index, (stem, width, height, boxes) in enumerate(IMAGES):
        _pixels(index, width, height).save(root / "images" / f"{stem}.jpg", quality=95)
        images.append({"id": index + 1, "file_name": f"{stem}.jpg", "width": width, "height": height})
        for label, x, y, w, h in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": 10 + label,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 10 + i, "name": name} for i, name in enumerate(CLASSES)]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_yolo(root: Path, coco_images: Path) -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for stem, width, height, boxes in IMAGES:
            shutil.copy(coco_images / f"{stem}.jpg", root / "images" / split / f"{stem}.jpg")
            if not boxes and split == "val":
                continue  # a negative without a label file (train: an empty one)
            lines = [
                f"{label} {(x + w / 2) / width!r} {(y + h / 2) / height!r} {w / width!r} {h / height!r}"
                for label, x, y, w, h in boxes
            ]
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines))
    (root / "data.yaml").write_text(
        "train: images/train\nval: images/val\nnames:\n" + "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASSES))
    )
    return root


def _voc_xml(stem: str, width: int, height: int, objects: list[tuple[str, int, int, int, int, int]]) -> str:
    parts = [
        f"<annotation><filename>{stem}.jpg</filename><size><width>{width}</width><height>{height}</height>"
        "<depth>3</depth></size>"
    ]
    for name, difficult, xmin, ymin, xmax, ymax in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def write_voc(root: Path, coco_images: Path) -> Path:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    for stem, width, height, boxes in IMAGES:
        shutil.copy(coco_images / f"{stem}.jpg", root / "JPEGImages" / f"{stem}.jpg")
        # 1-based inclusive corners: (x + 1, y + 1, x + w, y + h)
        objects = [(CLASSES[label], 0, x + 1, y + 1, x + w, y + h) for label, x, y, w, h in boxes]
        (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(stem, width, height, objects))
    for split in ("train", "val"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stem for stem, *_ in IMAGES) + "\n")
    return root


@pytest.fixture(scope="module")
def three_formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    coco = write_coco(root / "coco")
    options = dict(
        batch_size=2,
        num_workers=0,
        val_transforms=make_val_transforms(size=64, max_size=96),
        train_transforms=make_val_transforms(size=64, max_size=96),
    )
    return {
        "coco": DetectionDataModule(root / "coco" / "images", coco, root / "coco" / "images", coco, **options),
        "yolo": YoloDataModule(write_yolo(root / "yolo", root / "coco" / "images"), **options),
        "voc": VocDataModule(write_voc(root / "voc", root / "coco" / "images"), class_names=CLASSES, **options),
    }


def test_three_formats_load_identical_records_and_samples(three_formats):
    reference = three_formats["coco"]
    for name, module in three_formats.items():
        for split in ("train", "val"):
            ref, other = getattr(reference, f"{split}_dataset"), getattr(module, f"{split}_dataset")
            np.testing.assert_array_equal(other.records.boxes, ref.records.boxes, err_msg=f"{name} {split}")
            np.testing.assert_array_equal(other.box_labels, ref.box_labels)
            np.testing.assert_array_equal(other.records.box_offsets, ref.records.box_offsets)
            np.testing.assert_array_equal(other.records.sizes, ref.records.sizes)
            np.testing.assert_array_equal(other.records.image_ids, ref.records.image_ids)
            assert other.annotation_counts == ref.annotation_counts
            assert other.category_names == CLASSES
            for index in range(len(ref)):
                (image_a, target_a), (image_b, target_b) = ref[(index, 7)], other[(index, 7)]
                assert torch.equal(image_a, image_b)
                assert torch.equal(target_a["boxes"], target_b["boxes"]) and torch.equal(
                    target_a["labels"], target_b["labels"]
                )
    # against the hand-written table: image img3's boxes as (x0, y0, x1, y1)
    record = reference.train_dataset.records[3]
    np.testing.assert_array_equal(record.boxes, [[10, 5, 40, 25], [1, 1, 55, 39], [20, 20, 32, 32]])
    assert reference.train_dataset.box_labels[reference.train_dataset.records.box_slice(3)].tolist() == [2, 0, 1]
    assert reference.train_dataset.annotation_counts["empty_images"] == 1


def _jittered_detections(image_index: int) -> dict[str, torch.Tensor]:
    """Imperfect detections of IMAGES[image_index] in original pixels: shifted true boxes (the first with
    the wrong class) and one false positive, so that AP is strictly between 0 and 1."""
    _, width, height, boxes = IMAGES[image_index]
    rows = [
        ((label + 1) % 3 if k == 0 else label, [x + 2, y + 1, x + w + 1, y + h - 2])
        for k, (label, x, y, w, h) in enumerate(boxes)
    ] + [(0, [0, 0, width / 3, height / 3])]
    return {
        "scores": torch.linspace(0.9, 0.3, len(rows)),
        "labels": torch.tensor([r[0] for r in rows]),
        "boxes": torch.tensor([r[1] for r in rows], dtype=torch.float32),
    }


def test_one_checkpoint_evaluates_identically_on_all_three(three_formats, micro_options):
    from ddetr.training.evaluation import CocoEvaluator
    from ddetr.training.module import DeformableDETRModule

    torch.manual_seed(0)
    module = DeformableDETRModule(num_classes=len(CLASSES), **micro_options()).eval()
    results = {}
    for name, datamodule in three_formats.items():
        evaluator = CocoEvaluator(datamodule.val_coco, datamodule.label_to_category_id)
        fixed = CocoEvaluator(datamodule.val_coco, datamodule.label_to_category_id)
        with torch.no_grad():
            for batch in datamodule.val_dataloader():
                images, mask, targets = datamodule.on_after_batch_transfer(batch, 0)  # uint8 -> normalised
                detections = module.postprocess(module((images, mask)), torch.stack([t["orig_size"] for t in targets]))
                evaluator.update({int(t["image_id"]): d for t, d in zip(targets, detections)})
                fixed.update({int(t["image_id"]): _jittered_detections(int(t["image_id"]) - 1) for t in targets})
        results[name] = (evaluator.compute(), evaluator.per_class, fixed.compute(), fixed.per_class)
    assert 0 < results["coco"][2]["AP"] < 1 and 0 < results["coco"][2]["AP50"] < 1, results["coco"][2]
    assert results["coco"][3]["dog"]["num_gt"] == 2
    for name in ("yolo", "voc"):
        for mine, reference in zip(results[name], results["coco"]):
            assert mine == reference, name  # the same detections against the same ground truth: exactly


def test_yolo_rules(tmp_path, caplog):
    root = tmp_path / "set"
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "labels").mkdir(parents=True)
    for stem in ("a", "b", "c"):
        Image.new("RGB", (100, 50)).save(root / "data" / "images" / f"{stem}.png")
    labels = root / "data" / "labels"
    (labels / "a.txt").write_text("1 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6\n\n0 0.5 0.5 0.2 0.4\n")  # polygon, blank, box
    (labels / "b.txt").write_text("0 0.95 0.5 0.2 0.2\n")  # runs past the right edge: clipped, counted
    (root / "list.txt").write_text("./data/images/a.png\ndata/images/b.png\n\ndata/images/c.png\n")
    (root / "dataset.yaml").write_text("path: .\ntrain: list.txt\nval: [data/images]\nnc: 2\nnames: [x, y]\n")
    module = YoloDataModule(root, num_workers=0)
    with caplog.at_level(logging.WARNING):
        train = module.train_dataset
    records = train.records
    assert [records.file_name(i) for i in range(3)] == ["a.png", "b.png", "c.png"]
    # polygon (0.1..0.3, 0.2..0.6) -> (10, 10, 30, 30); box (40, 15, 60, 35); b: (85, 20, 105 -> 100, 30)
    np.testing.assert_allclose(records[0].boxes, [[10, 10, 30, 30], [40, 15, 60, 35]], atol=1e-5)
    np.testing.assert_allclose(records[1].boxes, [[85, 20, 100, 30]], atol=1e-5)
    assert records[0].category_ids.tolist() == [1, 0] and records[2].boxes.shape == (0, 4)
    assert train.annotation_counts["clipped"] == 1 and train.annotation_counts["empty_images"] == 1
    assert train.reader_problems == {"coordinates outside [0, 1]": 1}
    assert any("b.txt:1" in r.getMessage() for r in caplog.records)

    for text, message in [
        ("0 0.5 0.5 0.2\n", r"b\.txt:1: expected 'class cx cy w h'"),
        ("0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.1 0.1\n", r"b\.txt:2: class index 2 is not one of the 2"),
        ("0 0.5 nan 0.2 0.2\n", r"b\.txt:1: values must be finite"),
        ("0 0.5 zero 0.2 0.2\n", r"b\.txt:1: not a number"),
    ]:
        (labels / "b.txt").write_text(text)
        with pytest.raises(DatasetError, match=message):
            YoloDataModule(root, num_workers=0).train_dataset
    (root / "dataset.yaml").write_text("train: [unclosed\nnames: [x]\n")
    with pytest.raises(DatasetError, match=r"dataset\.yaml: malformed YAML at line 2"):
        YoloDataModule(root, num_workers=0).train_dataset
    (root / "dataset.yaml").write_text("train: list.txt\nval: list.txt\nnc: 3\nnames: [x, y]\n")
    with pytest.raises(DatasetError, match=r"nc=3 but 'names' has 2"):
        YoloDataModule(root, num_workers=0).train_dataset


def test_yolo_unreadable_image_is_counted_or_an_error(tmp_path):
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(root / "images" / "good.jpg")
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    (root / "labels").mkdir()
    (root / "labels" / "good.txt").write_text("")  # a negative with its (empty) label file
    (root / "data.yaml").write_text("train: images\nval: images\nnames: [x]\n")
    dataset = YoloDataModule(root, num_workers=0).val_dataset
    assert len(dataset) == 1 and dataset.reader_problems == {"unreadable image (cannot read image header), left out": 1}
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot read image header"):
        YoloDataModule(root, num_workers=0, skip_bad_images=False).val_dataset


def test_voc_difficult_boxes_are_crowd_like_and_bad_files_are_named(tmp_path, caplog):
    root = write_voc(tmp_path / "voc", _write_images(tmp_path))
    xml = root / "Annotations" / "img0.xml"
    xml.write_text(_voc_xml("img0", 64, 48, [("cat", 0, 5, 7, 44, 36), ("dog", 1, 1, 1, 64, 48)]))
    with caplog.at_level(logging.INFO):
        dataset = VocDataModule(root, class_names=CLASSES, num_workers=0).val_dataset
    assert dataset.annotation_counts["crowd"] == 1 and dataset.records[0].boxes.tolist() == [[4, 6, 44, 36]]
    assert any("excluded 1 difficult boxes" in r.getMessage() for r in caplog.records)
    crowd = [a for a in dataset.coco.dataset["annotations"] if a["iscrowd"]]
    assert [(a["image_id"], a["bbox"]) for a in crowd] == [(1, [0, 0, 64, 48])]

    for content, message in [
        (_voc_xml("img0", 64, 48, [("horse", 0, 1, 1, 5, 5)]), r"img0\.xml: <object> 1 has class name 'horse'"),
        ("<annotation><size>", r"img0\.xml: malformed XML at line 1"),
        ('<!DOCTYPE a [<!ENTITY e "x">]><annotation/>', r"img0\.xml: DTD or entity declarations"),
        (_voc_xml("img0", 64, 48, [("cat", 0, 1, 1, "x", 5)]), r"img0\.xml: <object> 1 <xmax> is not a number"),
    ]:
        xml.write_text(content)
        with pytest.raises(DatasetError, match=message):
            VocDataModule(root, class_names=CLASSES, num_workers=0).val_dataset
    (root / "ImageSets" / "Main" / "val.txt").write_text("img0\n../../etc/passwd\n")
    with pytest.raises(DatasetError, match=r"val\.txt:2: image id '\.\./\.\./etc/passwd' is not a plain file name"):
        VocDataModule(root, class_names=CLASSES, num_workers=0).val_dataset


def _write_images(tmp_path: Path) -> Path:
    folder = tmp_path / "pixels"
    folder.mkdir()
    for index, (stem, width, height, _) in enumerate(IMAGES):
        _pixels(index, width, height).save(folder / f"{stem}.jpg")
    return folder


def test_check_data_summary_is_the_same_for_each_format(tmp_path, capsys):
    from ddetr.app import compose
    from ddetr.training.preflight import check_data

    coco = write_coco(tmp_path / "coco")
    images = tmp_path / "coco" / "images"
    formats = {
        "custom": [
            f"data.train_images={images}",
            f"data.train_annotations={coco}",
            f"data.val_images={images}",
            f"data.val_annotations={coco}",
        ],
        "yolo": [f"data.data_dir={write_yolo(tmp_path / 'yolo', images)}"],
        "voc": [f"data.data_dir={write_voc(tmp_path / 'voc', images)}", f"data.class_names=[{','.join(CLASSES)}]"],
    }
    reports, printed = {}, {}
    for name, overrides in formats.items():
        cfg = compose(
            [
                f"data={name}",
                *overrides,
                "data.num_workers=0",
                "num_pictures=2",
                f"output={tmp_path / name}",
                f"paths.output_dir={tmp_path / name}",
            ],
            config_name="check_data",
        )
        reports[name] = check_data(cfg)
        printed[name] = capsys.readouterr().out
        assert len(list((tmp_path / name / "samples").glob("*.png"))) == 2
    expected_per_class = {"cat": 2, "dog": 2, "bird": 2}
    for name, report in reports.items():
        assert report["boxes_per_class"] == expected_per_class, name
        assert (report["images"], report["boxes"], report["images_without_boxes"]) == (4, 6, 1)
        assert {k: v for k, v in report.items() if k != "pictures"} == {
            k: v for k, v in reports["custom"].items() if k != "pictures"
        }
        assert "4 images, 6 boxes, 3 classes" in printed[name]
    assert "0 difficult" in printed["voc"] and "0 crowd" in printed["yolo"]
