"""Turning validated COCO annotations into flat per-image training boxes, with a count of what changed.

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

from .records import DetectionRecords, ImageRecord  # noqa: F401  (ImageRecord: the view of one image)
from .validation import CocoColumns, positions_of

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
class CleanAnnotations:
    """Result of `clean_annotations`: images in JSON order (`DetectionRecords`) and the counts of every rule applied."""

    images: DetectionRecords
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self, name: str, crowd_label: str = "crowd") -> str:
        """One line describing the counts, prefixed with `name` (usually the annotation file);
        `crowd_label` names the boxes kept out of training ("difficult" for Pascal VOC)."""
        c = self.counts
        return (
            f"{name}: {c['images']} images, {c['boxes']} boxes kept; dropped {c['degenerate']} degenerate and "
            f"{c['outside']} outside boxes; clipped {c['clipped']} boxes; excluded {c['crowd']} {crowd_label} boxes; "
            f"{c['empty_images']} images without boxes "
            + ("kept as negatives" if not c["dropped_empty_images"] else f"dropped ({c['dropped_empty_images']})")
        )


def clean_annotations(columns: CocoColumns, keep_empty: bool = True) -> CleanAnnotations:
    """Apply the box rules above to validated annotations (see `validation.read_coco_json`).

    Boxes keep their file order within each image; images keep their file order. Computed on whole
    columns (float64, then float32 boxes), without a Python object per image or box.
    """
    counts = dict.fromkeys(COUNT_KEYS, 0)
    image_index = columns.annotation_image_index  # (num_annotations,)
    if image_index is None:
        image_index = positions_of(columns.annotation_image_ids, columns.image_ids)

    crowd = columns.iscrowd
    x, y, w, h = columns.bboxes.T  # each (num_annotations,)
    degenerate = ~crowd & ((w <= 0) | (h <= 0))
    width = columns.widths[image_index].astype(np.float64)
    height = columns.heights[image_index].astype(np.float64)
    x0, y0 = np.minimum(np.maximum(x, 0.0), width), np.minimum(np.maximum(y, 0.0), height)
    x1, y1 = np.minimum(np.maximum(x + w, 0.0), width), np.minimum(np.maximum(y + h, 0.0), height)
    candidate = ~crowd & ~degenerate
    outside = candidate & ((x1 <= x0) | (y1 <= y0))
    kept = candidate & ~outside
    clipped = kept & ((x0 != x) | (y0 != y) | (x1 != x + w) | (y1 != y + h))
    counts.update(
        crowd=int(crowd.sum()), degenerate=int(degenerate.sum()), outside=int(outside.sum()), clipped=int(clipped.sum())
    )

    kept_index = _by_image(np.flatnonzero(kept), image_index, len(columns.image_ids))  # by image, file order within
    boxes_per_image = np.bincount(image_index[kept_index], minlength=len(columns.image_ids))  # (num_images,)
    empty = boxes_per_image == 0
    counts["empty_images"] = int(empty.sum())
    use = np.ones(len(columns.image_ids), dtype=bool) if keep_empty else ~empty
    counts["dropped_empty_images"] = int((~use).sum())

    box_offsets = np.zeros(int(use.sum()) + 1, dtype=np.int64)
    np.cumsum(boxes_per_image[use], out=box_offsets[1:])
    boxes = np.stack([x0, y0, x1, y1], axis=1)[kept_index].astype(np.float32)  # (num_boxes, 4)
    used = np.flatnonzero(use)
    images = DetectionRecords(
        columns.image_ids[used],
        np.stack([columns.widths, columns.heights], axis=1)[used],
        columns.file_names if len(used) == len(columns.file_names) else [columns.file_names[i] for i in used.tolist()],
        box_offsets,
        boxes,
        columns.annotation_category_ids[kept_index],
    )
    counts["boxes"] = images.num_boxes
    counts["images"] = len(images)
    return CleanAnnotations(images, counts)


def _by_image(annotations: np.ndarray, image_index: np.ndarray, num_images: int) -> np.ndarray:
    """`annotations` (int64 (num,), increasing) ordered by `image_index[annotations]`, keeping their order
    within an image: a stable argsort, done as a plain sort of the unique key (image, annotation), which is
    several times faster than numpy's stable argsort of 64-bit keys."""
    span = int(annotations[-1]) + 1 if len(annotations) else 1
    if num_images * span >= 2**62:  # the key would overflow int64
        return annotations[np.argsort(image_index[annotations], kind="stable")]
    keys = image_index[annotations] * span + annotations  # (num,) unique
    return np.sort(keys) % span
