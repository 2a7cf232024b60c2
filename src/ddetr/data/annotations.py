"""Turning validated COCO annotations into per-image training boxes, with a count of what changed.

Rules (the official Deformable DETR conversion, plus counting):
- crowd annotations (`iscrowd=1`) are kept out of the training targets (`crowd`);
- boxes with zero/negative width or height are dropped (`degenerate`);
- boxes partly outside the image are clipped to it (`clipped`);
- boxes entirely outside (no area left after clipping) are dropped (`outside`);
- images left without boxes are kept as negatives (`empty_images`) unless `keep_empty=False`,
  in which case they are removed (`dropped_empty_images`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

COUNT_KEYS = (
    "images",
    "boxes",
    "crowd",
    "degenerate",
    "clipped",
    "outside",
    "empty_images",
    "dropped_empty_images",
)


@dataclass
class ImageRecord:
    """One image to load: file, size from the JSON, and its clean boxes.

    `boxes` is float32 (num_boxes, 4) absolute (x0, y0, x1, y1) in the JSON's width/height;
    `category_ids` is int64 (num_boxes,).
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    category_ids: np.ndarray


@dataclass
class CleanAnnotations:
    """Result of `clean_annotations`: images in JSON order and the counts of every rule applied."""

    images: list[ImageRecord]
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self, name: str) -> str:
        """One line describing the counts, prefixed with `name` (usually the annotation file)."""
        c = self.counts
        return (
            f"{name}: {c['images']} images, {c['boxes']} boxes kept; dropped {c['degenerate']} degenerate and "
            f"{c['outside']} outside boxes; clipped {c['clipped']} boxes; excluded {c['crowd']} crowd boxes; "
            f"{c['empty_images']} images without boxes "
            + (
                "kept as negatives"
                if not c["dropped_empty_images"]
                else f"dropped ({c['dropped_empty_images']})"
            )
        )


def clean_annotations(data: dict, keep_empty: bool = True) -> CleanAnnotations:
    """Apply the box rules above to a validated COCO dict (see `validation.load_coco_json`)."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    per_image: dict[int, list[tuple[list[float], int]]] = {
        image["id"]: [] for image in data["images"]
    }
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
        images.append(
            ImageRecord(
                image["id"],
                image["file_name"],
                image["width"],
                image["height"],
                boxes,
                category_ids,
            )
        )
        counts["boxes"] += len(entries)
    counts["images"] = len(images)
    return CleanAnnotations(images, counts)
