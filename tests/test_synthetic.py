"""The synthetic dataset: determinism, caching, atomicity and content ranges."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ddetr.data import SHAPES, DatasetError, ensure_synthetic_dataset

SMALL = {"num_train": 24, "num_val": 8, "image_size": 64, "progress": False}


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_independent_of_workers(tmp_path):
    options = dict(num_train=70, num_val=8, image_size=64, progress=False)
    a = ensure_synthetic_dataset(tmp_path / "a", num_workers=2, **options)
    b = ensure_synthetic_dataset(tmp_path / "b", num_workers=0, **options)
    assert _tree_bytes(a) == _tree_bytes(b)
    c = ensure_synthetic_dataset(tmp_path / "c", seed=1, **SMALL)
    assert (c / "train" / "000001.jpg").read_bytes() != (a / "train" / "000001.jpg").read_bytes()
    # val is a held-out stream, not a copy of train
    assert (a / "val" / "000001.jpg").read_bytes() != (a / "train" / "000001.jpg").read_bytes()


def test_cached_and_regenerated_on_new_parameters(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "s", **SMALL)
    marker = root / "user_file.txt"
    marker.write_text("kept while the parameters match")
    mtime = os.stat(root / "manifest.json").st_mtime_ns
    ensure_synthetic_dataset(tmp_path / "s", **SMALL)
    assert marker.exists() and os.stat(root / "manifest.json").st_mtime_ns == mtime

    ensure_synthetic_dataset(tmp_path / "s", **{**SMALL, "num_val": 5})
    assert not marker.exists()
    assert len(list((root / "val").glob("*.jpg"))) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folders left behind


def test_a_folder_that_is_not_ours_is_refused_and_left_intact(tmp_path):
    """A non-empty folder without our manifest (the user's files, an interrupted copy) is never replaced."""
    root = tmp_path / "s"
    (root / "train").mkdir(parents=True)
    (root / "train" / "000001.jpg").write_bytes(b"user data")
    (root / "notes.txt").write_text("mine")
    before = _tree_bytes(root)
    with pytest.raises(DatasetError, match="refusing to replace or delete it"):
        ensure_synthetic_dataset(root, **SMALL)
    assert _tree_bytes(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary or renamed copies left behind
    # a file at root is refused too; an empty folder is used
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        ensure_synthetic_dataset(tmp_path / "file", **SMALL)
    (tmp_path / "empty").mkdir()
    ensure_synthetic_dataset(tmp_path / "empty", **SMALL)
    assert (tmp_path / "empty" / "manifest.json").is_file()


def test_train_cli_refuses_a_foreign_data_root_in_one_line(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("irreplaceable")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddetr.train",
            "preset=debug",
            f"data.root={root}",
            f"paths.output_dir={tmp_path}/out",
            f"paths.log_dir={tmp_path}/logs",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode != 0
    assert (root / "thesis.tex").read_text() == "irreplaceable" and sorted(os.listdir(root)) == ["thesis.tex"]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(root) in last and "Traceback" not in result.stderr


def test_content_ranges(tmp_path):
    size = 96
    root = ensure_synthetic_dataset(tmp_path / "s", num_train=60, num_val=10, image_size=size, progress=False)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    names = [c["name"] for c in data["categories"]]
    assert len(names) >= 5 and names == list(SHAPES) and len(set(names)) == len(names)
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert set(per_image) == {image["id"] for image in data["images"]}  # every image has objects
    assert 1 <= min(per_image.values()) and max(per_image.values()) <= 10
    assert len(set(per_image.values())) > 3  # varied counts
    boxes = np.array([a["bbox"] for a in data["annotations"]], dtype=float)
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, :2] + boxes[:, 2:] <= size)
    assert np.all(boxes[:, 2:] >= 1)
    sides = boxes[:, 2:].max(axis=1)
    assert sides.max() <= 0.5 * size + 1  # largest extent: half the image side
    assert np.percentile(sides, 5) < 0.15 * size and np.percentile(sides, 95) > 0.35 * size
    areas = np.array([a["area"] for a in data["annotations"]])
    assert np.all(areas <= boxes[:, 2] * boxes[:, 3]) and np.all(areas > 0)
    assert len({a["category_id"] for a in data["annotations"]}) == len(SHAPES)
    # images decode at the declared size, and pycocotools reads the file
    image = data["images"][0]
    assert Image.open(root / "train" / image["file_name"]).size == (
        image["width"],
        image["height"],
    )
    coco = COCO(str(root / "annotations" / "instances_val.json"))
    assert len(coco.getImgIds()) == 10 and len(coco.getCatIds()) == len(SHAPES)


def test_objects_stand_out_from_background(tmp_path):
    """Object pixels are saturated, background pixels are not (the clutter is not confusable)."""
    root = ensure_synthetic_dataset(tmp_path / "s", **SMALL)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    inside, outside = [], []
    for image in data["images"][:8]:
        pixels = np.asarray(Image.open(root / "train" / image["file_name"]).convert("HSV"), dtype=float)
        covered = np.zeros(pixels.shape[:2], bool)
        for a in data["annotations"]:
            if a["image_id"] == image["id"]:
                x, y, w, h = a["bbox"]
                covered[y : y + h, x : x + w] = True
        inside.append(pixels[covered, 1].mean())
        outside.append(pixels[~covered, 1].mean())
    assert np.mean(inside) > 2 * np.mean(outside)


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError):
        ensure_synthetic_dataset(tmp_path / "x", num_train=0, progress=False)
    with pytest.raises(ValueError):
        ensure_synthetic_dataset(tmp_path / "x", min_object_frac=0.6, max_object_frac=0.5, progress=False)
