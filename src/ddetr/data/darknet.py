"""CVAT's "YOLO 1.1" export (the darknet layout), read as the dataset description a data.yaml would give.

```
DIR/obj.data               `key = value` lines: classes = 3, names = data/obj.names, train = data/train.txt,
                           valid = data/valid.txt (optional), backup = backup/ (ignored)
DIR/obj.names              one class name per line, in class-index order
DIR/train.txt              image paths, one a line: data/obj_train_data/a.jpg
DIR/obj_train_data/a.jpg   with its label file beside it: obj_train_data/a.txt (YOLO lines)
```
The paths say `data/...` because darknet reads the export unpacked into a folder named `data`: a path
that does not exist is tried without its leading `data/` (`darknet_path`), in obj.data and in the lists.
`read_darknet_data` returns {"names", "nc", "train", "val"} as `yolo.read_yolo_split` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import read_text_lines
from .validation import DatasetError

DARKNET_DATA = "obj.data"


def darknet_path(folder: Path, value: str) -> Path:
    """`folder / value`, or without a leading `data/` when only that exists (darknet's convention)."""
    path = folder / value
    if not path.exists() and value.startswith("data/") and (folder / value[5:]).exists():
        return folder / value[5:]
    return path


def read_darknet_data(path: Path) -> dict[str, Any]:
    """The dataset description of an obj.data file (module docstring); one `DatasetError` naming the file
    (and line) when it cannot be read or a line is not `key = value`."""
    entries: dict[str, str] = {}
    for number, line in enumerate(read_text_lines(path, "the darknet data file"), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, equals, value = line.partition("=")
        if not equals:
            raise DatasetError(f"{path}:{number}: expected 'key = value', got {line!r}")
        entries[key.strip()] = value.strip()
    names_file = darknet_path(path.parent, entries.get("names", "obj.names"))
    names = [name.strip() for name in read_text_lines(names_file, "the class names") if name.strip()]
    config: dict[str, Any] = {"names": names}
    if "classes" in entries:
        try:
            config["nc"] = int(entries["classes"])
        except ValueError as exc:
            raise DatasetError(f"{path}: classes = {entries['classes']!r} is not a number") from exc
    for key, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        if entries.get(key):
            config[split] = str(darknet_path(path.parent, entries[key]))
    return config
