"""One small in-memory detection dataset written out in every layout `data=folder` reads (COCO JSON plain and
Roboflow's, YOLO as Roboflow and CVAT export it, Pascal VOC year folder and Roboflow's XML beside the images), so
that tests compare the layouts on identical data.

`TINY` has three splits (train, val, test) of a few small images with boxes in whole pixels; the pixels
are drawn once per image (seeded) and every layout gets the same bytes. Class names are sorted, so the
VOC readers' collected names come out in the same head order as the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["bird", "cat", "dog"]


@dataclass(frozen=True)
class TinyImage:
    stem: str
    width: int
    height: int
    boxes: tuple[tuple[int, int, int, int, int], ...]  # (class index, x, y, w, h) in whole pixels, 0-based


def _make_split(seed: int, count: int) -> list[TinyImage]:
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        width, height = int(rng.integers(40, 72)), int(rng.integers(40, 72))
        boxes = []
        for _ in range(0 if index == 1 else int(rng.integers(1, 4))):  # image 1 of each split: a negative
            w, h = int(rng.integers(8, width // 2)), int(rng.integers(8, height // 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            boxes.append((int(rng.integers(len(CLASSES))), x, y, w, h))
        images.append(TinyImage(f"s{seed}_img{index:02d}", width, height, tuple(boxes)))
    return images


TINY: dict[str, list[TinyImage]] = {"train": _make_split(1, 6), "val": _make_split(2, 3), "test": _make_split(3, 3)}


def pixels(image: TinyImage) -> Image.Image:
    """The image's pixels: noise with each box filled in its class's colour (something to learn)."""
    rng = np.random.default_rng(int.from_bytes(image.stem.encode(), "little"))
    array = rng.integers(0, 120, (image.height, image.width, 3), dtype=np.uint8)
    colours = [(250, 40, 40), (40, 250, 40), (40, 40, 250)]
    for label, x, y, w, h in image.boxes:
        array[y : y + h, x : x + w] = colours[label]
    return Image.fromarray(array)


def _save_images(folder: Path, images: list[TinyImage]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        pixels(image).save(folder / f"{image.stem}.png")


def coco_dict(images: list[TinyImage], placeholder: str | None = None) -> dict:
    """The split as COCO JSON: category ids 1..K (with `placeholder`, Roboflow's id-0 dataset name with no
    boxes, the real classes' supercategory)."""
    entries, annotations = [], []
    for image_id, image in enumerate(images, start=1):
        entries.append({"id": image_id, "file_name": f"{image.stem}.png", "width": image.width, "height": image.height})
        for label, x, y, w, h in image.boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    parent = placeholder or "none"
    categories = [{"id": i + 1, "name": name, "supercategory": parent} for i, name in enumerate(CLASSES)]
    if placeholder:
        categories.insert(0, {"id": 0, "name": placeholder, "supercategory": "none"})
    return {"images": entries, "annotations": annotations, "categories": categories}


def write_coco(root: Path, splits: dict[str, list[TinyImage]] = TINY) -> Path:
    """root/annotations/instances_<split>.json with the images in root/<split>/."""
    (root / "annotations").mkdir(parents=True)
    for split, images in splits.items():
        _save_images(root / split, images)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco_dict(images)))
    return root


def write_coco_roboflow(root: Path, splits: dict[str, list[TinyImage]] = TINY, placeholder: str = "peixos") -> Path:
    """Roboflow's COCO export: root/{train,valid,test}/ with the images and _annotations.coco.json."""
    for split, images in splits.items():
        folder = root / ("valid" if split == "val" else split)
        _save_images(folder, images)
        (folder / "_annotations.coco.json").write_text(json.dumps(coco_dict(images, placeholder)))
    return root


def _yolo_lines(image: TinyImage) -> str:
    return "".join(
        f"{label} {(x + w / 2) / image.width!r} {(y + h / 2) / image.height!r} {w / image.width!r} "
        f"{h / image.height!r}\n"
        for label, x, y, w, h in image.boxes
    )


def write_yolo_roboflow(root: Path, splits: dict[str, list[TinyImage]] = TINY) -> Path:
    """Roboflow's YOLO export: root/data.yaml with `../` paths, root/{train,valid,test}/{images,labels}/."""
    for split, images in splits.items():
        folder = root / ("valid" if split == "val" else split)
        _save_images(folder / "images", images)
        (folder / "labels").mkdir()
        for image in images:
            if image.boxes:  # a negative has no label file
                (folder / "labels" / f"{image.stem}.txt").write_text(_yolo_lines(image))
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n"
        f"nc: {len(CLASSES)}\nnames: [{', '.join(repr(n) for n in CLASSES)}]\n"
        "roboflow:\n  workspace: w\n  project: p\n  version: 1\n"
    )
    return root


def write_yolo_cvat(root: Path, splits: dict[str, list[TinyImage]] = TINY) -> Path:
    """CVAT's "YOLO 1.1" export: obj.data and lists with darknet's `data/` paths, obj.names, obj_<subset>_data/
    with each label file beside its image (CVAT writes the subsets train and valid; a test list is added here so
    that every layout has the same three splits)."""
    keys = {"train": "train", "val": "valid", "test": "test"}
    lines = [f"classes = {len(CLASSES)}", "names = data/obj.names", "backup = backup/"]
    (root).mkdir(parents=True)
    (root / "obj.names").write_text("".join(f"{name}\n" for name in CLASSES))
    for split, images in splits.items():
        folder = root / f"obj_{keys[split]}_data"
        _save_images(folder, images)
        for image in images:
            (folder / f"{image.stem}.txt").write_text(_yolo_lines(image))  # a negative: an empty file
        (root / f"{keys[split]}.txt").write_text("".join(f"data/{folder.name}/{i.stem}.png\n" for i in images))
        lines.append(f"{keys[split]} = data/{keys[split]}.txt")
    (root / "obj.data").write_text("\n".join(lines) + "\n")
    return root


def _voc_xml(image: TinyImage) -> str:
    objects = "".join(
        f"<object><name>{CLASSES[label]}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin>"
        f"<ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
        for label, x, y, w, h in image.boxes
    )
    return (
        f"<annotation><filename>{image.stem}.png</filename><size><width>{image.width}</width>"
        f"<height>{image.height}</height><depth>3</depth></size>{objects}</annotation>"
    )


def write_voc_roboflow(root: Path, splits: dict[str, list[TinyImage]] = TINY) -> Path:
    """Roboflow's Pascal VOC export: root/{train,valid,test}/ with each image's XML beside it."""
    for split, images in splits.items():
        folder = root / ("valid" if split == "val" else split)
        _save_images(folder, images)
        for image in images:
            (folder / f"{image.stem}.xml").write_text(_voc_xml(image))
    return root


def write_voc_year(root: Path, splits: dict[str, list[TinyImage]] = TINY) -> Path:
    """A VOC year folder: Annotations/, JPEGImages/ (PNG bytes under .jpg names, as the reader expects .jpg;
    the image loader goes by content), ImageSets/Main/<split>.txt."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    for split, images in splits.items():
        for image in images:
            pixels(image).save(root / "JPEGImages" / f"{image.stem}.jpg", format="PNG")
            (root / "Annotations" / f"{image.stem}.xml").write_text(_voc_xml(image))
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i.stem}\n" for i in images))
    return root


WRITERS = {
    "coco": write_coco,
    "coco_roboflow": write_coco_roboflow,
    "yolo_roboflow": write_yolo_roboflow,
    "yolo_cvat": write_yolo_cvat,
    "voc_roboflow": write_voc_roboflow,
    "voc_year": write_voc_year,
}
