"""Prediction: `python -m ddetr.predict` on a folder of images, checked against the model itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr.app import compose
from ddetr.checkpoints import save_checkpoint
from ddetr.data import ensure_synthetic_dataset, make_val_transforms
from ddetr.data.category_mapping import COCO91_NAMES
from ddetr.training.module import DeformableDETRModule
from ddetr.inference.predict import predict, resolve_class_names, resolve_resize
from ddetr.checkpoints import load_module

ROOT = Path(__file__).resolve().parents[1]


def make_module(options: dict, num_classes: int, seed: int = 0, **kwargs) -> DeformableDETRModule:
    """A randomly initialised module of ``options`` (``micro_options()``) with ``num_classes``."""
    torch.manual_seed(seed)
    return DeformableDETRModule(num_classes=num_classes, **options, **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic_dataset(root, num_train=2, num_val=5, image_size=64)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset, micro_options) -> Path:
    annotations = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    categories = sorted(annotations["categories"], key=lambda c: c["id"])
    module = make_module(
        micro_options(),
        len(categories),
        label_to_category_id=[c["id"] for c in categories],
        category_names=[c["name"] for c in categories],
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    save_checkpoint(module, path, "test")
    return path


def predict_config(checkpoint: Path, input_path: Path, output: Path, *extra: str):
    return compose(
        [
            f"ckpt_path={checkpoint}",
            f"input={input_path}",
            f"output={output}",
            "size=96",
            "max_size=144",
            "device=cpu",
            "progress_bar=false",
            f"paths.log_dir={output}/logs",
            *extra,
        ],
        config_name="predict",
    )


def test_predict_matches_the_model_and_writes_coco_results(tmp_path, dataset, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    files = sorted((dataset / "val").glob("*.jpg"))
    for file in files:
        (images / file.name).write_bytes(file.read_bytes())
    output = tmp_path / "out"
    cfg = predict_config(
        checkpoint,
        images,
        output,
        "threshold=0.0",
        "batch_size=2",
        f"annotations={dataset / 'annotations' / 'instances_val.json'}",
    )
    summary = predict(cfg)

    assert summary["num_images"] == len(files) and not summary["skipped"]
    assert sorted(p.name for p in (output / "images").glob("*.png")) == [f.stem + ".png" for f in files]
    annotations = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    ids = {entry["file_name"]: entry["id"] for entry in json.loads((output / "images.json").read_text())}
    assert ids == {image["file_name"]: image["id"] for image in annotations["images"]}

    results = json.loads((output / "detections.json").read_text())
    # reference: the module on the same file, resized the same way, boxes scaled to the file size
    module = load_module(checkpoint)
    pixels = np.asarray(Image.open(files[0]).convert("RGB"))
    tensor, _, _ = make_val_transforms(96, 144)(pixels, np.zeros((0, 4)), np.zeros((0,), np.int64))
    (expected,) = module.predict_images([tensor], torch.tensor([pixels.shape[:2]]))
    mine = [r for r in results if r["image_id"] == ids[files[0].name]]
    assert len(mine) == len(expected["scores"])
    for result, score, label, box in zip(mine, expected["scores"], expected["labels"], expected["boxes"]):
        assert result["score"] == pytest.approx(float(score), abs=1e-6)
        assert result["category_id"] == module.label_to_category_id[int(label)]
        x0, y0, x1, y1 = box.tolist()
        assert result["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)

    # the results load into pycocotools against the ground truth
    from pycocotools.coco import COCO

    coco = COCO(str(dataset / "annotations" / "instances_val.json"))
    assert len(coco.loadRes(results).getAnnIds()) == len(results)


def test_unreadable_images_are_skipped_and_attention_pictures(tmp_path, dataset, checkpoint):
    image = sorted((dataset / "val").glob("*.jpg"))[0]
    images = tmp_path / "images"
    images.mkdir()
    (images / image.name).write_bytes(image.read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    output = tmp_path / "out"
    summary = predict(
        predict_config(checkpoint, images, output, "threshold=0.0", "attention=true", "attention_top_k=2")
    )
    assert summary["num_images"] == 1
    assert [Path(file).name for file, _ in summary["skipped"]] == ["broken.jpg"]
    assert "cannot decode" in summary["skipped"][0][1]
    assert sorted(p.name for p in (output / "attention").glob("*.png")) == [
        f"{image.stem}_0.png",
        f"{image.stem}_1.png",
    ]
    assert summary["num_detections"] == 10 * 6  # every (query, class): fewer than num_select
    predict(predict_config(checkpoint, image, tmp_path / "high", "threshold=0.999"))
    assert all(r["score"] >= 0.999 for r in json.loads((tmp_path / "high" / "detections.json").read_text()))


def test_missing_checkpoint_and_input_are_named(tmp_path, dataset, checkpoint):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        predict(predict_config(tmp_path / "nope.ckpt", dataset / "val", tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        predict(predict_config(checkpoint, tmp_path / "no_such_dir", tmp_path / "out"))


def test_resize_comes_from_config_then_training_run_then_official(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert resolve_resize(None, None, ckpt)[:2] == (800, 1333)
    (run / ".hydra" / "config.yaml").write_text("data:\n  val_transforms:\n    size: 128\n    max_size: 224\n")
    assert resolve_resize(None, None, ckpt)[:2] == (128, 224)
    assert resolve_resize(96, None, ckpt)[:2] == (96, 224)
    assert resolve_resize(64, 100, ckpt) == (64, 100, "config")


def test_class_names_of_a_converted_coco_checkpoint(micro_options):
    coco = make_module(micro_options(), 91)
    names = resolve_class_names(coco, "auto")
    assert names[1] == "person" and names[90] == "toothbrush" and names[12] == "N/A" and len(names) == 91
    assert COCO91_NAMES.count("N/A") == 11
    named = make_module(micro_options(), 2, category_names=["cat", "dog"])
    assert resolve_class_names(named, "auto") == ["cat", "dog"]
    assert resolve_class_names(named, ["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="3 names"):
        resolve_class_names(named, ["a", "b", "c"])


def test_command_line(tmp_path, dataset, checkpoint):
    image = sorted((dataset / "val").glob("*.jpg"))[0]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddetr.predict",
            f"ckpt_path={checkpoint}",
            f"input={image}",
            f"output={tmp_path}/out",
            "size=96",
            "max_size=144",
            "threshold=0.0",
            f"paths.log_dir={tmp_path}/logs",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 image(s), 60 detection(s)" in result.stdout
    assert (tmp_path / "out" / "images" / f"{image.stem}.png").is_file()
