"""The detection confusion matrix: which class each ground-truth box was detected as, at one IoU and
one score threshold, with a "background" row and column for false detections and missed boxes.

Matching, image by image, over the detections scoring at least ``score_threshold``:

1. by class, as COCOeval matches at IoU 0.5: detections in decreasing score order, each takes the
   unmatched ground-truth box *of its own class* with the highest IoU, when that IoU is at least
   ``iou_threshold``; so the diagonal counts the true positives pycocotools counts at that IoU;
2. across classes: each detection left without a match, again in decreasing score order, takes the
   unmatched ground-truth box *of any class* with the highest IoU >= ``iou_threshold`` (a confusion);
3. crowd regions (``iscrowd=1``) are not ground truth (no row counts them); a detection still
   unmatched that lies in a crowd region *of its own class* (intersection >= ``iou_threshold`` of
   the detection's own area, COCOeval's crowd overlap) is ignored, as COCOeval ignores it, instead
   of counting as a false detection. COCOeval evaluates each category alone, so a crowd of another
   class ignores nothing: a detection there is a false detection (background row).

Rows are ground-truth classes, columns predicted classes; the last row (background) counts the
detections that matched nothing, the last column (background) the ground-truth boxes nothing
matched. So each real class's row sums to its number of (non-crowd) ground-truth boxes.

``DEFAULT_SCORE_THRESHOLD`` (0.3) is the threshold of the validation pictures
(``ValidationImages``), so the matrix counts the boxes those pictures draw. It is a convention, not
a tuned value: the postprocess keeps 100 detections per image whatever their score, so a lower
threshold moves more low-score detections into the background row, a higher one more missed boxes
into the background column; set ``confusion_threshold`` to change it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BACKGROUND = "background"
DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class ConfusionMatrix:
    """``matrix`` (num_classes + 1, num_classes + 1) int64 counts; ``labels`` the class names plus
    ``"background"`` (rows: ground truth, columns: prediction)."""

    labels: list[str]
    matrix: np.ndarray
    iou: float
    score_threshold: float

    def to_json(self) -> dict[str, Any]:
        """``{"labels", "matrix" (lists of ints), "iou", "score_threshold"}`` for metrics.json."""
        return {
            "labels": list(self.labels),
            "matrix": self.matrix.astype(int).tolist(),
            "iou": float(self.iou),
            "score_threshold": float(self.score_threshold),
        }


def match_image(
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    det_boxes: np.ndarray,
    det_classes: np.ndarray,
    det_scores: np.ndarray,
    crowd_boxes: np.ndarray,
    crowd_classes: np.ndarray,
    num_classes: int,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
) -> np.ndarray:
    """The confusion counts (num_classes + 1, num_classes + 1) of one image (module docstring).

    Boxes are absolute (x, y, width, height) as in COCO files: ``gt_boxes`` (num_gt, 4),
    ``det_boxes`` (num_det, 4), ``crowd_boxes`` (num_crowd, 4); classes (``gt_classes`` (num_gt,),
    ``det_classes`` (num_det,), ``crowd_classes`` (num_crowd,)) are row indices in ``[0, num_classes)``.
    Every detection given is counted (filter by score before)."""
    from pycocotools import mask as mask_utils

    background = num_classes
    counts = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    num_gt, num_det = len(gt_boxes), len(det_boxes)
    if num_gt and num_det:
        iou = np.asarray(mask_utils.iou(_boxes(det_boxes), _boxes(gt_boxes), [0] * num_gt)).reshape(num_det, num_gt)
    else:
        iou = np.zeros((num_det, num_gt))
    order = np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable")
    gt_match = np.full(num_gt, -1)
    det_match = np.full(num_det, -1)
    same_class = det_classes[:, None] == gt_classes[None, :]  # (num_det, num_gt)
    for allowed in (same_class, np.ones_like(same_class)):  # 1. own class, 2. any class
        for det in order:
            if det_match[det] >= 0:
                continue
            candidates = allowed[det] & (gt_match < 0) & (iou[det] >= iou_threshold)
            if candidates.any():
                gt = int(np.argmax(np.where(candidates, iou[det], -1.0)))
                gt_match[gt], det_match[det] = det, gt
    for det in range(num_det):
        if det_match[det] >= 0:
            counts[gt_classes[det_match[det]], det_classes[det]] += 1
        elif not _in_crowd(det_boxes[det], crowd_boxes[crowd_classes == det_classes[det]], iou_threshold):
            counts[background, det_classes[det]] += 1
    for gt in np.flatnonzero(gt_match < 0):
        counts[gt_classes[gt], background] += 1
    return counts


def coco_confusion_matrix(
    coco_gt,
    predictions: Mapping[int, Mapping[str, np.ndarray]],
    label_to_category_id: Sequence[int],
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
) -> ConfusionMatrix:
    """The confusion matrix over every image of ``coco_gt`` (an image without predictions: all its
    boxes missed), classes in category-id order.

    ``predictions``: ``{image_id: {"scores" (K,), "labels" (K,) head indices, "boxes" (K, 4) absolute
    xyxy}}`` as ``CocoEvaluator.predictions`` holds them; labels are mapped to category ids through
    ``label_to_category_id``, and detections of a category ``coco_gt`` does not have (e.g. the unused
    slots of the 91-slot COCO layout) are dropped, as the COCO evaluation drops them."""
    categories = sorted(coco_gt.loadCats(coco_gt.getCatIds()), key=lambda c: c["id"])
    row_of = {c["id"]: row for row, c in enumerate(categories)}
    labels = [str(c.get("name", c["id"])) for c in categories] + [BACKGROUND]
    head_to_row = np.array([row_of.get(int(c), -1) for c in label_to_category_id] + [-1])  # -1: dropped
    num_classes = len(categories)
    total = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for image_id in coco_gt.getImgIds():
        annotations = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        crowd = [a for a in annotations if a.get("iscrowd", 0) and a["category_id"] in row_of]
        plain = [a for a in annotations if not a.get("iscrowd", 0) and a["category_id"] in row_of]
        gt_boxes = np.array([a["bbox"] for a in plain], dtype=np.float64).reshape(-1, 4)
        gt_classes = np.array([row_of[a["category_id"]] for a in plain], dtype=np.int64)
        crowd_boxes = np.array([a["bbox"] for a in crowd], dtype=np.float64).reshape(-1, 4)
        crowd_classes = np.array([row_of[a["category_id"]] for a in crowd], dtype=np.int64)
        det_boxes, det_classes, det_scores = _detections(predictions.get(image_id), head_to_row, score_threshold)
        total += match_image(
            gt_boxes,
            gt_classes,
            det_boxes,
            det_classes,
            det_scores,
            crowd_boxes,
            crowd_classes,
            num_classes,
            iou_threshold,
        )
    return ConfusionMatrix(labels, total, iou_threshold, score_threshold)


def _detections(prediction, head_to_row: np.ndarray, score_threshold: float):
    """The detections of one image above the threshold and of a known class: boxes (K, 4) xywh,
    rows (K,), scores (K,)."""
    if prediction is None:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0)
    scores = np.asarray(prediction["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(prediction["labels"], dtype=np.int64).reshape(-1)
    boxes = np.asarray(prediction["boxes"], dtype=np.float64).reshape(-1, 4)  # (K, 4) xyxy
    in_range = (labels >= 0) & (labels < len(head_to_row) - 1)
    rows = head_to_row[np.where(in_range, labels, -1)]
    keep = (scores >= score_threshold) & (rows >= 0)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # (K, 4)
    return xywh[keep], rows[keep], scores[keep]


def _in_crowd(det_box: np.ndarray, crowd_boxes: np.ndarray, iou_threshold: float) -> bool:
    """Whether a detection (x, y, w, h) lies in one of the crowd regions ``crowd_boxes`` (num_crowd, 4):
    intersection / detection area >= threshold."""
    if not len(crowd_boxes):
        return False
    from pycocotools import mask as mask_utils

    overlap = np.asarray(mask_utils.iou(_boxes(det_box[None]), _boxes(crowd_boxes), [1] * len(crowd_boxes)))
    return bool((overlap >= iou_threshold).any())


def _boxes(boxes: np.ndarray) -> np.ndarray:
    """A C-contiguous float64 (N, 4) copy, as pycocotools' ``iou`` wants its boxes."""
    return np.ascontiguousarray(boxes, dtype=np.float64).reshape(-1, 4)
