"""``python -m ddetr.check_data``: look at the training data as the model sees it before a long run.

- ``pictures(...)``: training samples after augmentation with their ground-truth boxes and class names.
- ``summary(...)``: images, boxes per class, box sizes relative to the image, what the cleaning skipped.
- ``overfit(...)``: trains on a few training images and evaluates on the same images; a label pipeline
  that works memorises them (AP50 at or above ``threshold``: PASS), a broken one does not (FAIL).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ddetr.data import DetectionDataModule
from ddetr.pictures.drawing import denormalize, draw_detections

log = logging.getLogger(__name__)


def pictures(dataset, output: Path, count: int, seed: int = 0) -> list[Path]:
    """PNGs of the first ``count`` training samples, augmented (with ``seed``), boxes and names drawn."""
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[(index, seed + index)]
        height, width = image.shape[-2:]
        cx, cy, w, h = target["boxes"].unbind(-1)  # normalised to the augmented image
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor([width, height] * 2)
        pixels = image.permute(1, 2, 0).numpy() if image.dtype == torch.uint8 else denormalize(image)  # (H, W, 3)
        picture = draw_detections(pixels, boxes, target["labels"].tolist(), None, dataset.category_names)
        paths.append(output / f"train_{target['image_id']}.png")
        picture.save(paths[-1])
    return paths


def summary(dataset) -> tuple[str, dict[str, Any]]:
    """A one-screen text summary of a training dataset and the same numbers as a dict."""
    names = dataset.category_names
    records = dataset.records
    per_label = np.bincount(dataset.box_labels, minlength=len(names))  # (num_classes,)
    per_class = dict.fromkeys(names, 0)
    for name, count in zip(names, per_label.tolist()):
        per_class[name] += count
    sizes_of_box = records.sizes[records.box_image_index()].astype(np.float64)  # (num_boxes, 2) as (w, h)
    extent = np.clip(records.boxes[:, 2:] - records.boxes[:, :2], 0, None).astype(np.float64)  # (num_boxes, 2)
    # sqrt(box area / image area): 0.1 is a box a tenth of the image's side
    relative = np.sqrt(extent.prod(axis=1) / sizes_of_box.prod(axis=1)).tolist()
    counts = dataset.annotation_counts
    sizes = np.percentile(relative, [0, 10, 50, 90, 100]).tolist() if relative else [0.0] * 5
    info = {
        "images": len(dataset),
        "boxes": len(relative),
        "boxes_per_class": per_class,
        "relative_box_size_percentiles": dict(zip(("min", "p10", "median", "p90", "max"), sizes)),
        "skipped": {k: counts.get(k, 0) for k in ("degenerate", "outside", "clipped", "crowd", "dropped_empty_images")},
        "images_without_boxes": counts.get("empty_images", 0),
        "reader_problems": dict(getattr(dataset, "reader_problems", {})),
    }
    crowd_label = getattr(dataset, "crowd_label", "crowd")
    width = max(len(name) for name in names)
    lines = [
        f"{dataset.ann_file}: {info['images']} images, {info['boxes']} boxes, {len(names)} classes",
        "boxes per class:",
        *(f"  {name:<{width}}  {count:>7}" for name, count in per_class.items()),
        "box size relative to the image (sqrt of area ratio): "
        + ", ".join(f"{k} {v:.3f}" for k, v in info["relative_box_size_percentiles"].items()),
        "skipped: "
        + ", ".join(f"{v} {(crowd_label if k == 'crowd' else k).replace('_', ' ')}" for k, v in info["skipped"].items())
        + f"; {info['images_without_boxes']} images without boxes",
    ]
    if info["reader_problems"]:
        lines.append("while reading the files: " + ", ".join(f"{v} x {k}" for k, v in info["reader_problems"].items()))
    empty = [name for name, count in per_class.items() if count == 0]
    if empty:
        lines.append(f"WARNING: classes without a single training box: {', '.join(empty)}")
    return "\n".join(lines), info


def overfit(cfg: DictConfig, datamodule: DetectionDataModule, output: Path) -> float:
    """Trains ``cfg.model`` on the first ``cfg.overfit_images`` training images for ``cfg.overfit_steps``
    steps and returns the AP50 on those same images."""
    from ddetr.training.run import build_module

    train = datamodule.train_dataset
    keep = np.arange(min(cfg.overfit_images, len(train)))
    subset = train.records.subset(keep).to_coco(train.categories)  # the cleaned boxes of those images
    subset_file = output / "overfit_annotations.json"
    subset_file.write_text(json.dumps(subset))
    transforms = datamodule.train_transforms if cfg.overfit_augment else datamodule.val_transforms
    few = DetectionDataModule(
        train.image_dir,
        subset_file,
        train.image_dir,
        subset_file,
        batch_size=min(len(keep), datamodule.batch_size),
        num_workers=0,
        category_mapping=datamodule.category_mapping,
        train_transforms=transforms,
        val_transforms=datamodule.val_transforms,
    )
    module = build_module(cfg, few)
    # one device, nothing written or printed (no logger, checkpoints, progress bar, summary, sanity check)
    silent = ("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary")
    options = {"accelerator": cfg.get("accelerator", "cpu"), "devices": 1, "num_sanity_val_steps": 0}
    options.update(dict.fromkeys(silent, False))
    L.Trainer(max_steps=cfg.overfit_steps, limit_val_batches=0, gradient_clip_val=0.1, **options).fit(
        module, datamodule=few
    )
    trainer = L.Trainer(**options)
    trainer.validate(module, datamodule=few, verbose=False)
    return float(trainer.callback_metrics.get("val/AP50", 0.0))


def check_data(cfg: DictConfig) -> dict[str, Any]:
    """Pictures and summary of ``cfg.data``'s training split in ``cfg.output``; with ``cfg.overfit`` also
    the overfit check, ending with one line ``overfit: PASS`` or ``overfit: FAIL``."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    train = datamodule.train_dataset
    written = pictures(train, output / "samples", cfg.num_pictures)
    text, info = summary(train)
    print(f"{text}\npictures of {len(written)} augmented training samples: {output / 'samples'}")
    result: dict[str, Any] = {**info, "pictures": [str(p) for p in written]}
    if cfg.overfit:
        ap50 = overfit(cfg, datamodule, output)
        passed = ap50 >= cfg.overfit_threshold
        result.update(overfit_ap50=ap50, overfit_passed=passed)
        print(
            f"overfit: {'PASS' if passed else 'FAIL'} (AP50 {ap50:.3f} on {cfg.overfit_images} training images after "
            f"{cfg.overfit_steps} steps; PASS needs >= {cfg.overfit_threshold})"
        )
    (output / "check_data.json").write_text(json.dumps(result, indent=2))
    return result
