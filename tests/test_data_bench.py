"""``python -m ddetr.bench data`` at a tiny size: every measurement runs and prints; the generated file is
the size asked for; the shape count agrees with a direct count."""

from __future__ import annotations

import json
import re

from ddetr.bench import main


def test_bench_data_runs_small(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "--num-images",
                "60",
                "--num-boxes",
                "300",
                "--jpegs",
                "3",
                "--batches",
                "1",
                "--repeats",
                "1",
                "--shape-images",
                "6",
                "--work-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "coco_like_60_300.json").read_text())
    assert len(data["images"]) == 60 and len(data["annotations"]) == 300
    assert "segmentation" not in data["annotations"][0]
    kept = 300 - sum(a["iscrowd"] for a in data["annotations"])
    assert f"60 images, {kept} boxes kept" in out
    assert re.search(r"forked worker after a pass \+ gc.collect\(\): USS [\d.]+ MiB", out)
    assert len(re.findall(r"pipeline, [12] worker\(s\)", out)) == 4 and "uint8 / float32 images/s with 2 workers" in out
    counts = [int(m) for m in re.findall(r"pad_to_multiple=\s*\d+:\s+(\d+) distinct over 6 images", out)]
    assert (
        len(counts) == 4 and 1 <= counts[-1] <= counts[0] <= 3
    )  # 3 batches of 2: at most 3 shapes, fewer when rounded
