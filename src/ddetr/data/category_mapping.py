"""Mapping between dataset category ids and classification-head indices ("labels")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

MappingMode = Literal["contiguous", "coco91"]
UNUSED_NAME = "N/A"


class CategoryMapping:
    """Head index <-> category id.

    Modes:
        "contiguous": sorted category ids -> 0..K-1, `num_classes = K` (custom datasets).
        "coco91": head index == category id, `num_classes = max id + 1` (91 for COCO), as the
            official checkpoints expect; unused slots are named "N/A".

    Args:
        categories: COCO `categories` entries (dicts with `id` and `name`).
        mode: "contiguous" or "coco91".
    """

    def __init__(self, categories: Sequence[dict], mode: MappingMode = "contiguous"):
        if mode not in ("contiguous", "coco91"):
            raise ValueError(
                f"category_mapping must be 'contiguous' or 'coco91', got {mode!r}"
            )
        if not categories:
            raise ValueError("no categories to map")
        names = {int(c["id"]): str(c["name"]) for c in categories}
        self.mode = mode
        if mode == "contiguous":
            self.label_to_category_id: list[int] = sorted(names)
        else:
            if min(names) < 0:
                raise ValueError(
                    f"coco91 mapping needs non-negative category ids, got {min(names)}"
                )
            self.label_to_category_id = list(range(max(names) + 1))
        self.category_names: list[str] = [
            names.get(i, UNUSED_NAME) for i in self.label_to_category_id
        ]
        self.category_id_to_label: dict[int, int] = {
            cid: label
            for label, cid in enumerate(self.label_to_category_id)
            if cid in names
        }

    @property
    def num_classes(self) -> int:
        """Number of outputs of the classification head."""
        return len(self.label_to_category_id)

    def __repr__(self) -> str:
        return f"CategoryMapping(mode={self.mode!r}, num_classes={self.num_classes})"
