"""Untrusted annotation files: paths that leave the image folder, FIFOs and devices, numbers that do not fit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from ddetr.data import CocoDetection, DatasetError
from ddetr.data.image_loading import ImageLoadError, load_rgb_image
from ddetr.data.validation import load_coco_json


def _coco(file_names=("a.jpg",), category_id=1, categories=None) -> dict:
    return {
        "images": [{"id": i + 1, "file_name": n, "width": 40, "height": 30} for i, n in enumerate(file_names)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": category_id, "bbox": [1, 2, 10, 5]}],
        "categories": categories or [{"id": category_id, "name": "thing"}],
    }


def _write(tmp_path, text, name="ann.json"):
    path = tmp_path / name
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


@pytest.mark.parametrize(
    "bad", ["../secret.jpg", "/etc/hostname", "sub/../../secret.jpg", "", "sub/..", "..\\\\secret.jpg", "C:/x.jpg"]
)
def test_file_names_leaving_the_image_folder_are_refused(tmp_path, bad):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "secret.jpg")
    path = _write(tmp_path, _coco(["a.jpg", bad, "b/c.jpg"]))
    with pytest.raises(DatasetError) as info:
        CocoDetection(tmp_path / "images", path)
    message = str(info.value)
    assert "ann.json" in message and "1 images [2]" in message and "leaves the image folder" in message


def test_safe_relative_names_and_symlinks_inside_the_folder_load(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    farm = tmp_path / "farm"
    farm.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(farm / "real.jpg")
    os.symlink(farm / "real.jpg", images / "sub" / "link.jpg")  # a symlink farm: allowed
    Image.new("RGB", (40, 30), (10, 200, 10)).save(images / "..hidden.jpg")  # a name starting with '..' is fine
    dataset = CocoDetection(images, _write(tmp_path, _coco(["sub/link.jpg", "..hidden.jpg"])), skip_bad_images=False)
    assert [dataset[i][1]["image_id"] for i in range(2)] == [1, 2]


@pytest.mark.timeout(60)
def test_fifo_and_device_are_skipped_not_read(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    os.mkfifo(images / "pipe.jpg")  # no writer: a plain open would block forever
    os.symlink("/dev/zero", images / "zero.jpg")  # endless data
    Image.new("RGB", (40, 30)).save(images / "ok.jpg")
    for name, kind in (("pipe.jpg", "a FIFO"), ("zero.jpg", "a character device")):
        with pytest.raises(ImageLoadError, match=f"not a regular file \\({kind}\\)"):
            load_rgb_image(images / name)
    dataset = CocoDetection(images, _write(tmp_path, _coco(["pipe.jpg", "zero.jpg", "ok.jpg"])))
    _, target = dataset[0]
    assert target["image_id"] == 3
    assert [(r.image_id, r.reason) for r in target["skipped"]] == [
        (1, "not a regular file (a FIFO)"),
        (2, "not a regular file (a character device)"),
    ]
    strict = CocoDetection(images, _write(tmp_path, _coco(["pipe.jpg"]), "strict.json"), skip_bad_images=False)
    with pytest.raises(DatasetError, match=r"pipe\.jpg \(image id 1\): not a regular file"):
        strict[0]


def test_huge_category_id_with_coco91_is_one_error(tmp_path):
    path = _write(tmp_path, _coco(category_id=10_000_000_000))
    with pytest.raises(DatasetError) as info:
        CocoDetection(tmp_path, path, category_mapping="coco91")
    assert "ann.json" in str(info.value) and "10000000000" in str(info.value)
    # the contiguous mapping has no such limit: one class
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    assert CocoDetection(tmp_path, path).num_classes == 1


@pytest.mark.parametrize(
    "where, literal, expected",
    [
        ("category", "1" + "0" * 400, "have an invalid 'category_id'"),
        ("annotation_id", "1" + "0" * 400, "have a non-integer 'id'"),
        ("annotation_id", "9" * 5000, "have a non-integer 'id'"),  # beyond Python's 4300-digit parser limit
        ("bbox", "1" + "0" * 400, "have an invalid 'bbox'"),
        ("width", "4" * 20, "have an invalid 'width'"),
        ("category_id_float", "1e10", "have an invalid 'category_id'"),
    ],
)
def test_numbers_that_do_not_fit_are_one_dataset_error(tmp_path, where, literal, expected):
    text = json.dumps(_coco())
    if where == "category":
        text = text.replace('"category_id": 1,', f'"category_id": {literal},')
    elif where == "annotation_id":
        text = text.replace('"annotations": [{"id": 1,', f'"annotations": [{{"id": {literal},')
    elif where == "bbox":
        text = text.replace('"bbox": [1, 2, 10, 5]', f'"bbox": [1, 2, {literal}, 5]')
    elif where == "width":
        text = text.replace('"width": 40', f'"width": {literal}')
    else:
        text = text.replace('"category_id": 1,', f'"category_id": {literal},')
    path = _write(tmp_path, text)
    with pytest.raises(DatasetError) as info:
        load_coco_json(path)
    assert "ann.json" in str(info.value) and expected in str(info.value)


def test_valid_large_but_fitting_ids_load(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    data = _coco(category_id=2**62)
    data["images"][0]["id"] = data["annotations"][0]["image_id"] = 2**63 - 1
    dataset = CocoDetection(tmp_path, _write(tmp_path, data))
    assert dataset.records.image_ids.tolist() == [2**63 - 1] and dataset.label_to_category_id == [2**62]
    np.testing.assert_array_equal(dataset.records.boxes, [[1, 2, 11, 7]])


def test_voc_xml_in_utf16_with_an_entity_is_refused(tmp_path):
    """The DTD guard works on the parsed document, not on raw bytes: a UTF-16 file hides `<!ENTITY` from a byte
    search but not from defusedxml."""
    from ddetr.data.voc import parse_xml

    text = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a [<!ENTITY e "boom">]><annotation>&e;</annotation>'
    path = tmp_path / "a.xml"
    path.write_bytes(text.encode("utf-16"))
    assert b"<!ENTITY" not in path.read_bytes()
    with pytest.raises(DatasetError, match=r"a\.xml: DTD or entity declarations are not accepted"):
        parse_xml(path)
    plain = tmp_path / "b.xml"
    plain.write_bytes('<?xml version="1.0" encoding="UTF-16"?><annotation><size/></annotation>'.encode("utf-16"))
    assert parse_xml(plain).find("size") is not None  # UTF-16 itself is fine


def test_oversized_yaml_and_split_lists_are_one_error(tmp_path):
    """Dataset YAMLs, VOC split lists and YOLO image lists are capped like label and XML files (sparse files
    one byte over the cap: nothing beyond it is read)."""
    from ddetr.data import VocDataModule, YoloDataModule
    from ddetr.data.files import MAX_TEXT_BYTES

    def oversized(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            file.truncate(MAX_TEXT_BYTES + 1)
        return path

    yolo = tmp_path / "yolo"
    oversized(yolo / "data.yaml")
    with pytest.raises(DatasetError, match=r"data\.yaml: the dataset YAML is larger than 64 MiB$"):
        YoloDataModule(yolo, num_workers=0).val_dataset
    (yolo / "data.yaml").write_text("train: list.txt\nval: list.txt\nnames: [x]\n")
    oversized(yolo / "list.txt")
    with pytest.raises(DatasetError, match=r"list\.txt: the image list is larger than 64 MiB$"):
        YoloDataModule(yolo, num_workers=0).val_dataset
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    oversized(voc / "ImageSets" / "Main" / "val.txt")
    with pytest.raises(DatasetError, match=r"val\.txt: the split list is larger than 64 MiB$"):
        VocDataModule(voc, class_names=["x"], num_workers=0).val_dataset
