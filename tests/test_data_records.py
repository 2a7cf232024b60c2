"""The flat record arrays: the same boxes, order and samples as the per-image objects they replaced
(a frozen copy of the previous cleaning code is the reference), and no Python object per image."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr.data import CocoDetection, make_train_transforms
from ddetr.data.records import DetectionRecords
from ddetr.data.validation import load_coco_json


def _frozen_previous_cleaning(data: dict, keep_empty: bool = True) -> tuple[list[tuple], dict]:
    """The cleaning of ddetr before the flat arrays (commit 8859312), kept verbatim in its logic:
    per image (id, file_name, width, height, boxes float32 (n, 4) xyxy, category ids int64 (n,))."""
    counts = dict.fromkeys(
        ("images", "boxes", "crowd", "degenerate", "clipped", "outside", "empty_images", "dropped_empty_images"), 0
    )
    per_image = {image["id"]: [] for image in data["images"]}
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            counts["degenerate"] += 1
            continue
        width, height = sizes[ann["image_id"]]
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            counts["outside"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["clipped"] += 1
        per_image[ann["image_id"]].append(([x0, y0, x1, y1], ann["category_id"]))
    images = []
    for image in data["images"]:
        entries = per_image[image["id"]]
        if not entries:
            counts["empty_images"] += 1
            if not keep_empty:
                counts["dropped_empty_images"] += 1
                continue
        boxes = np.array([box for box, _ in entries], dtype=np.float32).reshape(-1, 4)
        category_ids = np.array([cid for _, cid in entries], dtype=np.int64)
        images.append((image["id"], image["file_name"], image["width"], image["height"], boxes, category_ids))
        counts["boxes"] += len(entries)
    counts["images"] = len(images)
    return images, counts


def _random_coco(rng: np.random.Generator, num_images: int = 30, num_annotations: int = 200) -> dict:
    """Sparse, shuffled ids; annotations in random image order; every cleaning rule exercised."""
    image_ids = rng.choice(10**6, num_images, replace=False).tolist()
    images = [
        {
            "id": i,
            "file_name": f"d{k % 3}/{k}.png",
            "width": int(rng.integers(20, 60)),
            "height": int(rng.integers(20, 60)),
        }
        for k, i in enumerate(image_ids)
    ]
    category_ids = [3, 17, 1, 90]
    annotations = []
    for k in range(num_annotations):
        image = images[int(rng.integers(num_images - 3))]  # the last three images stay empty
        x, y = rng.uniform(-15, image["width"] + 5), rng.uniform(-15, image["height"] + 5)
        w, h = rng.uniform(-3, 40), rng.uniform(-3, 40)
        bbox = [round(float(x), 2), round(float(y), 2), round(float(w), 2), round(float(h), 2)]
        if k % 7 == 0:
            bbox = [int(v) for v in bbox]
        annotations.append(
            {
                "id": 5 * k + 2,
                "image_id": image["id"],
                "category_id": category_ids[k % 4],
                "bbox": bbox,
                **({"iscrowd": 1} if k % 11 == 0 else {}),
            }
        )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in category_ids],
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep_empty", [True, False])
def test_records_equal_the_previous_per_image_objects(tmp_path, seed, keep_empty):
    data = _random_coco(np.random.default_rng(seed))
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    expected, expected_counts = _frozen_previous_cleaning(json.loads(path.read_text()), keep_empty)
    dataset = CocoDetection(tmp_path, path, keep_empty=keep_empty, keep_coco=False)
    assert dataset.annotation_counts == expected_counts
    assert min(expected_counts[k] for k in ("crowd", "degenerate", "clipped", "outside", "empty_images")) > 0
    assert len(dataset.records) == len(expected)
    for index, (image_id, file_name, width, height, boxes, category_ids) in enumerate(expected):
        record = dataset.records[index]
        assert (record.image_id, record.file_name, record.width, record.height) == (image_id, file_name, width, height)
        np.testing.assert_array_equal(record.boxes, boxes)  # bit-identical float32
        np.testing.assert_array_equal(record.category_ids, category_ids)
        labels = dataset.box_labels[dataset.records.box_slice(index)]
        np.testing.assert_array_equal(labels, [dataset.mapping.category_id_to_label[c] for c in category_ids])


def test_samples_equal_those_of_the_previous_records(tmp_path):
    """Same seed, same sample: the transform applied to the frozen records gives the dataset's output."""
    data = _random_coco(np.random.default_rng(5), num_images=6, num_annotations=30)
    rng = np.random.default_rng(0)
    for image in data["images"]:
        (tmp_path / image["file_name"]).parent.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / image["file_name"])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    transforms = make_train_transforms(
        scales=[32, 40], max_size=64, crop_resize_scales=[24], crop_min_size=16, crop_max_size=30
    )
    dataset = CocoDetection(tmp_path, path, transforms, keep_coco=False)
    expected, _ = _frozen_previous_cleaning(data)
    mapping = dataset.mapping.category_id_to_label
    for index, (image_id, file_name, _, _, boxes, category_ids) in enumerate(expected):
        for seed in (0, 123):
            pixels = np.asarray(Image.open(tmp_path / file_name).convert("RGB"))
            labels = np.array([mapping[c] for c in category_ids], dtype=np.int64)
            image, out_boxes, out_labels = transforms(pixels, boxes, labels, seed=seed)
            got_image, target = dataset[(index, seed)]
            assert torch.equal(got_image, image) and target["image_id"] == image_id
            assert torch.equal(target["labels"], out_labels.to(torch.int64))
            height, width = image.shape[-2:]
            xyxy = out_boxes.to(torch.float32).reshape(-1, 4)
            cxcywh = torch.stack(
                [
                    (xyxy[:, 0] + xyxy[:, 2]) / 2,
                    (xyxy[:, 1] + xyxy[:, 3]) / 2,
                    xyxy[:, 2] - xyxy[:, 0],
                    xyxy[:, 3] - xyxy[:, 1],
                ],
                -1,
            )
            torch.testing.assert_close(target["boxes"], cxcywh / torch.tensor([width, height, width, height]))


def test_the_training_dataset_holds_no_object_per_image(tmp_path):
    data = _random_coco(np.random.default_rng(3), num_images=400, num_annotations=2000)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    gc.collect()
    dataset = CocoDetection(tmp_path, path, keep_coco=False)
    assert dataset._data is None
    with pytest.raises(RuntimeError, match="keep_coco=False"):
        dataset.coco
    # everything reachable from the dataset: a bounded number of objects, independent of the image count
    seen, stack = set(), [dataset]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, type(json))):
            continue
        seen.add(id(obj))
        if obj is dataset.transforms:
            continue
        stack.extend(gc.get_referents(obj))
    assert len(seen) < 400, len(seen)
    arrays = vars(dataset.records)
    assert all(isinstance(a, np.ndarray) for a in arrays.values()) and len(arrays) == 7
    assert (
        isinstance(dataset.records, DetectionRecords)
        and dataset.records.num_boxes == dataset.annotation_counts["boxes"]
    )


def test_the_val_dataset_keeps_the_coco_index(tmp_path):
    data = _random_coco(np.random.default_rng(4), num_images=5, num_annotations=12)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    coco = CocoDetection(tmp_path, path).coco
    assert sorted(coco.getImgIds()) == sorted(i["id"] for i in load_coco_json(path)["images"])
    assert len(coco.getAnnIds()) == 12


def _assert_same_columns(got, expected) -> None:
    for name, value in vars(expected).items():
        if isinstance(value, np.ndarray):
            assert getattr(got, name).dtype == value.dtype, name
            np.testing.assert_array_equal(getattr(got, name), value, err_msg=name)
        else:
            assert getattr(got, name) == value, name


def _unusual_but_valid_coco_text() -> str:
    """A valid file with what a typed reader could get wrong: unused fields of every JSON kind (NaN-free),
    non-ASCII names, an escaped key, crowd flags as bool and 2, int and float boxes, ids near int64's ends,
    a duplicated key (the last one counts)."""
    data = _random_coco(np.random.default_rng(7), num_images=12, num_annotations=60)
    data["images"][0]["file_name"] = "dossier é/画像 1.jpg"
    new_ids = {data["images"][1]["id"]: 2**63 - 1, data["images"][2]["id"]: -(2**63)}
    for image in data["images"]:
        image["id"] = new_ids.get(image["id"], image["id"])
    for k, ann in enumerate(data["annotations"]):
        ann["image_id"] = new_ids.get(ann["image_id"], ann["image_id"])
        ann["segmentation"] = [[1.5, 2, 3e-5, 1e300]] if k % 2 else {"counts": "x\u00e9", "size": [3, 4]}
        ann["area"] = None if k % 3 else 12.25
        if k % 5 == 0:
            ann["iscrowd"] = [True, 2, 0, False][k % 4]
    data["info"] = {"nested": [{"deep": [[], {}, None, True, -0.0, 1e-320]}], "text": '\u2603 \\ " /'}
    text = json.dumps(data, ensure_ascii=False)
    assert '"file_name": "d0/3.png"' in text
    return text.replace('"file_name": "d0/3.png"', '"file\\u005fname": "x/first.png", "file_name": "d0/3.png"')


def test_the_column_reader_gives_the_columns_of_the_general_reader(tmp_path, monkeypatch):
    """The typed decoding (no dict per entry) against `json` + `validate_coco` on an unusual valid file; and
    the same columns again when msgspec is absent."""
    from ddetr.data import column_reader
    from ddetr.data.validation import read_coco_json

    path = tmp_path / "ann.json"
    path.write_text(_unusual_but_valid_coco_text(), encoding="utf-8")
    expected = read_coco_json(path)[1]
    assert expected.file_names[0] == "dossier é/画像 1.jpg" and expected.file_names[3] == "d0/3.png"
    assert expected.iscrowd.any() and expected.image_ids.min() == -(2**63)
    assert column_reader._typed_columns(path.read_bytes()) is not None  # the typed path, not the fallback
    _assert_same_columns(column_reader.read_coco_columns(path), expected)
    monkeypatch.setattr(column_reader, "msgspec", None)
    _assert_same_columns(column_reader.read_coco_columns(path), expected)


@pytest.mark.parametrize(
    "old, new",
    [
        ('"iscrowd": 1', '"iscrowd": null'),  # valid, an unusual type: accepted by the fallback
        ('"iscrowd": 1', '"iscrowd": "yes"'),
        ('"categories": [', '"unused": "\\ud800", "categories": ['),  # a lone surrogate json takes
        ('"categories": [', '"unused": [NaN, Infinity], "categories": ['),
        ('"categories": [', '"unused": "\xff", "categories": ['),  # invalid UTF-8 (written as latin-1)
        ('"bbox": [', '"bbox": [NaN, '),
        ('"bbox": [', '"bbox": [true, '),
        ('"bbox": [', '"bbox": [1e400, '),
        ('"bbox": [', '"bbox": ['),  # (the base file: valid)
        ('"id": 2,', '"id": 18446744073709551616,'),
        ('"id": 2,', '"id": 9223372036854775808,'),
        ('"id": 2,', '"id": 2.0,'),
        ('"id": 2,', '"id": true,'),
        ('"category_id": 3,', '"category_id": 4,'),  # unknown category
        ('"width": ', '"width": -'),
        ('"file_name": "d0/0.png"', '"file_name": "../0.png"'),
        ('"categories": [', '"categories": [,'),  # malformed: the message gives line and column
    ],
)
def test_a_file_the_typed_decoding_refuses_is_read_as_by_the_general_reader(tmp_path, old, new):
    from ddetr.data.column_reader import read_coco_columns
    from ddetr.data.validation import DatasetError, read_coco_json

    text = json.dumps(_random_coco(np.random.default_rng(8), num_images=6, num_annotations=40))
    assert old in text
    path = tmp_path / "ann.json"
    path.write_bytes(text.replace(old, new, 1).encode("latin-1" if "\xff" in new else "utf-8"))
    try:
        expected = read_coco_json(path)[1]
    except DatasetError as exc:
        with pytest.raises(DatasetError) as info:
            read_coco_columns(path)
        assert str(info.value) == str(exc) and "ann.json" in str(exc)
    else:
        _assert_same_columns(read_coco_columns(path), expected)
