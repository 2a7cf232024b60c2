"""Pascal VOC detection datasets, read into the COCO form the rest of the pipeline uses.

Two layouts (`data=voc data.data_dir=DIR`). A VOC year folder such as VOCdevkit/VOC2012:
```
DIR/ImageSets/Main/<split>.txt   one image id per line (the first word of the line)
DIR/Annotations/<id>.xml         <size><width/><height/></size> and one <object> per box:
                                 <name/>, <difficult/> (optional, 0/1), <bndbox><xmin/><ymin/><xmax/><ymax/></bndbox>
DIR/JPEGImages/<id>.jpg
```
or one folder per split with each image's XML beside it (Roboflow's "Pascal VOC" export):
```
DIR/train/a.jpg  DIR/train/a.xml    (the image: the file of the XML's stem with an image suffix)
DIR/valid/b.jpg  DIR/valid/b.xml    (split folders named as `split_names.resolve_split` finds them)
```
Class names: `class_names` in head order, or None to collect them from the dataset's XML files
(every XML of the layout, sorted by name; `collect_class_names` also counts their boxes).
VOC pixel coordinates are 1-based and inclusive: a box becomes `(xmin - 1, ymin - 1, xmax, ymax)`
in 0-based continuous pixels (COCO `bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`).
`difficult=1` objects become COCO crowd boxes (`iscrowd=1`): not trained on, ignored by the
evaluation, counted as "difficult" in the cleaning summary. Category id == index in `class_names`.

XML is parsed with `defusedxml` refusing any document type declaration (so no entity can be declared
or expanded, whatever the file's encoding: UTF-16 included), at most `MAX_XML_BYTES` per file. Every problem (an
unreadable or malformed file, a missing field, a non-number, a name not in `class_names`, an id that
is not a plain file name) is one `DatasetError` naming the file (and the line or object number).
A missing or zero `<size>` is read from the image header.
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as defused_fromstring

from .conversion import ConvertedSplit, ProblemLog, append_annotation
from .files import read_capped, read_text_lines
from .image_loading import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_SUFFIXES, ImageLoadError, read_image_size
from .split_names import resolve_split
from .validation import DatasetError

log = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
MAX_XML_BYTES = 16 << 20
_SAFE_ID = re.compile(r"^[^/\\\x00]+$")


class VocEntry(NamedTuple):
    """One image of a split: its annotation, its image file and that file's name relative to the image folder."""

    xml_path: Path
    image_path: Path
    file_name: str


def is_year_folder(data_dir: Path) -> bool:
    """Whether `data_dir` is a VOC year folder (it has Annotations/ and ImageSets/Main/)."""
    return (data_dir / "Annotations").is_dir() and (data_dir / "ImageSets" / "Main").is_dir()


def split_list(data_dir: Path, split: str) -> Path:
    """ImageSets/Main/<split>.txt of a year folder (`split` or an alias of it that exists)."""
    main = data_dir / "ImageSets" / "Main"
    return main / f"{resolve_split(split, lambda name: (main / f'{name}.txt').is_file())}.txt"


def split_folder(data_dir: Path, split: str) -> Path:
    """The folder of `split` (or of an alias of it that exists) in the XML-beside-the-images layout."""
    return data_dir / resolve_split(split, lambda name: (data_dir / name).is_dir())


def split_entries(data_dir: Path, split: str) -> tuple[list[VocEntry], Path]:
    """The images of `split` in either layout (module docstring) and the folder their file names are relative to."""
    if is_year_folder(data_dir):
        images = data_dir / "JPEGImages"
        return [
            VocEntry(data_dir / "Annotations" / f"{image_id}.xml", images / f"{image_id}.jpg", f"{image_id}.jpg")
            for image_id in split_ids(split_list(data_dir, split))
        ], images
    folder = split_folder(data_dir, split)
    if not folder.is_dir():
        raise DatasetError(
            f"{data_dir}: neither a VOC year folder (Annotations/, ImageSets/Main/) nor a folder with a "
            f"'{split}' split folder of images and XML files"
        )
    xml_files = sorted(folder.glob("*.xml"))
    if not xml_files:
        raise DatasetError(f"{folder}: no XML annotation files")
    images = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    entries = []
    for xml_path in xml_files:
        image_path = images.get(xml_path.stem)
        if image_path is None:
            raise DatasetError(f"{xml_path}: no image {xml_path.stem}.* beside it")
        entries.append(VocEntry(xml_path, image_path, image_path.name))
    return entries, folder


def all_annotation_files(data_dir: Path) -> list[Path]:
    """Every XML of the dataset: Annotations/*.xml of a year folder, else the XMLs of its split folders."""
    if is_year_folder(data_dir):
        return sorted((data_dir / "Annotations").glob("*.xml"))
    return sorted(p for folder in sorted(data_dir.iterdir()) if folder.is_dir() for p in folder.glob("*.xml"))


def collect_class_names(xml_paths: Sequence[Path]) -> Counter:
    """Class name -> number of <object>s with it over `xml_paths` (the names of a dataset without `class_names`)."""
    counts: Counter = Counter()
    for path in xml_paths:
        for obj in parse_xml(path).iter("object"):
            name_node = obj.find("name")
            counts[(name_node.text or "").strip() if name_node is not None else ""] += 1
    return counts


def dataset_class_names(data_dir: Path, logger: logging.Logger | None = None) -> list[str]:
    """The sorted class names of every XML file of the dataset (`all_annotation_files`), logged with their box
    counts in one line; ``DatasetError`` when no XML holds an object."""
    counts = collect_class_names(all_annotation_files(data_dir))
    if not counts:
        raise DatasetError(f"{data_dir}: no <object> in any XML file, so no class names to collect")
    names = sorted(counts)
    (logger or log).info(
        "%s: class names from the XML files (boxes): %s", data_dir, ", ".join(f"{n} ({counts[n]})" for n in names)
    )
    return names


def split_ids(path: Path) -> list[str]:
    """Image ids of an ImageSets/Main/<split>.txt (first word of each non-empty line)."""
    lines = read_text_lines(path, "the split list")
    ids = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if not _SAFE_ID.match(fields[0]) or fields[0] in (".", ".."):
            raise DatasetError(f"{path}:{number}: image id {fields[0]!r} is not a plain file name")
        ids.append(fields[0])
    if not ids:
        raise DatasetError(f"{path}: no image ids")
    return ids


def parse_xml(path: Path) -> ET.Element:
    """The root of an annotation XML; no document type (and so no entity) declarations accepted."""
    content = read_capped(path, "the annotation", MAX_XML_BYTES)
    try:
        return defused_fromstring(content, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise DatasetError(f"{path}: DTD or entity declarations are not accepted in an annotation ({exc})") from exc
    except ET.ParseError as exc:
        line, column = exc.position
        raise DatasetError(f"{path}: malformed XML at line {line} column {column + 1}") from exc


def _number(element: ET.Element | None, tag: str, path: Path, where: str) -> float:
    node = None if element is None else element.find(tag)
    if node is None or node.text is None:
        raise DatasetError(f"{path}: {where} lacks <{tag}>")
    try:
        value = float(node.text.strip())
    except ValueError as exc:
        raise DatasetError(f"{path}: {where} <{tag}> is not a number: {node.text.strip()!r}") from exc
    if value != value or value in (float("inf"), float("-inf")):
        raise DatasetError(f"{path}: {where} <{tag}> is not finite")
    return value


def _image_size(
    root: ET.Element, image_path: Path, xml_path: Path, max_image_pixels: int | None
) -> tuple[int, int] | None:
    size = root.find("size")
    if size is not None:
        width, height = (_number(size, tag, xml_path, "<size>") for tag in ("width", "height"))
        if width > 0 and height > 0:
            if width != int(width) or height != int(height) or max(width, height) > 2**31 - 1:
                raise DatasetError(f"{xml_path}: <size> must be whole pixels, got {width} x {height}")
            return int(width), int(height)
    try:
        return read_image_size(image_path, max_image_pixels)
    except ImageLoadError:
        return None


def read_voc_split(
    data_dir: str | os.PathLike,
    split: str,
    class_names: Sequence[str] | None = VOC_CLASSES,
    skip_bad_images: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> ConvertedSplit:
    """The images of `split` with their boxes as a COCO dict (module docstring); `class_names` None: collected."""
    data_dir = Path(data_dir)
    entries, image_dir = split_entries(data_dir, split)
    if class_names is None:
        class_names = dataset_class_names(data_dir)
    class_names = [str(name) for name in class_names]
    if len(set(class_names)) != len(class_names) or not class_names:
        raise DatasetError(f"class_names must be distinct and not empty, got {class_names}")
    category_of = {name: index for index, name in enumerate(class_names)}
    problems = ProblemLog(f"{data_dir} ({split})")
    images, annotations = [], []
    for xml_path, image_path, file_name in entries:
        root = parse_xml(xml_path)
        size = _image_size(root, image_path, xml_path, max_image_pixels)
        if size is None:
            if not skip_bad_images:
                raise DatasetError(f"{xml_path}: no <size> and {image_path} is unreadable")
            problems.add("no <size> and an unreadable image, left out", str(xml_path))
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
        for number, obj in enumerate(root.iter("object"), start=1):
            where = f"<object> {number}"
            name_node = obj.find("name")
            name = (name_node.text or "").strip() if name_node is not None else ""
            if name not in category_of:
                raise DatasetError(
                    f"{xml_path}: {where} has class name {name!r}, not one of class_names "
                    f"({len(class_names)} names: {', '.join(class_names[:5])}...)"
                )
            difficult_node = obj.find("difficult")
            difficult = difficult_node is not None and (difficult_node.text or "0").strip() not in ("0", "")
            box = obj.find("bndbox")
            if box is None:
                raise DatasetError(f"{xml_path}: {where} lacks <bndbox>")
            xmin, ymin, xmax, ymax = (_number(box, tag, xml_path, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
            bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            if xmin < 1 or ymin < 1 or xmax > size[0] or ymax > size[1]:
                problems.add("box outside the image", f"{xml_path} {where}")
            append_annotation(annotations, image_id, category_of[name], bbox, iscrowd=int(difficult))
    if not images:
        raise DatasetError(f"{data_dir}: no usable images in '{split}'")
    problems.report(log)
    categories = [{"id": index, "name": name} for index, name in enumerate(class_names)]
    data = {"images": images, "annotations": annotations, "categories": categories}
    return ConvertedSplit(image_dir, data, f"{data_dir} ({split})", problems.counts())
