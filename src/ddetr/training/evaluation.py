"""COCO box evaluation with pycocotools, gathering predictions across ranks."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

METRIC_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


class CocoEvaluator:
    """Collects per-image detections and computes the standard COCO box metrics.

    Usage per epoch: `update(...)` for every batch, `synchronize()` (all ranks), `compute()`,
    `reset()`.

    - Predictions are keyed by image id; an image predicted twice (e.g. repeated by a padding
      sampler) keeps the first predictions, so every image counts once.
    - Metrics are computed over ALL images of `coco_gt`: an image without predictions counts as
      missed detections, so the result does not depend on how images were split over ranks.
    - Labels are head indices, mapped to category ids via `label_to_category_id`; detections whose
      category is not in `coco_gt` (e.g. unused "N/A" slots of the 91-slot COCO layout) are ignored.
    - Metrics that pycocotools reports as undefined (-1: no ground-truth box in that size range,
      e.g. APl when no object is larger than 96x96 pixels) are ``None``, not 0.0.
    - ``compute()`` also fills ``per_class``: class name -> ``{"AP", "AP50", "num_gt"}`` (AP over
      IoU 0.50:0.95 and at 0.50, all sizes, 100 detections; ``None`` for a class without ground truth).

    Args:
        coco_gt: pycocotools `COCO` with the ground truth.
        label_to_category_id: head index -> category id.
        verbose: let pycocotools print its summary table.
    """

    def __init__(self, coco_gt, label_to_category_id: Sequence[int], verbose: bool = False):
        self.coco_gt = coco_gt
        self.label_to_category_id = [int(c) for c in label_to_category_id]
        self.verbose = verbose
        self._gt_image_ids = set(coco_gt.getImgIds())
        self._gt_category_ids = set(coco_gt.getCatIds())
        self.predictions: dict[int, dict[str, np.ndarray]] = {}
        self.last_eval = None  # the COCOeval object of the last compute(), when one ran
        self.per_class: dict[str, dict[str, float | int | None]] = {}  # of the last compute()
        self.last_metrics: dict[str, float | None] = {}  # of the last compute()

    def reset(self) -> None:
        self.predictions = {}
        self.last_eval = None
        self.per_class = {}
        self.last_metrics = {}

    def update(self, predictions: Mapping[int, Mapping[str, Any]]) -> None:
        """Add `{image_id: {"scores": (K,), "labels": (K,), "boxes": (K, 4) absolute xyxy}}`.

        Boxes are in the coordinates of the original image (as stored in the annotation file).
        """
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id in self.predictions:
                continue
            self.predictions[image_id] = {
                "scores": _numpy(prediction["scores"]).astype(np.float64).reshape(-1),
                "labels": _numpy(prediction["labels"]).astype(np.int64).reshape(-1),
                "boxes": _numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4),
            }

    def synchronize(self) -> None:
        """Gather every rank's predictions on every rank (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.predictions)
        merged: dict[int, dict[str, np.ndarray]] = {}
        for part in gathered:
            for image_id, prediction in (part or {}).items():
                merged.setdefault(image_id, prediction)
        self.predictions = merged

    def results_json(self) -> list[dict[str, Any]]:
        """Predictions in the COCO results format: image_id, category_id, bbox [x, y, w, h], score."""
        results = []
        num_labels = len(self.label_to_category_id)
        for image_id, prediction in sorted(self.predictions.items()):
            boxes = prediction["boxes"]
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # (K, 4)
            for box, score, label in zip(
                xywh.tolist(),
                prediction["scores"].tolist(),
                prediction["labels"].tolist(),
            ):
                if not 0 <= label < num_labels:
                    continue
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": self.label_to_category_id[label],
                        "bbox": box,
                        "score": score,
                    }
                )
        return results

    def compute(self) -> dict[str, float | None]:
        """COCO box metrics (keys `METRIC_NAMES`) over all ground-truth images; ``None`` where undefined."""
        self.last_metrics = self._compute()
        return dict(self.last_metrics)

    def _compute(self) -> dict[str, float | None]:
        from pycocotools.cocoeval import COCOeval

        results = [
            r
            for r in self.results_json()
            if r["image_id"] in self._gt_image_ids and r["category_id"] in self._gt_category_ids
        ]
        self.last_eval = None
        num_gt = self._num_gt_per_category()
        if not results or not self._gt_image_ids:  # pycocotools cannot load no results: all misses
            self.per_class = {
                name: {"AP": 0.0 if num_gt[c] else None, "AP50": 0.0 if num_gt[c] else None, "num_gt": num_gt[c]}
                for c, name in self._category_names().items()
            }
            defined = self._defined_size_ranges()
            return {name: (0.0 if defined[_size_range(name)] else None) for name in METRIC_NAMES}
        output = io.StringIO()
        with contextlib.redirect_stdout(output) if not self.verbose else contextlib.nullcontext():
            coco_dt = self.coco_gt.loadRes(results)
            evaluator = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            evaluator.params.imgIds = sorted(self._gt_image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        self.last_eval = evaluator
        self.per_class = self._per_class(evaluator, num_gt)
        return {name: _defined(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}

    def _category_names(self) -> dict[int, str]:
        """Category id -> name (the id as text where the file has no name), in id order."""
        return {
            c["id"]: str(c.get("name", c["id"]))
            for c in sorted(self.coco_gt.loadCats(self.coco_gt.getCatIds()), key=lambda c: c["id"])
        }

    def _num_gt_per_category(self) -> dict[int, int]:
        """Category id -> number of ground-truth boxes pycocotools scores (not crowd)."""
        counts = dict.fromkeys(self._category_names(), 0)
        for annotation in self.coco_gt.dataset.get("annotations", []):
            if not annotation.get("iscrowd", 0) and annotation["image_id"] in self._gt_image_ids:
                counts[annotation["category_id"]] = counts.get(annotation["category_id"], 0) + 1
        return counts

    def _defined_size_ranges(self) -> dict[str, bool]:
        """Whether each pycocotools area range ("all", "s", "m", "l") holds a non-crowd ground-truth box."""
        from pycocotools.cocoeval import Params

        params = Params(iouType="bbox")
        areas = [
            a["area"]
            for a in self.coco_gt.dataset.get("annotations", [])
            if not a.get("iscrowd", 0) and a["image_id"] in self._gt_image_ids
        ]
        return {
            label: any(low <= area <= high for area in areas)
            for label, (low, high) in zip(("all", "s", "m", "l"), params.areaRng)
        }

    def _per_class(self, evaluator, num_gt: dict[int, int]) -> dict[str, dict[str, float | int | None]]:
        """Per-class AP and AP50 from the accumulated precision (IoU, recall, class, area, max dets)."""
        precision = evaluator.eval["precision"]  # (num_iou, num_recall, num_categories, num_areas, num_max_dets)
        all_area, max_dets = 0, len(evaluator.params.maxDets) - 1  # area "all", 100 detections
        iou50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
        names = self._category_names()
        table = {}
        for index, category_id in enumerate(evaluator.params.catIds):
            curve = precision[:, :, index, all_area, max_dets]  # (num_iou, num_recall)
            table[names[category_id]] = {
                "AP": _mean_defined(curve),
                "AP50": _mean_defined(curve[iou50]),
                "num_gt": num_gt.get(category_id, 0),
            }
        return table

    def confusion_matrix(self, score_threshold: float | None = None, iou_threshold: float = 0.5):
        """The ``training.confusion.ConfusionMatrix`` of the collected predictions over all images of
        ``coco_gt`` (default threshold: ``confusion.DEFAULT_SCORE_THRESHOLD``)."""
        from ddetr.training.confusion import DEFAULT_SCORE_THRESHOLD, coco_confusion_matrix

        threshold = DEFAULT_SCORE_THRESHOLD if score_threshold is None else score_threshold
        return coco_confusion_matrix(
            self.coco_gt, self.predictions, self.label_to_category_id, threshold, iou_threshold
        )


def _size_range(metric: str) -> str:
    """The pycocotools area range of a metric name: "s", "m", "l" (APs, ARm, ...) or "all"."""
    return metric[-1] if metric[-1] in "sml" else "all"


def _defined(value: float) -> float | None:
    """pycocotools' -1 (no ground truth in that range) as ``None``."""
    return None if value < 0 else float(value)


def _mean_defined(values: np.ndarray) -> float | None:
    """The mean of the entries that are not -1, as pycocotools summarises; ``None`` when there is none."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None


def _numpy(value: Any) -> np.ndarray:
    """A tensor or array-like as a NumPy array; floating tensors of dtypes NumPy lacks (bfloat16) as float32."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64, torch.float16):
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)
