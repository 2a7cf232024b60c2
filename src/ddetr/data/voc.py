"""Pascal VOC detection datasets, read into the COCO form the rest of the pipeline uses.

Layout (`data=voc data.data_dir=DIR`, a VOC year folder such as VOCdevkit/VOC2012):
```
DIR/ImageSets/Main/<split>.txt   one image id per line (the first word of the line)
DIR/Annotations/<id>.xml         <size><width/><height/></size> and one <object> per box:
                                 <name/>, <difficult/> (optional, 0/1), <bndbox><xmin/><ymin/><xmax/><ymax/></bndbox>
DIR/JPEGImages/<id>.jpg
```
VOC pixel coordinates are 1-based and inclusive: a box becomes `(xmin - 1, ymin - 1, xmax, ymax)`
in 0-based continuous pixels (COCO `bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`).
`difficult=1` objects become COCO crowd boxes (`iscrowd=1`): not trained on, ignored by the
evaluation, counted as "difficult" in the cleaning summary. Category id == index in `class_names`.

XML is parsed with `xml.etree.ElementTree` after refusing any document with a DTD (`<!DOCTYPE`) or
an entity declaration, so entity expansion cannot be used against the reader. Every problem (an
unreadable or malformed file, a missing field, a non-number, a name not in `class_names`, an id that
is not a plain file name) is one `DatasetError` naming the file (and the line or object number).
A missing or zero `<size>` is read from the image header.
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from .conversion import ConvertedSplit, ProblemLog, append_annotation
from .files import open_regular_file, read_text_lines
from .image_loading import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, read_image_size
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


def split_ids(data_dir: Path, split: str) -> list[str]:
    """Image ids of ImageSets/Main/<split>.txt (first word of each non-empty line)."""
    path = data_dir / "ImageSets" / "Main" / f"{split}.txt"
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
    """The root of an annotation XML; no DTD or entity declarations accepted."""
    try:
        with open_regular_file(path) as file:
            content = file.read(MAX_XML_BYTES + 1)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the annotation: {exc}") from exc
    if len(content) > MAX_XML_BYTES:
        raise DatasetError(f"{path}: annotation larger than {MAX_XML_BYTES >> 20} MiB")
    if b"<!DOCTYPE" in content or b"<!ENTITY" in content:
        raise DatasetError(f"{path}: DTD or entity declarations are not accepted in an annotation")
    try:
        return ET.fromstring(content)
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
    class_names: Sequence[str] = VOC_CLASSES,
    skip_bad_images: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> ConvertedSplit:
    """The images of ImageSets/Main/<split>.txt with their boxes as a COCO dict (module docstring)."""
    data_dir = Path(data_dir)
    class_names = [str(name) for name in class_names]
    if len(set(class_names)) != len(class_names) or not class_names:
        raise DatasetError(f"class_names must be distinct and not empty, got {class_names}")
    category_of = {name: index for index, name in enumerate(class_names)}
    problems = ProblemLog(f"{data_dir} ({split})")
    images, annotations = [], []
    for image_name in split_ids(data_dir, split):
        xml_path = data_dir / "Annotations" / f"{image_name}.xml"
        image_path = data_dir / "JPEGImages" / f"{image_name}.jpg"
        root = parse_xml(xml_path)
        size = _image_size(root, image_path, xml_path, max_image_pixels)
        if size is None:
            if not skip_bad_images:
                raise DatasetError(f"{xml_path}: no <size> and {image_path} is unreadable")
            problems.add("no <size> and an unreadable image, left out", str(xml_path))
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": f"{image_name}.jpg", "width": size[0], "height": size[1]})
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
    return ConvertedSplit(data_dir / "JPEGImages", data, f"{data_dir} ({split})", problems.counts())
