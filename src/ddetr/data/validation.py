"""Structural validation of a COCO detection annotation file.

`load_coco_json(path)` parses the file and checks what the rest of the pipeline relies on. Every
problem found is collected and raised together as ONE `DatasetError` naming the file and, for each
kind of problem, the first few offending ids. Problems that only concern single boxes (zero size,
outside the image, crowd) are not errors: `annotations.clean_annotations` drops and counts them.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset cannot be used as given: the message names the file and the offending ids."""


MAX_IDS_SHOWN = 5
REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def load_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a COCO detection file; return the parsed dict.

    Raises:
        DatasetError: unreadable file, malformed JSON (with line/column), missing top-level or
            per-entry keys, wrongly typed ids/sizes/boxes, duplicate ids, or annotations that point
            at unknown images or categories.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read annotation file: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}"
        ) from exc
    validate_coco(data, path)
    return data


def validate_coco(data: Any, path: str | os.PathLike) -> None:
    """Check a parsed COCO dict; raise one `DatasetError` listing every problem found."""
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a JSON object at the top level, got {type(data).__name__}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise DatasetError(f"{path}: missing top-level key(s) {missing}")
    not_lists = [key for key in REQUIRED_KEYS if not isinstance(data[key], list)]
    if not_lists:
        raise DatasetError(f"{path}: top-level key(s) {not_lists} must be lists")

    problems: list[str] = []
    for section, keys in REQUIRED_KEYS.items():
        problems += _entry_problems(section, data[section], keys)
    if problems:  # later checks assume well-formed entries
        _raise(path, problems)

    for section in REQUIRED_KEYS:
        duplicates = [
            i
            for i, n in Counter(entry["id"] for entry in data[section]).items()
            if n > 1
        ]
        if duplicates:
            problems.append(f"duplicate {section[:-1]} ids {_first(duplicates)}")
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    unknown_images = [
        a["id"] for a in data["annotations"] if a["image_id"] not in image_ids
    ]
    if unknown_images:
        problems.append(
            f"annotations {_first(unknown_images)} point at unknown image ids"
        )
    unknown_categories = [
        a["id"] for a in data["annotations"] if a["category_id"] not in category_ids
    ]
    if unknown_categories:
        problems.append(
            f"annotations {_first(unknown_categories)} point at unknown category ids"
        )
    if not data["categories"]:
        problems.append("no categories")
    if problems:
        _raise(path, problems)


def _entry_problems(section: str, entries: list, keys: tuple[str, ...]) -> list[str]:
    problems = []
    not_objects = [i for i, e in enumerate(entries) if not isinstance(e, dict)]
    if not_objects:
        return [f"{section} entries at positions {_first(not_objects)} are not objects"]
    for key in keys:
        lacking = [_entry_name(i, e) for i, e in enumerate(entries) if key not in e]
        if lacking:
            problems.append(f"{section} {_first(lacking)} lack required key '{key}'")
    bad_ids = [
        _entry_name(i, e)
        for i, e in enumerate(entries)
        if "id" in e and not _is_int(e["id"])
    ]
    if bad_ids:
        problems.append(f"{section} {_first(bad_ids)} have a non-integer 'id'")
    checks = {
        "images": [
            ("width", _is_positive_int),
            ("height", _is_positive_int),
            ("file_name", _is_str),
        ],
        "annotations": [
            ("image_id", _is_int),
            ("category_id", _is_int),
            ("bbox", _is_box),
        ],
        "categories": [("name", _is_str)],
    }[section]
    for key, ok in checks:
        bad = [
            _entry_name(i, e)
            for i, e in enumerate(entries)
            if key in e and not ok(e[key])
        ]
        if bad:
            problems.append(f"{section} {_first(bad)} have an invalid '{key}'")
    return problems


def _entry_name(position: int, entry: dict) -> Any:
    return entry.get("id", f"#{position}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    )


def _first(ids: list) -> str:
    shown = ", ".join(str(i) for i in ids[:MAX_IDS_SHOWN])
    more = f" and {len(ids) - MAX_IDS_SHOWN} more" if len(ids) > MAX_IDS_SHOWN else ""
    return f"[{shown}{more}]"


def _raise(path: str | os.PathLike, problems: list[str]) -> None:
    details = "".join(f"\n  - {p}" for p in problems)
    raise DatasetError(f"{path}: invalid COCO annotations:{details}")
