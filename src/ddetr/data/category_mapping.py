"""Mapping between dataset category ids and classification-head indices ("labels"), and COCO's category
names in the 91-slot layout of the official checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

MappingMode = Literal["contiguous", "coco91"]
UNUSED_NAME = "N/A"
MAX_COCO91_ID = 100_000  # "coco91" makes one head output per id up to the largest


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
            raise ValueError(f"category_mapping must be 'contiguous' or 'coco91', got {mode!r}")
        if not categories:
            raise ValueError("no categories to map")
        names = {int(c["id"]): str(c["name"]) for c in categories}
        self.mode = mode
        if mode == "contiguous":
            self.label_to_category_id: list[int] = sorted(names)
        else:
            if min(names) < 0:
                raise ValueError(f"coco91 mapping needs non-negative category ids, got {min(names)}")
            if max(names) > MAX_COCO91_ID:
                raise ValueError(
                    f"coco91 mapping makes one head output per id up to the largest; category id {max(names)} "
                    f"is above {MAX_COCO91_ID} (use category_mapping=contiguous)"
                )
            self.label_to_category_id = list(range(max(names) + 1))
        self.category_names: list[str] = [names.get(i, UNUSED_NAME) for i in self.label_to_category_id]
        self.category_id_to_label: dict[int, int] = {
            cid: label for label, cid in enumerate(self.label_to_category_id) if cid in names
        }

    @property
    def num_classes(self) -> int:
        """Number of outputs of the classification head."""
        return len(self.label_to_category_id)

    def __repr__(self) -> str:
        return f"CategoryMapping(mode={self.mode!r}, num_classes={self.num_classes})"


def placeholder_categories(
    category_ids: Sequence[int],
    names: Sequence[str],
    supercategories: Sequence[str | None],
    annotation_category_ids: np.ndarray,
) -> list[int]:
    """Ids of the categories that name another category's supercategory and have no annotation.

    Roboflow's COCO export lists the dataset's name as category 0 with no boxes, the supercategory of
    every real class (roboflow-100-benchmark #45); RF-DETR drops such a category by this rule (its PR
    #1303). It takes no class slot and no AP row; any other category without boxes is kept.

    Args:
        category_ids, names: the categories' ids and names.
        supercategories: each category's supercategory (None: none given; may be empty: none read).
        annotation_category_ids: int64 (num_annotations,) the category id of every annotation.
    """
    used = set(np.unique(annotation_category_ids).tolist())
    parents: dict[str, set[int]] = {}  # supercategory name -> ids of the categories naming it
    for category_id, parent in zip(category_ids, supercategories):
        if parent is not None:
            parents.setdefault(parent, set()).add(int(category_id))
    return [
        int(category_id)
        for category_id, name in zip(category_ids, names)
        if int(category_id) not in used and parents.get(name, set()) - {int(category_id)}
    ]


class HasCategories:
    """Mixin of the datasets and data modules: ``num_classes``, ``label_to_category_id`` (head index ->
    category id) and ``category_names`` (per head index) of the class's ``mapping``, a ``CategoryMapping``."""

    mapping: CategoryMapping

    @property
    def num_classes(self) -> int:
        return self.mapping.num_classes

    @property
    def label_to_category_id(self) -> list[int]:
        return self.mapping.label_to_category_id

    @property
    def category_names(self) -> list[str]:
        return self.mapping.category_names


# COCO 2017 category names in the 91-slot layout of the official checkpoints (head index == category
# id): the 80 detection categories use ids 1..90 with gaps (ids retired from the original 91 list);
# index 0 and the gaps are "N/A", as in ``CategoryMapping(mode="coco91")``.
COCO_CATEGORIES: dict[int, str] = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}

COCO91_NAMES: list[str] = [COCO_CATEGORIES.get(index, UNUSED_NAME) for index in range(91)]
