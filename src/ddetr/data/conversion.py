"""What a reader of another annotation format (YOLO, Pascal VOC) hands to the COCO pipeline, and the
COCO annotation entry every writer of a COCO dict (the readers, the records, the synthetic set) appends.

`ConvertedSplit` is one split as a COCO detection dict plus where its images are; `CocoDetection`
then validates, cleans, counts and evaluates it exactly like a COCO file. `ProblemLog` counts the
problems a reader tolerates (each kind with its first few `file:line` places) and logs them in one
warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

MAX_PLACES_SHOWN = 5


def append_annotation(
    annotations: list[dict], image_id: int, category_id: int, bbox: list, area: float | None = None, iscrowd: int = 0
) -> None:
    """Appends a COCO annotation entry with the next id (1, 2, ...) to ``annotations``: ``bbox`` as
    [x, y, width, height] in pixels, ``area`` width * height unless given."""
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": bbox[2] * bbox[3] if area is None else area,
            "iscrowd": iscrowd,
        }
    )


@dataclass
class ConvertedSplit:
    """One split of a non-COCO dataset: `image_dir` (the `file_name`s are relative to it), `data` (a COCO
    detection dict), `source` (names the split in messages) and `problems` (kind -> count, from `ProblemLog`)."""

    image_dir: Path
    data: dict
    source: str
    problems: dict[str, int] = field(default_factory=dict)


class ProblemLog:
    """Counts tolerated problems per kind and remembers the first few places of each."""

    def __init__(self, source: str):
        self.source = source
        self._places: dict[str, list[str]] = {}
        self._counts: dict[str, int] = {}

    def add(self, kind: str, place: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        places = self._places.setdefault(kind, [])
        if len(places) < MAX_PLACES_SHOWN:
            places.append(place)

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def report(self, logger: logging.Logger) -> None:
        """One warning line listing every kind with its count and first places (nothing when clean)."""
        if not self._counts:
            return
        parts = []
        for kind, count in self._counts.items():
            more = f" and {count - MAX_PLACES_SHOWN} more" if count > MAX_PLACES_SHOWN else ""
            parts.append(f"{count} x {kind} ({', '.join(self._places[kind])}{more})")
        logger.warning("%s: %s", self.source, "; ".join(parts))
