"""Small COCO ground truths and detections for the evaluation tests, built by hand or at random."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO

NAMES = {1: "a", 2: "b", 3: "c"}


def coco_ground_truth(images: dict[int, list[tuple[int, list[float], int]]], names: dict[int, str] = NAMES) -> COCO:
    """A ground truth of ``{image_id: [(category_id, [x, y, w, h], iscrowd), ...]}``, images 200x200."""
    annotations = [
        {
            "id": index,
            "image_id": image_id,
            "category_id": category,
            "bbox": list(box),
            "area": box[2] * box[3],
            "iscrowd": crowd,
        }
        for index, (image_id, category, box, crowd) in enumerate(
            ((i, *annotation) for i, boxes in images.items() for annotation in boxes), start=1
        )
    ]
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in images],
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in names.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def prediction(detections: list[tuple[int, list[float], float]]) -> dict[str, np.ndarray]:
    """``[(head index, [x0, y0, x1, y1], score), ...]`` as the evaluator stores one image's predictions."""
    return {
        "labels": np.array([d[0] for d in detections], dtype=np.int64),
        "boxes": np.array([d[1] for d in detections], dtype=np.float64).reshape(-1, 4),
        "scores": np.array([d[2] for d in detections], dtype=np.float64),
    }


def random_case(draw_seed: int, num_images: int = 4, num_classes: int = 3):
    """Random ground truth (up to 5 boxes per image, some crowd) and 0-2 detections per box (70% of its
    class, jittered) plus 0-2 stray ones per image; returns ``(COCO, {image_id: prediction})``, head index
    ``i`` being category ``i + 1``."""
    rng = np.random.default_rng(draw_seed)
    images, predictions = {}, {}
    for image_id in range(1, num_images + 1):
        boxes = []
        for _ in range(int(rng.integers(0, 6))):
            x, y, w, h = *rng.uniform(0, 150, 2), *rng.uniform(5, 50, 2)
            boxes.append((int(rng.integers(1, num_classes + 1)), [x, y, w, h], int(rng.uniform() < 0.15)))
        images[image_id] = boxes
        detections = []
        for category, (x, y, w, h), _ in boxes:
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.15, 4) * [w, h, w, h]
                label = category - 1 if rng.uniform() < 0.7 else int(rng.integers(0, num_classes))
                detections.append(
                    (label, [x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]], float(rng.uniform()))
                )
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 150, 2)
            detections.append((int(rng.integers(0, num_classes)), [x, y, x + 20, y + 20], float(rng.uniform())))
        predictions[image_id] = prediction(detections)
    return coco_ground_truth(images, {c: NAMES.get(c, f"class {c}") for c in range(1, num_classes + 1)}), predictions
