"""The images and boxes of a dataset split as a few flat numpy arrays (`DetectionRecords`).

A training process keeps COCO-train-sized annotations (118k images, 860k boxes) in a few MiB
this way, and DataLoader workers forked from it copy almost nothing: there is no Python object per
image whose reference count or garbage-collector header a worker would write to.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .conversion import append_annotation


@dataclass
class ImageRecord:
    """One image to load: file, size from the annotations, and its clean boxes (a view, made on demand).

    `boxes` is float32 (num_boxes, 4) absolute (x0, y0, x1, y1) in the annotation's width/height;
    `category_ids` is int64 (num_boxes,).
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    category_ids: np.ndarray


def _name_buffer(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`names` as (offsets int64 (len(names) + 1,), UTF-8 bytes uint8 (total bytes,)); an all-ASCII list
    (the usual case) is encoded in one piece, its byte lengths being its character lengths."""
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    joined = "".join(names)
    if joined.isascii():
        np.cumsum(np.fromiter(map(len, names), dtype=np.int64, count=len(names)), out=offsets[1:])
        return offsets, np.frombuffer(joined.encode("ascii"), dtype=np.uint8).copy()
    encoded = [name.encode("utf-8") for name in names]
    np.cumsum([len(name) for name in encoded], out=offsets[1:])
    return offsets, np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()


class DetectionRecords:
    """Images and their boxes in flat arrays; `records[i]` is an `ImageRecord`, `len(records)` the image count.

    Arrays (num_images images, num_boxes boxes in all):
        image_ids int64 (num_images,); sizes int32 (num_images, 2) as (width, height);
        name_offsets int64 (num_images + 1,) into names, UTF-8 bytes uint8 (total name length,);
        box_offsets int64 (num_images + 1,) into boxes float32 (num_boxes, 4) absolute (x0, y0, x1, y1)
        and category_ids int64 (num_boxes,).
    """

    def __init__(
        self,
        image_ids: np.ndarray,
        sizes: np.ndarray,
        file_names: list[str],
        box_offsets: np.ndarray,
        boxes: np.ndarray,
        category_ids: np.ndarray,
    ):
        self.image_ids = np.ascontiguousarray(image_ids, dtype=np.int64)
        self.sizes = np.ascontiguousarray(sizes, dtype=np.int32).reshape(-1, 2)  # (num_images, 2)
        self.name_offsets, self.names = _name_buffer(file_names)
        self.box_offsets = np.ascontiguousarray(box_offsets, dtype=np.int64)
        self.boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)  # (num_boxes, 4)
        self.category_ids = np.ascontiguousarray(category_ids, dtype=np.int64)
        if not (len(self.image_ids) == len(self.sizes) == len(file_names) == len(self.box_offsets) - 1):
            raise ValueError("image arrays of different lengths")
        if self.box_offsets[-1] != len(self.boxes) or len(self.boxes) != len(self.category_ids):
            raise ValueError("box arrays do not match the offsets")

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)

    def file_name(self, index: int) -> str:
        return self.names[self.name_offsets[index] : self.name_offsets[index + 1]].tobytes().decode("utf-8")

    def box_slice(self, index: int) -> slice:
        return slice(int(self.box_offsets[index]), int(self.box_offsets[index + 1]))

    def box_image_index(self) -> np.ndarray:
        """int64 (num_boxes,): the image index of every box."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.box_offsets))

    def __getitem__(self, index: int) -> ImageRecord:
        if isinstance(index, slice):
            raise TypeError("DetectionRecords takes an integer index; use subset() for several images")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        boxes = self.box_slice(index)
        width, height = (int(v) for v in self.sizes[index])
        return ImageRecord(
            int(self.image_ids[index]),
            self.file_name(index),
            width,
            height,
            self.boxes[boxes],
            self.category_ids[boxes],
        )

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self[i] for i in range(len(self)))

    def subset(self, indices) -> DetectionRecords:
        """The images at `indices` (in that order) with their boxes."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        counts = np.diff(self.box_offsets)[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        take = np.concatenate([np.arange(self.box_offsets[i], self.box_offsets[i + 1]) for i in indices] or [[]])
        take = take.astype(np.int64)
        return DetectionRecords(
            self.image_ids[indices],
            self.sizes[indices],
            [self.file_name(i) for i in indices],
            offsets,
            self.boxes[take],
            self.category_ids[take],
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(
            a.nbytes
            for a in (
                self.image_ids,
                self.sizes,
                self.name_offsets,
                self.names,
                self.box_offsets,
                self.boxes,
                self.category_ids,
            )
        )

    def to_coco(self, categories: list[dict]) -> dict:
        """A COCO detection dict of these images and boxes (every box `iscrowd=0`, `area = w * h`)."""
        images = [{"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height} for r in self]
        annotations = []
        for record in self:
            for (x0, y0, x1, y1), category_id in zip(record.boxes.tolist(), record.category_ids.tolist()):
                append_annotation(annotations, record.image_id, category_id, [x0, y0, x1 - x0, y1 - y0])
        return {"images": images, "annotations": annotations, "categories": list(categories)}
