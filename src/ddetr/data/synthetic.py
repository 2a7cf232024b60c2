"""A built-in synthetic COCO-format detection dataset: coloured shapes on cluttered backgrounds.

`ensure_synthetic_dataset(root)` generates the dataset once and reuses it afterwards:

```
root/
  manifest.json                      generation parameters; written last (marks completion)
  train/000001.jpg ...               JPEG images (image_size x image_size)
  val/000001.jpg ...
  annotations/instances_train.json   COCO detection format, categories with names
  annotations/instances_val.json
```

What an image holds:
- A background: a desaturated gradient, low-frequency noise, thin lines and soft blobs in
  grey/low-saturation colours, plus pixel noise. Objects use saturated colours, so clutter is
  distracting but not confusable with an object.
- 1 to `max_objects` shapes from `SHAPES` (circle, square, triangle, star, cross, ring), each
  `min_object_frac`..`max_object_frac` of the image side, of a uniformly drawn kind (with
  `rare_class_frac`: `RARE_SHAPE` drawn with that probability, the others sharing the rest, an
  imbalanced set for rare-class sampling), randomly rotated, filled with a solid
  colour, stripes, a gradient, a checkerboard or noisy colour.
- Overlaps are allowed, with one invariant: every annotated object keeps at least
  `min_visible_frac` of its pixels visible. A new shape that would hide more than that of an
  earlier one is re-placed (a few tries) or left out entirely, so no drawn shape goes unannotated.
- Each annotation's `bbox` is the tight box of the object's *visible* pixels (as in COCO) and
  `area` is its visible pixel count; shapes lie fully inside the image.

Generation is deterministic: image `i` of split `s` draws from `numpy.random.default_rng((seed,
s, i))`, with a different stream for train and val. The directory is written into a temporary
sibling and renamed into place at the end, so an interrupted run is never taken for a complete
one.

Only ddetr's own folders are ever replaced: `root` must be missing, empty, or hold a
`manifest.json` written by this generator. Any other folder (or a file) at `root` is left alone
and `ensure_synthetic_dataset` raises a `DatasetError` saying so.
"""

from __future__ import annotations

import colorsys
import functools
import json
import math
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage
from tqdm import tqdm

from .conversion import append_annotation
from .validation import DatasetError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_SPLIT_CODES = {"train": 1, "val": 2}
_PLACEMENT_TRIES = 8
RARE_SHAPE = "star"  # the class `rare_class_frac` makes rare


def ensure_synthetic_dataset(
    root: str | os.PathLike,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 96,
    seed: int = 0,
    max_objects: int = 10,
    min_object_frac: float = 0.04,
    max_object_frac: float = 0.5,
    min_visible_frac: float = 0.6,
    progress: bool = True,
    num_workers: int | None = None,
    rare_class_frac: float | None = None,
) -> Path:
    """Generate the synthetic dataset under `root` unless a complete one with these parameters exists.

    Args:
        root: dataset directory (created; replaced when it holds a dataset with other parameters).
        num_train, num_val: number of images per split.
        image_size: side of the square images in pixels (96: the default run's size, conf/data/synthetic.yaml).
        seed: base seed; the val split uses its own stream, disjoint from train.
        max_objects: objects per image are drawn uniformly from 1..max_objects (fewer when a
            placement fails, never 0).
        min_object_frac, max_object_frac: object extent as a fraction of the image side.
        min_visible_frac: smallest visible fraction of an annotated object.
        progress: show a tqdm progress bar.
        num_workers: processes drawing images (default: CPU count, at most 8; 0 draws in this
            process). The result does not depend on it.
        rare_class_frac: None (default): every shape kind equally likely. A fraction in (0, 1): each
            object is a `RARE_SHAPE` with this probability (so about this fraction of the boxes), another
            kind otherwise.

    Returns:
        `root` as a Path.
    """
    root = Path(root)
    params = {
        "format_version": FORMAT_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "seed": int(seed),
        "max_objects": int(max_objects),
        "min_object_frac": float(min_object_frac),
        "max_object_frac": float(max_object_frac),
        "min_visible_frac": float(min_visible_frac),
        "shapes": list(SHAPES),
    }
    if rare_class_frac is not None:  # only then a key: datasets generated without it keep their manifest
        params["rare_class_frac"] = float(rare_class_frac)
    _check_params(params)
    if _read_manifest(root) == params:
        return root
    _check_replaceable(root)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if num_workers is None:
            num_workers = min(os.cpu_count() or 1, 8)
        _generate(tmp, params, progress, num_workers)
        _move_into_place(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_params(params: dict) -> None:
    if params["num_train"] < 1 or params["num_val"] < 1:
        raise ValueError("num_train and num_val must be at least 1")
    if params["image_size"] < 32:
        raise ValueError(f"image_size must be at least 32, got {params['image_size']}")
    if params["max_objects"] < 1:
        raise ValueError(f"max_objects must be at least 1, got {params['max_objects']}")
    if not 0 < params["min_object_frac"] <= params["max_object_frac"] <= 1:
        raise ValueError("need 0 < min_object_frac <= max_object_frac <= 1")
    if not 0 < params["min_visible_frac"] <= 1:
        raise ValueError("min_visible_frac must be in (0, 1]")
    if not 0 < params.get("rare_class_frac", 0.5) < 1:
        raise ValueError(f"rare_class_frac must be in (0, 1), got {params['rare_class_frac']}")


def _read_manifest(root: Path) -> dict | None:
    try:
        with open(root / MANIFEST) as f:
            return json.load(f).get("params")
    except (OSError, ValueError, AttributeError):
        return None


def _check_replaceable(root: Path) -> None:
    """Raise unless `root` is missing, an empty folder, or a folder of this generator (with its manifest)."""
    if not os.path.lexists(root):
        return
    if not root.is_dir() or root.is_symlink():
        raise DatasetError(
            f"{root}: exists and is not a folder of the synthetic dataset; refusing to replace it "
            "(choose another data.root)"
        )
    if not any(root.iterdir()):
        return
    params = _read_manifest(root)
    if not (isinstance(params, dict) and "format_version" in params):
        raise DatasetError(
            f"{root}: a non-empty folder without a synthetic-dataset {MANIFEST}; refusing to replace "
            "or delete it (choose another data.root)"
        )


def _move_into_place(tmp: Path, root: Path, params: dict) -> None:
    """Rename the finished `tmp` to `root`, replacing an outdated dataset there (ours only)."""
    old = None
    if os.path.lexists(root):
        _check_replaceable(root)  # again: it may have changed while generating
        old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # another process finished first; keep its result when it matches
        if _read_manifest(root) != params:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _generate(out: Path, params: dict, progress: bool, num_workers: int) -> None:
    (out / "annotations").mkdir(parents=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
    counts = {"train": params["num_train"], "val": params["num_val"]}
    tasks = [(out, split, index, params) for split, num in counts.items() for index in range(num)]
    for split in counts:
        (out / split).mkdir()
    bar = tqdm(total=len(tasks), desc="synthetic dataset", disable=not progress, unit="img")
    records: dict[str, list] = {split: [] for split in counts}
    for split, objects in _run_tasks(tasks, num_workers):
        records[split].append(objects)
        bar.update(1)
    bar.close()

    stats = {}
    for split, per_image in records.items():
        images, annotations = [], []
        for index, objects in enumerate(per_image):
            image_id = index + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": _file_name(index),
                    "width": params["image_size"],
                    "height": params["image_size"],
                }
            )
            for category_index, bbox, area in objects:
                append_annotation(annotations, image_id, category_index + 1, bbox, area=area)
        coco = {
            "info": {
                "description": f"ddetr synthetic shapes ({split})",
                "version": str(FORMAT_VERSION),
            },
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco, f)
        stats[split] = {"images": len(images), "annotations": len(annotations)}
    with open(out / MANIFEST, "w") as f:  # written last: its presence marks a complete dataset
        json.dump({"params": params, "stats": stats}, f, indent=2)


def _file_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


def _run_tasks(tasks: list, num_workers: int):
    """Yield (split, objects) per task in order, in worker processes when `num_workers` > 0 and fork exists."""
    if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods() and len(tasks) > 64:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            yield from pool.imap(_render_and_save, tasks, chunksize=32)
    else:
        yield from map(_render_and_save, tasks)


def _render_and_save(task: tuple) -> tuple[str, list]:
    out, split, index, params = task
    rng = np.random.default_rng((params["seed"], _SPLIT_CODES[split], index))
    pixels, objects = render_image(rng, params)
    Image.fromarray(pixels).save(out / split / _file_name(index), quality=92)
    return split, objects


# ----------------------------------------------------------------------------------------------
# rendering


def render_image(rng: np.random.Generator, params: dict) -> tuple[np.ndarray, list[tuple[int, list[int], int]]]:
    """Draw one image.

    Returns:
        pixels (size, size, 3) uint8 and a list of (category_index, [x, y, w, h], visible_area).
    """
    size = params["image_size"]
    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the object on top of each pixel
    full_areas: list[int] = []
    kinds: list[int] = []
    target = int(rng.integers(1, params["max_objects"] + 1))
    for _ in range(target):
        for _try in range(_PLACEMENT_TRIES):
            kind = _draw_kind(rng, params.get("rare_class_frac"))
            mask = _shape_mask(
                rng,
                SHAPES[kind],
                size,
                params["min_object_frac"],
                params["max_object_frac"],
            )
            if _keeps_others_visible(owner, mask, full_areas, params["min_visible_frac"]):
                break
        else:
            continue
        index = len(kinds)
        owner[mask] = index
        kinds.append(kind)
        full_areas.append(int(mask.sum()))
        _paint(rng, image, mask)
    if not kinds:  # cannot happen on an empty canvas, kept as a guard for the 1..max contract
        raise RuntimeError("synthetic generator placed no object")

    noise_std = rng.uniform(2.0, 8.0)
    image += rng.standard_normal(image.shape, dtype=np.float32) * noise_std
    pixels = np.clip(image, 0, 255).astype(np.uint8)

    slices = ndimage.find_objects(owner + 1, max_label=len(kinds))  # tight box of each object's visible pixels
    areas = np.bincount(owner[owner >= 0], minlength=len(kinds))  # (num_objects,)
    objects = []
    for kind, (rows, cols), area in zip(kinds, slices, areas):
        box = [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start]
        objects.append((kind, [int(v) for v in box], int(area)))
    return pixels, objects


def _draw_kind(rng: np.random.Generator, rare_class_frac: float | None) -> int:
    """Index into `SHAPES`: uniform, or `RARE_SHAPE` with probability `rare_class_frac` and the others uniform."""
    if rare_class_frac is None:
        return int(rng.integers(len(SHAPES)))
    rare = SHAPES.index(RARE_SHAPE)
    if rng.uniform() < rare_class_frac:
        return rare
    others = [index for index in range(len(SHAPES)) if index != rare]
    return others[int(rng.integers(len(others)))]


def _keeps_others_visible(owner: np.ndarray, mask: np.ndarray, full_areas: list[int], min_visible: float) -> bool:
    """Whether every earlier object keeps `min_visible` of its pixels once `mask` is drawn on top."""
    if not full_areas:
        return True
    covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(full_areas))  # (num_objects,)
    visible = np.bincount(owner[owner >= 0], minlength=len(full_areas)) - covered
    return bool(np.all(visible >= min_visible * np.asarray(full_areas)))


def _random_color(rng: np.random.Generator, saturated: bool) -> np.ndarray:
    hue = rng.uniform()
    if saturated:
        sat, val = rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0)
    else:
        sat, val = rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.85)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Desaturated gradient + low-frequency noise + thin lines and soft blobs, float (size, size, 3)."""
    yy, xx = _unit_grid(size)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.float32(math.cos(angle)) * xx + np.float32(math.sin(angle)) * yy)[..., None]  # (size, size, 1)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    low, high = (
        _random_color(rng, False).astype(np.float32),
        _random_color(rng, False).astype(np.float32),
    )
    image = low + t * (high - low)  # (size, size, 3)

    cells = int(rng.integers(3, 8))
    coarse = rng.normal(0.0, 18.0, size=(cells, cells)).astype(np.float32)
    noise = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)  # smooth (size, size) luminance noise
    image += np.asarray(noise, dtype=np.float32)[..., None]

    clutter = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(2, 9))):
        x0, y0, x1, y1 = rng.uniform(-0.1, 1.1, size=4) * size
        color = tuple(int(c) for c in _random_color(rng, False))
        draw.line([(x0, y0), (x1, y1)], fill=color, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 6))):
        cx, cy = rng.uniform(0, 1, size=2) * size
        rx, ry = rng.uniform(0.02, 0.12, size=2) * size
        color = tuple(int(c) for c in _random_color(rng, False))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=color)
    clutter = clutter.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.0))))
    return np.asarray(clutter, dtype=np.float32).copy()


@functools.lru_cache(maxsize=4)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates divided by `size`, float32 (size, size) each (read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _rotated(points: np.ndarray, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """Rotate unit-scale `points` (N, 2) by `angle` and move them to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    moved = points @ rot.T + np.array([cx, cy])  # (N, 2)
    return [(float(x), float(y)) for x, y in moved]


def _regular_polygon(num: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(num) / num
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (num, 2)


def _shape_mask(rng: np.random.Generator, shape: str, size: int, min_frac: float, max_frac: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape of extent ~`frac * size`, fully inside the image."""
    extent = max(rng.uniform(min_frac, max_frac) * size, 3.0)
    half = extent / 2
    cx, cy = rng.uniform(half, size - half, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=1)
    elif shape == "ring":
        inner = half * rng.uniform(0.45, 0.6)
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=1)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "square":
        draw.polygon(_rotated(_regular_polygon(4, half, math.pi / 4), angle, cx, cy), fill=1)
    elif shape == "triangle":
        draw.polygon(_rotated(_regular_polygon(3, half), angle, cx, cy), fill=1)
    elif shape == "star":
        outer = _regular_polygon(5, half)
        inner = _regular_polygon(5, half * 0.42, math.pi / 5)
        points = np.stack([outer, inner], axis=1).reshape(10, 2)  # alternate outer/inner vertices
        draw.polygon(_rotated(points, angle, cx, cy), fill=1)
    elif shape == "cross":
        a = 1 / 6  # half the bar width, as a fraction of the extent
        unit = np.array(
            [
                [-a, -0.5],
                [a, -0.5],
                [a, -a],
                [0.5, -a],
                [0.5, a],
                [a, a],
                [a, 0.5],
                [-a, 0.5],
                [-a, a],
                [-0.5, a],
                [-0.5, -a],
                [-a, -a],
            ]
        )
        scale = half / math.hypot(0.5, a)  # the arm corners lie on the circle of radius `half`
        draw.polygon(_rotated(unit * scale, angle, cx, cy), fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask = np.asarray(canvas, dtype=bool)
    if not mask.any():  # a sub-pixel shape: mark its centre pixel
        mask = mask.copy()
        mask[min(int(cy), size - 1), min(int(cx), size - 1)] = True
    return mask


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Fill `mask` in `image` (float, in place) with a random saturated texture."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)  # (h, w) each
    first, second = _random_color(rng, True), _random_color(rng, True)
    texture = rng.integers(5)
    if texture == 0:  # solid
        fill = np.broadcast_to(first, yy.shape + (3,))
    elif texture in (1, 2):  # stripes (1) or linear gradient (2)
        angle = rng.uniform(0, math.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        if texture == 1:
            period = rng.uniform(3.0, 8.0)
            weight = ((t / period) % 1.0 < 0.5).astype(np.float32)[..., None]
        else:
            weight = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
        fill = (1 - weight) * first + weight * second
    elif texture == 3:  # checkerboard
        cell = rng.uniform(2.5, 6.0)
        weight = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2)[..., None]
        fill = (1 - weight) * first + weight * second
    else:  # noisy colour
        fill = first + rng.normal(0.0, 25.0, size=yy.shape + (3,))
    region = mask[y0:y1, x0:x1]
    image[y0:y1, x0:x1][region] = fill[region]
