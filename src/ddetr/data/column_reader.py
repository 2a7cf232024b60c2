"""Reading a COCO detection file straight into `CocoColumns`, without a Python dict per entry.

msgspec decodes the file against typed structs holding only the fields training uses (image ids,
sizes and file names; annotation ids, image and category ids, boxes and crowd flags; category ids,
names and supercategories); every other field (`segmentation`, `area`, urls, ...) is checked as JSON and skipped, never
built. The types are checked while decoding, as `validation` checks them: an integer field takes no
bool, float or string, a box is a list of 4 numbers (no bool), a name is a string. So each column comes
out of one pass over its entries: decoding and columns take about a third of the CPU time of `json.loads`
plus the column pass of `validation.validate_coco` on a COCO-train-sized file.

A file the typed decoding refuses (malformed JSON, a missing key, an unusual type such as
`"iscrowd": null`, an integer beyond 64 bits, NaN) or whose columns fail `validation.columns_pass_checks`
is read again the general way (`validation.read_coco_json`), which names the problem or, for a valid
file of unusual types, returns its columns: a file is accepted or refused, with the same columns and
the same messages, as by that reader alone. Without msgspec installed every file is read that way.
"""

from __future__ import annotations

import os
from itertools import chain
from operator import attrgetter
from pathlib import Path

import numpy as np

from .validation import CocoColumns, DatasetError, columns_pass_checks, gc_paused, read_coco_json

try:
    import msgspec
except ImportError:  # pragma: no cover - a core dependency; only a broken install lacks it
    msgspec = None


if msgspec is not None:
    # gc=False: the structs hold no containers the garbage collector would need to see

    class _Image(msgspec.Struct, gc=False):
        id: int
        file_name: str
        width: int
        height: int

    class _Annotation(msgspec.Struct, gc=False):
        id: int
        image_id: int
        category_id: int
        bbox: tuple[float, float, float, float]  # JSON ints are taken as floats, bools refused
        iscrowd: int | bool = 0

    class _Category(msgspec.Struct, gc=False):
        id: int
        name: str
        supercategory: str | None = None  # any other type: the general reader (which keeps None for it)

    class _CocoFile(msgspec.Struct, gc=False):
        images: list[_Image]
        annotations: list[_Annotation]
        categories: list[_Category]

    _DECODER = msgspec.json.Decoder(_CocoFile)


def read_coco_columns(path: str | os.PathLike) -> CocoColumns:
    """The validated `CocoColumns` of a COCO detection file, parsed once; the file itself is not kept.

    Raises:
        DatasetError: as `validation.read_coco_json` (unreadable file, malformed JSON with its line and
            column, missing keys, wrong types, duplicate or unknown ids, unsafe file names).
    """
    path = Path(path)
    if msgspec is not None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read annotation file: {exc}") from exc
        with gc_paused():
            columns = _typed_columns(raw)
        del raw
        if columns is not None and columns_pass_checks(columns):
            return columns
    return read_coco_json(path)[1]  # names what is wrong, or reads a valid file of unusual types


def _typed_columns(raw: bytes) -> CocoColumns | None:
    """The columns of a file of the usual types, or None when the typed decoding refuses it."""
    if not raw.isascii():  # msgspec checks the UTF-8 of the strings it builds only; the general reader
        try:  # refuses a file with invalid UTF-8 anywhere, so this one does too
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        parsed = _DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    images, annotations, categories = parsed.images, parsed.annotations, parsed.categories
    try:
        return CocoColumns(
            image_ids=_int64(images, "id"),
            widths=_int64(images, "width"),
            heights=_int64(images, "height"),
            file_names=list(map(attrgetter("file_name"), images)),
            annotation_ids=_int64(annotations, "id"),
            annotation_image_ids=_int64(annotations, "image_id"),
            annotation_category_ids=_int64(annotations, "category_id"),
            bboxes=np.fromiter(
                chain.from_iterable(map(attrgetter("bbox"), annotations)), dtype=np.float64, count=4 * len(annotations)
            ).reshape(-1, 4),  # (num_annotations, 4) as (x, y, w, h)
            iscrowd=np.fromiter(map(attrgetter("iscrowd"), annotations), dtype=bool, count=len(annotations)),
            category_ids=_int64(categories, "id"),
            category_names=list(map(attrgetter("name"), categories)),
            category_supercategories=list(map(attrgetter("supercategory"), categories)),
        )
    except OverflowError:  # an integer outside int64
        return None


def _int64(entries: list, field: str) -> np.ndarray:
    """int64 (len(entries),): one integer field of every entry (OverflowError outside int64)."""
    return np.fromiter(map(attrgetter(field), entries), dtype=np.int64, count=len(entries))
