"""COCO-format detection dataset producing samples in the model's target contract."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ddetr.boxes import box_xyxy_to_cxcywh

from .annotations import CleanAnnotations, clean_annotations
from .category_mapping import CategoryMapping, HasCategories, MappingMode, placeholder_categories
from .column_reader import read_coco_columns
from .image_loading import DEFAULT_MAX_IMAGE_PIXELS, ExifMode, ImageLoadError, load_rgb_image
from .records import DetectionRecords
from .skips import SKIPPED_KEY, SkipRecord
from .transforms import make_plain_transforms
from .validation import DatasetError, gc_paused, positions_of, read_coco_json, validate_coco

log = logging.getLogger(__name__)

_WARNED_PLACEHOLDERS: set[tuple[int, str]] = set()  # warned once per process (train and val list the same)

# (image, boxes, labels, seed=None) -> (image tensor, boxes, labels); see DetectionTransform
Transform = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class CocoDetection(HasCategories, Dataset):
    """Images and boxes from a COCO detection annotation file.

    Each item is `(image, target)`: `image` float32 (3, height, width) normalised (uint8 0..255 with
    `uint8_images=True`), `target` a dict
    with `labels` int64 (num_boxes,) head indices, `boxes` float32 (num_boxes, 4) normalised
    (cx, cy, w, h) w.r.t. the augmented unpadded image, `image_id` int, `orig_size` int64 (2,)
    (h, w) of the file and `size` int64 (2,) (h, w) after the transforms. A target may also hold
    `"skipped"`: a list of `SkipRecord` for bad images replaced by this sample (see `skips.py`).

    At construction the annotation file is parsed once, validated (`validation.read_coco_json`, or with
    `keep_coco=False` `column_reader.read_coco_columns`, which build no dict per entry; both raise a single
    `DatasetError` naming the file and the offending ids) and cleaned
    (`annotations.clean_annotations`); the cleaning counts are logged in one line and kept in
    `annotation_counts`. The images and boxes are kept in flat arrays (`records`, a
    `DetectionRecords`; `records[i]` is an `ImageRecord`). The parsed file itself is kept only with
    `keep_coco=True`, for the pycocotools index of evaluation (`coco`); a training dataset drops it.

    A bad image (missing, corrupt, truncated, too large, size not matching the JSON) is, with
    `skip_bad_images=True`, replaced by the next loadable image (wrapping around) and the skip is
    logged and recorded in the replacement's target; with `skip_bad_images=False` it raises a
    `DatasetError` naming the file and image id.

    Args:
        image_dir: folder the `file_name`s are relative to.
        ann_file: COCO detection JSON (with `data`: only the name used in messages).
        transforms: `DetectionTransform` (or a callable with its signature); None only normalises.
        category_mapping: "contiguous" (sorted ids -> 0..K-1) or "coco91" (head index == id).
        skip_bad_images: replace bad images (True) or raise (False).
        keep_empty: keep images without boxes as negatives.
        exif_transpose: "auto", "always" or "never" (see `image_loading`).
        max_image_pixels: larger images count as bad (decompression-bomb guard); None: no limit.
        max_replacement_tries: consecutive bad images tolerated before giving up with an error.
        data: an already-parsed COCO dict (e.g. converted from YOLO or Pascal VOC files) instead of
            reading `ann_file`; it is validated the same way.
        keep_coco: keep the parsed annotations for `coco` (evaluation); False frees them.
        crowd_label: what the summary line calls the boxes with `iscrowd=1` ("difficult" for VOC).
        reader_problems: problems a format reader tolerated (kind -> count, see `conversion.ProblemLog`),
            kept in `reader_problems` for the pre-flight summary.
        uint8_images: items hold the uint8 image (3, height, width), not normalised (the transforms are
            called with `normalize=False`); the data modules normalise whole batches on the device.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Transform | None = None,
        category_mapping: MappingMode = "contiguous",
        skip_bad_images: bool = True,
        keep_empty: bool = True,
        exif_transpose: ExifMode = "auto",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_replacement_tries: int = 20,
        data: dict | None = None,
        keep_coco: bool = True,
        crowd_label: str = "crowd",
        reader_problems: dict[str, int] | None = None,
        uint8_images: bool = False,
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms: Transform = transforms if transforms is not None else make_plain_transforms()
        self.skip_bad_images = skip_bad_images
        self.exif_transpose = exif_transpose
        self.max_image_pixels = max_image_pixels
        self.max_replacement_tries = max_replacement_tries
        self.crowd_label = crowd_label
        self.uint8_images = uint8_images
        self.reader_problems = dict(reader_problems or {})

        with gc_paused():  # parse, check, clean and free the parsed file without collections
            cleaned = self._build_records(data, category_mapping, keep_empty, keep_coco)
            del data
        self.annotation_counts: dict[str, int] = cleaned.counts
        changed = any(cleaned.counts[k] for k in ("degenerate", "outside", "clipped", "dropped_empty_images"))
        log.log(
            logging.WARNING if changed else logging.INFO,
            cleaned.summary(str(self.ann_file), crowd_label),
        )
        if not len(self.records):
            raise DatasetError(f"{self.ann_file}: no images left to use")

    def _build_records(
        self, data: dict | None, category_mapping: MappingMode, keep_empty: bool, keep_coco: bool
    ) -> CleanAnnotations:
        """Parse (once) or take `data`; validate, map categories, clean into `records` and `box_labels`;
        keep the parsed dict (`_data`) only with `keep_coco`. Without `keep_coco` the file is read straight
        into columns (`column_reader`), with no dict per entry."""
        if data is not None:
            columns = validate_coco(data, self.ann_file)
        elif keep_coco:
            data, columns = read_coco_json(self.ann_file)
        else:
            columns = read_coco_columns(self.ann_file)
        dropped = placeholder_categories(
            columns.category_ids.tolist(),
            columns.category_names,
            columns.category_supercategories,
            columns.annotation_category_ids,
        )
        self.categories = [
            {"id": category_id, "name": name}
            for category_id, name in zip(columns.category_ids.tolist(), columns.category_names)
            if category_id not in dropped
        ]
        self.dropped_categories = [
            (category_id, name)
            for category_id, name in zip(columns.category_ids.tolist(), columns.category_names)
            if category_id in dropped
        ]
        self._report_placeholders()
        if dropped and data is not None:  # the evaluation's ground truth lists the model's classes only
            data = {**data, "categories": [c for c in data["categories"] if c.get("id") not in dropped]}
        try:
            self.mapping = CategoryMapping(self.categories, category_mapping)
        except ValueError as exc:
            raise DatasetError(f"{self.ann_file}: {exc}") from exc
        cleaned = clean_annotations(columns, keep_empty=keep_empty)
        self._data = data if keep_coco else None
        self.records: DetectionRecords = cleaned.images
        # head index of every box, computed once (the mapping covers every validated category id)
        category_ids = np.fromiter(self.mapping.category_id_to_label, dtype=np.int64)
        labels = np.fromiter(self.mapping.category_id_to_label.values(), dtype=np.int64)
        positions = positions_of(self.records.category_ids, category_ids)  # (num_boxes,)
        if np.any(positions < 0):
            raise DatasetError(f"{self.ann_file}: boxes with category ids that are not among the categories")
        self.box_labels = labels[positions]  # (num_boxes,)
        return cleaned

    def _report_placeholders(self) -> None:
        """One warning per process naming each dropped placeholder category (`placeholder_categories`)."""
        for category_id, name in self.dropped_categories:
            level = logging.INFO if (category_id, name) in _WARNED_PLACEHOLDERS else logging.WARNING
            _WARNED_PLACEHOLDERS.add((category_id, name))
            log.log(
                level,
                "%s: category %d %r is the supercategory of other categories and has no boxes (an export's "
                "placeholder): left out of the model's classes",
                self.ann_file,
                category_id,
                name,
            )

    # ------------------------------------------------------------------ category information
    # (num_classes, label_to_category_id, category_names: HasCategories, from self.mapping)
    @property
    def image_ids(self) -> list[int]:
        return self.records.image_ids.tolist()

    @cached_property
    def coco(self):
        """pycocotools `COCO` of the annotation file (all annotations, crowd included), for evaluation.

        Annotations lacking `iscrowd` or `area` (optional for training, required by COCOeval) get
        `iscrowd=0` and `area = w * h`. Only available in the process that built the dataset, and
        only with `keep_coco=True`.
        """
        from pycocotools.coco import COCO

        if self._data is None:
            raise RuntimeError(
                "the COCO index is not available: the dataset was built with keep_coco=False, or this "
                "is a DataLoader worker copy of it"
            )
        annotations = [
            {
                **a,
                "iscrowd": a.get("iscrowd", 0),
                "area": a.get("area", float(a["bbox"][2] * a["bbox"][3])),
            }
            for a in self._data["annotations"]
        ]
        coco = COCO()
        coco.dataset = {**self._data, "annotations": annotations}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def __getstate__(self) -> dict:
        """Pickled copies (DataLoader workers under spawn) leave out the raw JSON and COCO index."""
        state = self.__dict__.copy()
        state["_data"] = None
        state.pop("coco", None)
        return state

    # ------------------------------------------------------------------ loading
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """Sample ``item``: an index, or ``(index, seed)`` to fix the augmentation's randomness."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        skipped: list[SkipRecord] = []
        for attempt in range(min(self.max_replacement_tries, len(self.records))):
            position = (index + attempt) % len(self.records)
            image_id = int(self.records.image_ids[position])
            path = self.image_dir / self.records.file_name(position)
            width, height = (int(v) for v in self.records.sizes[position])
            try:
                pixels = load_rgb_image(path, (width, height), self.exif_transpose, self.max_image_pixels)
            except ImageLoadError as exc:
                if not self.skip_bad_images:
                    raise DatasetError(f"{path} (image id {image_id}): {exc.reason}") from exc
                log.warning("skipping %s (image id %d): %s", path, image_id, exc.reason)
                skipped.append(SkipRecord(image_id, str(path), exc.reason))
                continue
            image, target = self._make_sample(position, pixels, seed)
            if skipped:
                target[SKIPPED_KEY] = skipped
            return image, target
        raise DatasetError(
            f"{self.ann_file}: {len(skipped)} consecutive bad images from index {index} "
            f"(first: {skipped[0].file}, image id {skipped[0].image_id}: {skipped[0].reason})"
        )

    def _make_sample(self, position: int, pixels: np.ndarray, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        boxes = self.records.box_slice(position)
        options = {"normalize": False} if self.uint8_images else {}
        image, boxes, labels = self.transforms(
            pixels, self.records.boxes[boxes].copy(), self.box_labels[boxes].copy(), seed=seed, **options
        )
        height, width = image.shape[-2:]
        boxes = boxes.to(torch.float32).reshape(-1, 4)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {
            "labels": labels.to(torch.int64),
            "boxes": box_xyxy_to_cxcywh(boxes) / scale,  # (num_boxes, 4) normalised (cx, cy, w, h)
            "image_id": int(self.records.image_ids[position]),
            "orig_size": torch.tensor([pixels.shape[0], pixels.shape[1]], dtype=torch.int64),
            "size": torch.tensor([height, width], dtype=torch.int64),
        }
        return image, target

    def __repr__(self) -> str:
        return (
            f"CocoDetection({self.ann_file}, images={len(self)}, num_classes={self.num_classes}, "
            f"mapping={self.mapping.mode!r})"
        )
