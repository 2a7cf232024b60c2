"""Structural validation of a COCO detection annotation file.

`load_coco_json(path)` parses the file and checks what the rest of the pipeline relies on. Every
problem found is collected and raised together as ONE `DatasetError` naming the file and, for each
kind of problem, the first few offending ids. Problems that only concern single boxes (zero size,
outside the image, crowd) are not errors: `annotations.clean_annotations` drops and counts them.

Numbers: ids must fit in 64 bits and image sides in 31 bits; an integer too long for Python's
integer parser (over 4300 digits) is reported like any other invalid value, naming its entry.
File names: a `file_name` must be a relative path that stays inside the image folder (no `..`
component, not absolute, no NUL); symbolic links inside the folder are followed as usual.

`validate_coco` returns the annotations as numpy columns (`CocoColumns`): well-formed files are
checked column-wise without building any per-entry Python object; a file that fails the fast
checks is re-checked entry by entry to name the offending ids.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np


class DatasetError(ValueError):
    """A dataset cannot be used as given: the message names the file and the offending ids."""


MAX_IDS_SHOWN = 5
INT64_RANGE = (-(2**63), 2**63 - 1)
MAX_IMAGE_SIDE = 2**31 - 1
MAX_NUMBER_DIGITS = 40  # longer integer literals are replaced by `OversizedInteger` on the slow path
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
    return read_coco_json(path)[0]


def read_coco_json(path: str | os.PathLike) -> tuple[dict[str, Any], CocoColumns]:
    """Read, parse (once) and validate a COCO detection file: the parsed dict and its `CocoColumns`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read annotation file: {exc}") from exc
    data = parse_json(text, path)
    return data, validate_coco(data, path)


class OversizedInteger(str):
    """An integer literal too long to be an id or a size (kept as its text, so it is reported)."""


def _parse_int(text: str) -> int | OversizedInteger:
    return int(text) if len(text) <= MAX_NUMBER_DIGITS else OversizedInteger(text[:12] + "...")


@contextmanager
def gc_paused():
    """No cyclic garbage collection while millions of acyclic objects are created and freed again (a
    parsed annotation file): each collection would traverse all of them, to find nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_json(text: str | bytes, path: str | os.PathLike) -> Any:
    """`json.loads` with every failure as one `DatasetError` naming `path` (position, or the value)."""
    try:
        with gc_paused():
            return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}"
        ) from exc
    except (ValueError, RecursionError):
        pass  # an integer beyond Python's digit limit, or nesting too deep: parse again, slowly
    try:
        with gc_paused():
            return json.loads(text, parse_int=_parse_int)
    except (ValueError, RecursionError) as exc:
        raise DatasetError(f"{path}: cannot parse JSON: {type(exc).__name__}: {exc}") from exc


@dataclass
class CocoColumns:
    """The fields of a validated COCO file that training needs, as numpy columns.

    images: `image_ids` int64 (num_images,), `widths` / `heights` int64 (num_images,), `file_names`
    (list of str, JSON order). annotations: `annotation_ids`, `annotation_image_ids`, `annotation_category_ids` int64
    (num_annotations,), `bboxes` float64 (num_annotations, 4) as (x, y, w, h), `iscrowd` bool
    (num_annotations,). `category_ids` int64 (num_categories,), `category_names` list of str.
    `annotation_image_index` int64 (num_annotations,): the position in `image_ids` of each annotation's image.
    `category_supercategories`: each category's `supercategory` when it is a string, else None (empty: not read).
    """

    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    file_names: list[str]
    annotation_ids: np.ndarray
    annotation_image_ids: np.ndarray
    annotation_category_ids: np.ndarray
    bboxes: np.ndarray
    iscrowd: np.ndarray
    category_ids: np.ndarray
    category_names: list[str]
    annotation_image_index: np.ndarray | None = None  # int64 (num_annotations,): position of the image, once checked
    category_supercategories: list[str | None] = field(default_factory=list)


def validate_coco(data: Any, path: str | os.PathLike) -> CocoColumns:
    """Check a parsed COCO dict; raise one `DatasetError` listing every problem found.

    Returns the validated fields as `CocoColumns`.
    """
    _check_top_level(data, path)
    with gc_paused():
        columns = _fast_columns(data)
    if columns is None or not columns_pass_checks(columns):
        _detailed_checks(data, path)  # names the offending ids; raises when anything is wrong
        with gc_paused():
            columns = _fast_columns(data)
        if columns is None or not columns_pass_checks(columns):
            raise DatasetError(f"{path}: invalid COCO annotations")  # a case the detailed checks miss
    return columns


def _column(entries: list, key: str, types: tuple[type, ...]) -> list | None:
    """`[e[key] for e in entries]` when every entry has it and every value is exactly of `types`."""
    try:
        values = list(map(itemgetter(key), entries))
    except (KeyError, TypeError):
        return None
    return values if set(map(type, values)) <= set(types) else None


def _int64(values: list | None) -> np.ndarray | None:
    if values is None:
        return None
    try:
        return np.fromiter(values, dtype=np.int64, count=len(values))
    except (OverflowError, ValueError):
        return None


def _fast_columns(data: dict) -> CocoColumns | None:
    """The columns of a well-formed file, or None when some entry is malformed (the slow checks say which)."""
    images, annotations, categories = data["images"], data["annotations"], data["categories"]
    if not (set(map(type, chain(images, annotations, categories))) <= {dict}):
        return None
    columns = {
        "image_ids": _int64(_column(images, "id", (int,))),
        "widths": _int64(_column(images, "width", (int,))),
        "heights": _int64(_column(images, "height", (int,))),
        "file_names": _column(images, "file_name", (str,)),
        "annotation_ids": _int64(_column(annotations, "id", (int,))),
        "annotation_image_ids": _int64(_column(annotations, "image_id", (int,))),
        "annotation_category_ids": _int64(_column(annotations, "category_id", (int,))),
        "category_ids": _int64(_column(categories, "id", (int,))),
        "category_names": _column(categories, "name", (str,)),
    }
    bboxes = _column(annotations, "bbox", (list,))
    if bboxes is None or any(column is None for column in columns.values()):
        return None
    if bboxes and (set(map(len, bboxes)) != {4} or not set(map(type, chain.from_iterable(bboxes))) <= {int, float}):
        return None
    try:
        boxes = np.fromiter(chain.from_iterable(bboxes), dtype=np.float64, count=4 * len(bboxes))
    except OverflowError:
        return None
    crowd_flags = list(map(dict.get, annotations, repeat("iscrowd", len(annotations)), repeat(0, len(annotations))))
    if set(map(type, crowd_flags)) <= {int, bool}:
        iscrowd = np.fromiter(map(bool, crowd_flags), dtype=bool, count=len(crowd_flags))
    else:
        iscrowd = np.array([bool(flag) for flag in crowd_flags], dtype=bool)
    supercategories = [c.get("supercategory") for c in categories]
    supercategories = [name if isinstance(name, str) else None for name in supercategories]
    return CocoColumns(
        **columns, bboxes=boxes.reshape(-1, 4), iscrowd=iscrowd, category_supercategories=supercategories
    )


def _has_duplicates(ids: np.ndarray) -> bool:
    ordered = np.sort(ids)
    return bool(np.any(ordered[1:] == ordered[:-1]))


def positions_of(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """int64 (len(values),): the index in `keys` (unique) of each value, -1 where a value is not a key.

    A dense lookup table when the keys span a small range (COCO's ids do), else a binary search."""
    if not len(keys) or not len(values):
        return np.full(len(values), -1, dtype=np.int64)
    low, high = int(keys.min()), int(keys.max())
    if high - low < 4 * len(keys) + 1024:
        table = np.full(high - low + 1, -1, dtype=np.int64)
        table[keys - low] = np.arange(len(keys))
        inside = (values >= low) & (values <= high)
        found = np.full(len(values), -1, dtype=np.int64)
        found[inside] = table[values[inside] - low]
        return found
    order = np.argsort(keys, kind="stable")
    slots = np.minimum(np.searchsorted(keys, values, sorter=order), len(keys) - 1)
    found = order[slots]
    return np.where(keys[found] == values, found, -1)


def columns_pass_checks(c: CocoColumns) -> bool:
    """Whether well-typed columns pass every check of `validate_coco` (sizes, finite boxes, unique ids, known
    images and categories, safe file names); sets `c.annotation_image_index` on the way. No message: a
    file that fails is checked again entry by entry (`_detailed_checks`) to name the problem."""
    if not (np.all(c.widths > 0) and np.all(c.heights > 0)):
        return False
    if c.widths.size and max(c.widths.max(), c.heights.max()) > MAX_IMAGE_SIDE:
        return False
    if not np.all(np.isfinite(c.bboxes)) or not c.category_ids.size:
        return False
    if any(_has_duplicates(ids) for ids in (c.image_ids, c.annotation_ids, c.category_ids)):
        return False
    c.annotation_image_index = positions_of(c.annotation_image_ids, c.image_ids)
    if np.any(c.annotation_image_index < 0) or np.any(positions_of(c.annotation_category_ids, c.category_ids) < 0):
        return False
    return not _any_unsafe_file_name(c.file_names)


# empty; absolute (/, \, a drive letter); a ".." component; a NUL
_UNSAFE_PATTERN = re.compile(r"^(?:$|[/\\]|[A-Za-z]:)|(?:^|[/\\])\.\.(?:[/\\]|$)|\x00")


def _any_unsafe_file_name(names: list[str]) -> bool:
    """Whether some name is unsafe (`_unsafe_file_name`); the pattern runs only when a cheap test over all
    names (C loops: an empty name, a leading slash, a colon second, `..` or NUL anywhere) finds a candidate."""
    joined = "/".join(names)  # "/" is no dot and no NUL: no false `..` or NUL across names
    candidate = (
        ".." in joined
        or "\x00" in joined
        or not all(names)
        or any(map(str.startswith, names, repeat(("/", "\\"))))
        or any(map(str.startswith, names, repeat(":"), repeat(1)))
    )
    return candidate and any(map(_UNSAFE_PATTERN.search, names))


def _unsafe_file_name(name: str) -> bool:
    """A name that is empty, absolute, has a `..` component or a NUL (it could leave the image folder)."""
    return _UNSAFE_PATTERN.search(name) is not None


def _check_top_level(data: Any, path: str | os.PathLike) -> None:
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise DatasetError(f"{path}: missing top-level key(s) {missing}")
    not_lists = [key for key in REQUIRED_KEYS if not isinstance(data[key], list)]
    if not_lists:
        raise DatasetError(f"{path}: top-level key(s) {not_lists} must be lists")


def _detailed_checks(data: dict, path: str | os.PathLike) -> None:
    """Entry-by-entry checks of a file that failed the fast ones: one error naming the offending ids."""
    problems: list[str] = []
    for section, keys in REQUIRED_KEYS.items():
        problems += _entry_problems(section, data[section], keys)
    if problems:  # later checks assume well-formed entries
        _raise(path, problems)

    for section in REQUIRED_KEYS:
        duplicates = [i for i, n in Counter(entry["id"] for entry in data[section]).items() if n > 1]
        if duplicates:
            problems.append(f"duplicate {section[:-1]} ids {_first(duplicates)}")
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    unknown_images = [a["id"] for a in data["annotations"] if a["image_id"] not in image_ids]
    if unknown_images:
        problems.append(f"annotations {_first(unknown_images)} point at unknown image ids")
    unknown_categories = [a["id"] for a in data["annotations"] if a["category_id"] not in category_ids]
    if unknown_categories:
        problems.append(f"annotations {_first(unknown_categories)} point at unknown category ids")
    if not data["categories"]:
        problems.append("no categories")
    unsafe = [image["id"] for image in data["images"] if _unsafe_file_name(image["file_name"])]
    if unsafe:
        problems.append(
            f"{len(unsafe)} images {_first(unsafe)} have a 'file_name' that leaves the image folder "
            "(absolute, '..' or empty); refused"
        )
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
    bad_ids = [_entry_name(i, e) for i, e in enumerate(entries) if "id" in e and not _is_int(e["id"])]
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
        bad = [_entry_name(i, e) for i, e in enumerate(entries) if key in e and not ok(e[key])]
        if bad:
            problems.append(f"{section} {_first(bad)} have an invalid '{key}'")
    return problems


def _entry_name(position: int, entry: dict) -> Any:
    name = entry.get("id", f"#{position}")
    if isinstance(name, int) and not _is_int(name):
        return f"#{position} (id {str(name)[:12]}...)"
    return name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT64_RANGE[0] <= value <= INT64_RANGE[1]


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and 0 < value <= MAX_IMAGE_SIDE


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e300 and math.isfinite(v)
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
