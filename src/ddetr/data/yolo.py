"""Ultralytics YOLO detection datasets, read into the COCO form the rest of the pipeline uses.

Layout (`data=yolo data.data_dir=DIR`):
```
DIR/data.yaml (or dataset.yaml):
  path: .               optional; the dataset root, relative to the YAML's folder (default: that folder)
  train: images/train   a folder of images (searched recursively), a .txt list of image paths, or a list of these
  val: images/val       (relative to `path`; lines of a .txt list relative to the list's folder); the key may
                        also be `valid` or `validation` (`split_names`); `test:` is the test split
                        An entry starting with `../` that does not exist is taken without that `../`, as
                        Ultralytics does: Roboflow's `train: ../train/images` finds DIR/train/images.
  names: [cat, dog]     a list, or a dict {0: cat, 1: dog}; `nc`, when given, must match
DIR/images/train/a.jpg  ->  DIR/labels/train/a.txt   (the last /images/ of the path replaced by /labels/)
```
CVAT's "YOLO 1.1" export (obj.data, obj.names, train.txt) is read as such a description (`darknet`).
A label file has one `class cx cy w h` line per box, normalised to [0, 1]; a line with more
values is a polygon `class x1 y1 x2 y2 ...` (its bounding box is used). An image without a label
file, or with an empty one, is a negative; a split in which no image has a label file is an error
(the labels are elsewhere).

`read_yolo_split(data_dir, split)` returns a `ConvertedSplit`: the image folder (the deepest folder
holding every image), a COCO detection dict (image ids 1.., category id == class index, boxes in
pixels; the image size read from each file's header, nothing decoded) and the YAML path for
messages. Problems:
- one `DatasetError` naming the file (and line): unreadable or malformed YAML, a missing split or
  `names`, a label line with a wrong number of values, a non-number, a class index out of range;
- counted and named in one warning: boxes whose corners (or polygon points) lie outside [0, 1] by
  more than 1e-4 (the COCO cleaning then clips them or drops them as outside, and counts them), images whose header cannot be read
  (dropped with `skip_bad_images=True`, else an error).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from .conversion import ConvertedSplit, ProblemLog, append_annotation
from .darknet import DARKNET_DATA, darknet_path, read_darknet_data
from .files import read_capped, read_text_lines
from .image_loading import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_SUFFIXES, ImageLoadError, read_image_size
from .split_names import resolve_split
from .validation import DatasetError

log = logging.getLogger(__name__)

YAML_NAMES = ("data.yaml", "dataset.yaml")
OUTSIDE_TOLERANCE = 1e-4  # rounding in label files; beyond it a box outside the image is named in a warning


def find_yaml(data_dir: str | os.PathLike) -> Path:
    """`data_dir` itself when it is a file, else its data.yaml, dataset.yaml or (CVAT's YOLO 1.1) obj.data."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        return data_dir
    for name in (*YAML_NAMES, DARKNET_DATA):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DatasetError(f"{data_dir}: no {' or '.join((*YAML_NAMES, DARKNET_DATA))} (the YOLO dataset description)")


def read_description(path: Path) -> dict[str, Any]:
    """The dataset description: a data.yaml (`read_yaml`) or CVAT's obj.data (`darknet.read_darknet_data`)."""
    return read_darknet_data(path) if path.name == DARKNET_DATA else read_yaml(path)


def read_yaml(path: Path) -> dict[str, Any]:
    """The dataset description (yaml.safe_load), checked to be a mapping."""
    try:
        text = read_capped(path, "the dataset YAML").decode("utf-8")
        config = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise DatasetError(f"{path}: malformed YAML{where}: {exc.problem}") from exc
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path}: cannot read the dataset YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise DatasetError(f"{path}: expected a mapping with train, val and names")
    return config


def class_names(config: dict[str, Any], path: Path) -> dict[int, str]:
    """Class index -> name from `names` (a list, or a dict index -> name)."""
    names = config.get("names")
    if isinstance(names, list):
        table = dict(enumerate(names))
    elif isinstance(names, dict):
        table = {}
        for key, name in names.items():
            index = int(key) if isinstance(key, str) and key.isdigit() else key
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1_000_000:
                raise DatasetError(f"{path}: 'names' key {key!r} is not a class index")
            table[index] = name
    else:
        raise DatasetError(f"{path}: 'names' must be a list of class names or a dict index -> name")
    if not table:
        raise DatasetError(f"{path}: 'names' is empty")
    bad = [index for index, name in table.items() if not isinstance(name, (str, int, float)) or isinstance(name, bool)]
    if bad:
        raise DatasetError(f"{path}: 'names' entries {bad[:5]} are not names")
    if "nc" in config and config["nc"] != len(table):
        raise DatasetError(f"{path}: nc={config['nc']!r} but 'names' has {len(table)} entries")
    return {index: str(name) for index, name in sorted(table.items())}


def image_paths(config: dict[str, Any], split: str, root: Path, path: Path) -> list[Path]:
    """The images of `split`: folders searched recursively and .txt lists, in sorted order per entry."""
    entries = config.get(split)
    if entries is None:
        raise DatasetError(f"{path}: no '{split}' entry")
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise DatasetError(f"{path}: '{split}' must be a folder, a .txt list, or a list of these")
    images: list[Path] = []
    for entry in entries:
        location = Path(entry) if os.path.isabs(entry) else root / entry
        tried = [location]
        if not location.exists() and entry.startswith("../"):  # Ultralytics: a missing ../x is taken as x
            location = root / entry[3:]
            tried.append(location)
        if location.is_dir():
            found = sorted(p for p in location.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            images += found
        elif location.suffix == ".txt" and location.is_file():
            images += _listed_images(location)
        else:
            raise DatasetError(
                f"{path}: '{split}' entry {entry!r} is neither a folder nor a .txt list "
                f"({' nor '.join(os.path.normpath(p) for p in tried)})"
            )
    if not images:
        raise DatasetError(f"{path}: no images in '{split}' ({entries})")
    return images


def _listed_images(list_file: Path) -> list[Path]:
    lines = read_text_lines(list_file, "the image list")
    images = []
    for line in lines:
        line = line.strip()
        if line:
            images.append(Path(line) if os.path.isabs(line) else darknet_path(list_file.parent, line))
    return images


def label_path(image: Path) -> Path:
    """The Ultralytics rule: the last /images/ of the path becomes /labels/, the suffix .txt."""
    text = os.path.abspath(image)
    marker, replacement = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, found, tail = text.rpartition(marker)
    text = head + replacement + tail if found else text
    return Path(os.path.splitext(text)[0] + ".txt")


def parse_label_file(path: Path, num_classes_of: dict[int, str], problems: ProblemLog) -> list[tuple[int, list[float]]]:
    """(class index, [cx, cy, w, h] normalised) per line; a missing file is an empty list.

    Raises:
        DatasetError: unreadable file, a wrong number of values, a non-number, a bad class index (file:line).
    """
    if not path.exists():
        return []
    text = read_capped(path, "the label file")
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: label file is not UTF-8 text: {exc}") from exc
    boxes = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise DatasetError(
                f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', got {len(fields)} values"
            )
        try:
            values = [float(v) for v in fields]
        except ValueError as exc:
            raise DatasetError(f"{where}: not a number: {exc}") from exc
        if not all(math.isfinite(v) for v in values):
            raise DatasetError(f"{where}: values must be finite numbers")
        index = values[0]
        if index != int(index) or int(index) not in num_classes_of:
            raise DatasetError(
                f"{where}: class index {fields[0]} is not one of the {len(num_classes_of)} classes in 'names'"
            )
        coordinates = values[1:]
        if len(coordinates) == 4:
            cx, cy, w, h = coordinates
        else:  # a polygon: its bounding box
            xs, ys = coordinates[0::2], coordinates[1::2]
            cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
        corners = coordinates if len(coordinates) > 4 else [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        if not all(-OUTSIDE_TOLERANCE <= v <= 1.0 + OUTSIDE_TOLERANCE for v in corners):
            problems.add("coordinates outside [0, 1]", where)
        boxes.append((int(index), [cx, cy, w, h]))
    return boxes


def read_yolo_split(
    data_dir: str | os.PathLike,
    split: str,
    skip_bad_images: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> ConvertedSplit:
    """The `split` (a YAML key: "train", "val" or an alias, "test") of a YOLO dataset as a COCO dict (module
    docstring)."""
    yaml_path = find_yaml(data_dir)
    config = read_description(yaml_path)
    split = resolve_split(split, lambda key: config.get(key) is not None)
    root = Path(config.get("path") or ".")
    root = root if root.is_absolute() else yaml_path.parent / root
    names = class_names(config, yaml_path)
    paths = [Path(os.path.abspath(p)) for p in image_paths(config, split, root, yaml_path)]
    image_dir = Path(os.path.commonpath([str(p.parent) for p in paths]))
    problems = ProblemLog(f"{yaml_path} ({split})")

    images, annotations = [], []
    label_files = 0
    for image_path in paths:
        try:
            width, height = read_image_size(image_path, max_image_pixels)
        except ImageLoadError as exc:
            if not skip_bad_images:
                raise DatasetError(f"{image_path}: {exc.reason}") from exc
            problems.add(f"unreadable image ({exc.reason.split(':')[0]}), left out", str(image_path))
            continue
        image_id = len(images) + 1
        images.append(
            {
                "id": image_id,
                "file_name": image_path.relative_to(image_dir).as_posix(),
                "width": width,
                "height": height,
            }
        )
        labels = label_path(image_path)
        label_files += labels.exists()
        for index, (cx, cy, w, h) in parse_label_file(labels, names, problems):
            # pixels, rounded to 1e-6 so that whole-pixel boxes come out whole (no spurious "clipped")
            x0, y0 = round((cx - w / 2) * width, 6), round((cy - h / 2) * height, 6)
            x1, y1 = round((cx + w / 2) * width, 6), round((cy + h / 2) * height, 6)
            append_annotation(annotations, image_id, index, [x0, y0, x1 - x0, y1 - y0])
    if not images:
        raise DatasetError(f"{yaml_path}: no readable images in '{split}'")
    if not label_files:  # labels in the wrong place would otherwise train on negatives only
        raise DatasetError(
            f"{yaml_path}: no label file for any of the {len(images)} images of '{split}' (looked for "
            f"{label_path(image_dir / images[0]['file_name'])} and the like: an image's path with its last "
            "/images/ replaced by /labels/, suffix .txt)"
        )
    problems.report(log)
    categories = [{"id": index, "name": name} for index, name in names.items()]
    data = {"images": images, "annotations": annotations, "categories": categories}
    return ConvertedSplit(image_dir, data, f"{yaml_path} ({split})", problems.counts())
