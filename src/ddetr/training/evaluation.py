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
    - Metrics that pycocotools reports as undefined (-1, e.g. APs without small objects) are 0.0.

    Args:
        coco_gt: pycocotools `COCO` with the ground truth.
        label_to_category_id: head index -> category id.
        verbose: let pycocotools print its summary table.
    """

    def __init__(
        self, coco_gt, label_to_category_id: Sequence[int], verbose: bool = False
    ):
        self.coco_gt = coco_gt
        self.label_to_category_id = [int(c) for c in label_to_category_id]
        self.verbose = verbose
        self._gt_image_ids = set(coco_gt.getImgIds())
        self._gt_category_ids = set(coco_gt.getCatIds())
        self.predictions: dict[int, dict[str, np.ndarray]] = {}
        self.last_eval = None  # the COCOeval object of the last compute(), when one ran

    def reset(self) -> None:
        self.predictions = {}
        self.last_eval = None

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
        if (
            not (dist.is_available() and dist.is_initialized())
            or dist.get_world_size() == 1
        ):
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
            xywh = np.concatenate(
                [boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1
            )  # (K, 4)
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

    def compute(self) -> dict[str, float]:
        """COCO box metrics (keys `METRIC_NAMES`) over all ground-truth images."""
        from pycocotools.cocoeval import COCOeval

        results = [
            r
            for r in self.results_json()
            if r["image_id"] in self._gt_image_ids
            and r["category_id"] in self._gt_category_ids
        ]
        self.last_eval = None
        if not results or not self._gt_image_ids:
            return dict.fromkeys(METRIC_NAMES, 0.0)
        output = io.StringIO()
        with (
            contextlib.redirect_stdout(output)
            if not self.verbose
            else contextlib.nullcontext()
        ):
            coco_dt = self.coco_gt.loadRes(results)
            evaluator = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            evaluator.params.imgIds = sorted(self._gt_image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        self.last_eval = evaluator
        return {
            name: max(float(value), 0.0)
            for name, value in zip(METRIC_NAMES, evaluator.stats)
        }


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
