"""What a dataset folder holds: `find_layout(data_dir)` detects the annotation format and the splits.

The formats and where they are looked for (`split` one of the names `split_names` knows: train;
val, valid, validation; test):
- COCO JSON, one file per split: `instances_<split>.json` or `<split>.json` under DIR or DIR/annotations,
  `instances_<split>2017.json` under DIR/annotations (COCO's own), or Roboflow's
  `DIR/<split>/_annotations.coco.json`. The images: the JSON's folder for Roboflow's, else the first
  folder of DIR/<split>, DIR/images/<split>, DIR/<split>2017, DIR/images.
- YOLO: DIR/data.yaml or DIR/dataset.yaml (its keys name the splits; `ddetr.data.yolo`), or CVAT's
  "YOLO 1.1" export, DIR/obj.data (`ddetr.data.darknet`).
- Pascal VOC: a year folder (DIR/Annotations/, DIR/ImageSets/Main/<split>.txt) or split folders
  DIR/<split>/ holding XML files beside the images (`ddetr.data.voc`).

A folder in which none is found, or more than one, or a split with two annotation files, is one
`DatasetError` naming the folder and what was found (or looked for). Label Studio's YOLO export
(`classes.txt` without a data.yaml, one split) is recognised only to say that it is not read yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .darknet import DARKNET_DATA
from .split_names import SPLIT_ALIASES
from .validation import DatasetError
from .voc import is_year_folder, split_list
from .yolo import YAML_NAMES, read_description

FORMATS = ("coco", "yolo", "voc")
ROBOFLOW_COCO_FILE = "_annotations.coco.json"


@dataclass
class DatasetLayout:
    """A detected dataset folder.

    format: "coco", "yolo" or "voc". root: the folder. kind: the layout in words ("Roboflow COCO JSON",
    "VOC year folder", ...). splits: standard split name ("train", "val", "test") -> the name the dataset
    gives it (a folder, file stem or YAML key). evidence: the files or folders it was recognised by.
    coco_files: for COCO, split -> (image folder, JSON file).
    """

    format: str
    root: Path
    kind: str
    splits: dict[str, str]
    evidence: list[str]
    coco_files: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def describe_split(self, split: str) -> str:
        """`split` as the dataset names it, with its file for COCO."""
        name = self.splits[split]
        if self.format == "coco":
            return f"{name} ({self.coco_files[split][1]})"
        return name


def find_layout(data_dir: str | os.PathLike) -> DatasetLayout:
    """The one dataset layout in `data_dir` (module docstring).

    Raises:
        DatasetError: not a folder; no layout found; several found (listing them); two annotation
            files for one split; a COCO JSON without an image folder.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (data.data_dir of data=folder is the dataset's folder)")
    found = [layout for layout in (_coco(root), _yolo(root), _voc(root)) if layout is not None]
    if len(found) > 1:
        candidates = "; ".join(f"{layout.kind}: {', '.join(layout.evidence)}" for layout in found)
        raise DatasetError(
            f"{root}: more than one dataset layout ({candidates}); point data.data_dir at one, or choose the reader "
            "with data=yolo, data=voc or data=custom"
        )
    if not found:
        raise DatasetError(f"{root}: no dataset found{_unsupported(root)}: {_looked_for()}")
    return found[0]


def _looked_for() -> str:
    return (
        "looked for COCO JSON (instances_<split>.json or <split>.json in the folder or annotations/, "
        f"<split>/{ROBOFLOW_COCO_FILE}), YOLO ({' or '.join((*YAML_NAMES, DARKNET_DATA))}) and Pascal VOC "
        "(Annotations/ with "
        "ImageSets/Main/, or <split>/ folders with XML files beside the images)"
    )


def _unsupported(root: Path) -> str:
    if (root / "classes.txt").is_file():
        return " (Label Studio's YOLO export, classes.txt, is not read yet: write a data.yaml for it)"
    return ""


def _coco(root: Path) -> DatasetLayout | None:
    files: dict[str, list[tuple[str, Path]]] = {}
    for split, aliases in SPLIT_ALIASES.items():
        for name in aliases:
            candidates = [
                root / f"instances_{name}.json",
                root / f"{name}.json",
                root / "annotations" / f"instances_{name}.json",
                root / "annotations" / f"{name}.json",
                root / "annotations" / f"instances_{name}2017.json",
                root / name / ROBOFLOW_COCO_FILE,
            ]
            files.setdefault(split, []).extend((name, path) for path in candidates if path.is_file())
    files = {split: found for split, found in files.items() if found}
    if not files:
        return None
    for split, found in files.items():
        if len(found) > 1:
            raise DatasetError(
                f"{root}: {len(found)} annotation files for the {split} split ({', '.join(str(p) for _, p in found)}); "
                "keep one"
            )
    coco_files = {split: (_coco_images(root, name, path), path) for split, [(name, path)] in files.items()}
    roboflow = any(path.name == ROBOFLOW_COCO_FILE for _, path in coco_files.values())
    splits = {split: name for split, [(name, _)] in files.items()}
    evidence = [str(path) for _, path in coco_files.values()]
    return DatasetLayout("coco", root, "Roboflow COCO JSON" if roboflow else "COCO JSON", splits, evidence, coco_files)


def _coco_images(root: Path, name: str, annotations: Path) -> Path:
    if annotations.name == ROBOFLOW_COCO_FILE:
        return annotations.parent
    candidates = [root / name, root / "images" / name, root / f"{name}2017", root / "images"]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise DatasetError(f"{annotations}: no image folder for it (looked for {', '.join(str(p) for p in candidates)})")


def _yolo(root: Path) -> DatasetLayout | None:
    yamls = [root / name for name in (*YAML_NAMES, DARKNET_DATA) if (root / name).is_file()]
    if not yamls:
        return None
    if len(yamls) > 1:
        raise DatasetError(f"{root}: two YOLO dataset descriptions ({', '.join(map(str, yamls))}); keep one")
    config = read_description(yamls[0])
    splits = {}
    for split, aliases in SPLIT_ALIASES.items():
        present = [name for name in aliases if config.get(name) is not None]
        if present:
            splits[split] = present[0]
    kind = "CVAT YOLO 1.1 obj.data" if yamls[0].name == DARKNET_DATA else f"YOLO {yamls[0].name}"
    return DatasetLayout("yolo", root, kind, splits, [str(yamls[0])])


def _voc(root: Path) -> DatasetLayout | None:
    if is_year_folder(root):
        splits = {}
        for split in SPLIT_ALIASES:
            listed = split_list(root, split)
            if listed.is_file():
                splits[split] = listed.stem
        return DatasetLayout("voc", root, "VOC year folder", splits, [str(root / "Annotations")])
    splits = {}
    for split, aliases in SPLIT_ALIASES.items():
        for name in aliases:
            if (root / name).is_dir() and next((root / name).glob("*.xml"), None) is not None:
                splits[split] = name
                break
    evidence = [f"{root / name}/*.xml" for name in splits.values()]
    return DatasetLayout("voc", root, "VOC XML beside the images", splits, evidence) if splits else None
