"""``python -m ddetr.check_data``: pictures, a summary that adds up, and the overfit verdict line."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from _runs import run_entry
from PIL import Image


@pytest.mark.slow
def test_pictures_summary_and_overfit_line(tmp_path):
    out = tmp_path / "check"
    options = ["preset=debug", f"output={out}", "overfit=true", "overfit_steps=3", "overfit_images=4"]
    options += ["num_pictures=5", f"paths.output_dir={out}", f"paths.data_dir={tmp_path}/data"]
    result = run_entry("ddetr.check_data", options, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    # the last line is the verdict, and it follows the AP50 and the threshold
    verdict = re.fullmatch(
        r"overfit: (PASS|FAIL) \(AP50 (\d\.\d{3}) on 4 training images after 3 steps; PASS needs >= 0.5\)", lines[-1]
    )
    assert verdict, lines[-1]
    assert (verdict.group(1) == "PASS") == (float(verdict.group(2)) >= 0.5)
    report = json.loads((out / "check_data.json").read_text())
    assert report["overfit_passed"] == (verdict.group(1) == "PASS")
    assert abs(report["overfit_ap50"] - float(verdict.group(2))) < 1e-3
    # pictures of augmented samples, one per requested sample
    pictures = sorted((out / "samples").glob("*.png"))
    assert len(pictures) == 5 and Image.open(pictures[0]).size[0] > 0
    # the summary adds up to the annotation file: boxes per class by name
    annotations = json.loads((tmp_path / "data" / "synthetic" / "annotations" / "instances_train.json").read_text())
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    expected = Counter(names[a["category_id"]] for a in annotations["annotations"])
    assert report["boxes_per_class"] == {name: expected.get(name, 0) for name in names.values()}
    assert report["images"] == len(annotations["images"]) and report["boxes"] == len(annotations["annotations"])
    for name, count in report["boxes_per_class"].items():
        assert any(line.split() == [name, str(count)] for line in lines), name
    sizes = report["relative_box_size_percentiles"]
    assert 0 < sizes["min"] <= sizes["median"] <= sizes["max"] <= 1
    assert len([line for line in lines if line.strip()]) < 30  # one screen
