"""Annotation-file validation, box cleaning counts and category mapping."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from ddetr.data import CategoryMapping, CocoDetection, DatasetError
from ddetr.data.validation import load_coco_json


def _coco(images=None, annotations=None, categories=None) -> dict:
    return {
        "images": images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": annotations
        if annotations is not None
        else [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5]}],
        "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
    }


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_valid_file_loads(tmp_path):
    data = load_coco_json(_write(tmp_path, _coco()))
    assert len(data["images"]) == 1


def test_malformed_json_names_file_and_position(tmp_path):
    path = _write(tmp_path, '{"images": [\n  {"id": 1,, }\n]}', "broken.json")
    with pytest.raises(DatasetError) as info:
        load_coco_json(path)
    message = str(info.value)
    assert "broken.json" in message and "malformed JSON" in message
    assert "line 2 column 12" in message


def test_unreadable_file(tmp_path):
    with pytest.raises(DatasetError, match="missing.json"):
        load_coco_json(tmp_path / "missing.json")


def test_missing_top_level_keys(tmp_path):
    data = _coco()
    del data["categories"], data["annotations"]
    with pytest.raises(DatasetError) as info:
        load_coco_json(_write(tmp_path, data))
    assert "ann.json" in str(info.value)
    assert "'annotations'" in str(info.value) and "'categories'" in str(info.value)


def test_missing_entry_keys_name_ids(tmp_path):
    annotations = [
        {"id": 5, "image_id": 1, "category_id": 1},
        {"id": 6, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]},
    ]
    images = [{"id": 1, "file_name": "a.jpg", "width": 40}]
    with pytest.raises(DatasetError) as info:
        load_coco_json(_write(tmp_path, _coco(images=images, annotations=annotations)))
    message = str(info.value)
    assert "annotations [5] lack required key 'bbox'" in message
    assert "images [1] lack required key 'height'" in message


def test_wrong_types_are_reported(tmp_path):
    annotations = [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}]
    images = [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 30}]
    with pytest.raises(DatasetError) as info:
        load_coco_json(_write(tmp_path, _coco(images=images, annotations=annotations)))
    assert "annotations [3] have an invalid 'bbox'" in str(info.value)
    assert "images [1] have an invalid 'width'" in str(info.value)


def test_duplicate_ids_first_five_shown(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in [1, 2, 3, 4, 5, 6, 7]] * 2
    with pytest.raises(DatasetError) as info:
        load_coco_json(_write(tmp_path, _coco(images=images)))
    assert "duplicate image ids [1, 2, 3, 4, 5 and 2 more]" in str(info.value)

    annotations = [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}] * 2
    with pytest.raises(DatasetError, match=r"duplicate annotation ids \[9\]"):
        load_coco_json(_write(tmp_path, _coco(annotations=annotations)))


def test_unknown_references_in_one_error(tmp_path):
    annotations = [
        {"id": 10, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]},
        {"id": 11, "image_id": 1, "category_id": 42, "bbox": [0, 0, 1, 1]},
    ]
    with pytest.raises(DatasetError) as info:
        load_coco_json(_write(tmp_path, _coco(annotations=annotations), "val.json"))
    message = str(info.value)
    assert "val.json" in message
    assert "annotations [10] point at unknown image ids" in message
    assert "annotations [11] point at unknown category ids" in message


def test_cleaning_counts_and_boxes(tmp_path, caplog):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / name)
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5]},  # kept as is
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "bbox": [5, 5, 0, 4],
        },  # degenerate (zero width)
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "bbox": [5, 5, 3, -1],
        },  # degenerate (negative)
        {
            "id": 4,
            "image_id": 1,
            "category_id": 1,
            "bbox": [-4, 20, 10, 20],
        },  # clipped -> [0, 20, 6, 30]
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [50, 5, 10, 10]},  # outside
        {
            "id": 6,
            "image_id": 1,
            "category_id": 1,
            "bbox": [2, 2, 5, 5],
            "iscrowd": 1,
        },  # crowd
        {
            "id": 7,
            "image_id": 2,
            "category_id": 1,
            "bbox": [41, 0, 5, 5],
        },  # outside -> image 2 empty
    ]
    path = _write(tmp_path, _coco(images=images, annotations=annotations))
    with caplog.at_level(logging.INFO, logger="ddetr.data.coco"):
        dataset = CocoDetection(tmp_path, path)
    assert dataset.annotation_counts == {
        "images": 2,
        "boxes": 2,
        "crowd": 1,
        "degenerate": 2,
        "clipped": 1,
        "outside": 2,
        "empty_images": 1,
        "dropped_empty_images": 0,
    }
    summary = [r for r in caplog.records if "ann.json" in r.getMessage()]
    assert len(summary) == 1 and summary[0].levelno == logging.WARNING
    assert "dropped 2 degenerate and 2 outside" in summary[0].getMessage()
    np.testing.assert_allclose(dataset.records[0].boxes, [[1, 2, 11, 7], [0, 20, 6, 30]])
    assert dataset.records[1].boxes.shape == (0, 4)

    # normalised cxcywh targets of the untransformed image
    _, target = dataset[0]
    np.testing.assert_allclose(target["boxes"][0].numpy(), [6 / 40, 4.5 / 30, 10 / 40, 5 / 30], rtol=1e-6)
    assert target["labels"].tolist() == [0, 0] and target["image_id"] == 1
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)

    without_empty = CocoDetection(tmp_path, path, keep_empty=False)
    assert len(without_empty) == 1 and without_empty.annotation_counts["dropped_empty_images"] == 1


def test_category_mapping_modes():
    categories = [
        {"id": 7, "name": "g"},
        {"id": 3, "name": "c"},
        {"id": 1, "name": "a"},
    ]
    contiguous = CategoryMapping(categories, "contiguous")
    assert contiguous.num_classes == 3
    assert contiguous.label_to_category_id == [1, 3, 7]
    assert contiguous.category_names == ["a", "c", "g"]
    assert contiguous.category_id_to_label == {1: 0, 3: 1, 7: 2}

    coco91 = CategoryMapping(categories, "coco91")
    assert coco91.num_classes == 8
    assert coco91.label_to_category_id == list(range(8))
    assert coco91.category_names[3] == "c" and coco91.category_names[0] == "N/A"
    assert coco91.category_id_to_label == {1: 1, 3: 3, 7: 7}
    with pytest.raises(ValueError):
        CategoryMapping(categories, "other")


def test_coco91_labels_in_targets(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    data = _coco(
        annotations=[{"id": 1, "image_id": 1, "category_id": 90, "bbox": [1, 2, 10, 5]}],
        categories=[{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}],
    )
    dataset = CocoDetection(tmp_path, _write(tmp_path, data), category_mapping="coco91")
    assert dataset.num_classes == 91
    assert dataset[0][1]["labels"].tolist() == [90]
    assert dataset.category_names[90] == "toothbrush"
