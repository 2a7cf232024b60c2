"""``python -m ddetr.bench data``: what the training data costs before and while it loads.

1. Start-up: seconds and MiB to build the training dataset (`CocoDetection`, `keep_coco=False`, which
   reads the file straight into columns: `data/column_reader.py`) from a generated annotation file the
   size of COCO train2017 (118,287 images, 860,001 boxes, no segmentations), beside the seconds of a
   bare `json.loads` of the same file (the floor of any reader that builds the parsed file's dicts with
   the standard library's parser) measured in the same run.
2. Forked workers: private memory (USS, from /proc/<pid>/smaps_rollup) of a process forked from the
   one holding the dataset, after a pass over every record and a `gc.collect()`; once as the
   DataLoader workers of the data modules start (`freeze_inherited_objects`), once without it.
3. The training pipeline on COCO-sized JPEGs (640 x 480, official augmentation, batch 2): images/s
   of the DataLoader with 1 and 2 workers, with float32 batches (normalised in the workers) and with
   uint8 batches (normalised later, on the device), interleaved and repeated.

4. Batch shapes (`--shape-images N`): the official training augmentation on N images with COCO-like
   sizes (long side 640, short side 300..640, 70% landscape), batch 2 in a shuffled order; the number
   of distinct padded batch shapes and the padding (share of batch pixels that are padding, and the
   extra pixels over exact padding) for `pad_to_multiple` 1, 32, 64 and 128.

Numbers printed, nothing asserted; on a shared machine compare the ratios measured in one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COCO_TRAIN_IMAGES = 118_287
COCO_TRAIN_BOXES = 860_001
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_coco_like_annotations(path: Path, num_images: int, num_boxes: int, seed: int = 0) -> None:
    """A COCO detection file with COCO's fields and value ranges (images up to 640 pixels, boxes
    with two decimals, 80 category ids with COCO's gaps), no segmentations."""
    rng = np.random.default_rng(seed)
    widths, heights = rng.integers(200, 641, num_images), rng.integers(200, 641, num_images)
    images = [
        {
            "license": 3,
            "file_name": f"{i + 1:012d}.jpg",
            "coco_url": f"http://images/train2017/{i + 1:012d}.jpg",
            "height": int(heights[i]),
            "width": int(widths[i]),
            "date_captured": "2013-11-14 16:28:13",
            "flickr_url": "http://farm/2970773875_164f0c0b83_z.jpg",
            "id": i + 1,
        }
        for i in range(num_images)
    ]
    owner = rng.integers(0, num_images, num_boxes)
    w_img, h_img = widths[owner].astype(float), heights[owner].astype(float)
    x = np.round(rng.uniform(0, 1, num_boxes) * (w_img - 2), 2)
    y = np.round(rng.uniform(0, 1, num_boxes) * (h_img - 2), 2)
    w = np.round(1 + rng.uniform(0, 1, num_boxes) * (w_img - x - 1), 2)
    h = np.round(1 + rng.uniform(0, 1, num_boxes) * (h_img - y - 1), 2)
    categories = np.array(COCO_CATEGORY_IDS)[rng.integers(0, 80, num_boxes)]
    annotations = [
        {
            "area": round(float(w[k] * h[k]), 4),
            "iscrowd": int(k % 100 == 0),
            "image_id": int(owner[k]) + 1,
            "bbox": [float(x[k]), float(y[k]), float(w[k]), float(h[k])],
            "category_id": int(categories[k]),
            "id": k + 1,
        }
        for k in range(num_boxes)
    ]
    data = {
        "info": {"description": "generated, COCO train2017 sized"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}", "supercategory": "x"} for c in COCO_CATEGORY_IDS],
    }
    path.write_text(json.dumps(data))


def _memory_mib(pid: int | str = "self") -> tuple[float, float]:
    """(RSS, USS) in MiB of a process, from /proc/<pid>/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0) + fields.get("Private_Hugetlb", 0)
    return fields.get("Rss", 0) / 1024, uss / 1024


def _forked_uss(dataset, freeze: bool) -> float:
    """USS (MiB) of a child forked now, after a pass over every record and gc.collect()."""
    from ddetr.data.datamodule import freeze_inherited_objects

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: behave like a DataLoader worker reading every record once
        os.close(read)
        if freeze:
            freeze_inherited_objects(0)
        records = dataset.records
        total = 0
        for index in range(len(records)):
            record = records[index]
            total += len(record.file_name) + len(record.boxes) + int(dataset.box_labels[records.box_slice(index)].sum())
        gc.collect()
        os.write(write, f"{_memory_mib()[1]:.3f} {total}".encode())
        os._exit(0)
    os.close(write)
    message = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    return float(message.split()[0])


def startup_and_workers(ann_file: Path) -> dict:
    import albumentations  # noqa: F401  (imported before measuring, as a training process has)
    import torch  # noqa: F401

    from ddetr.data import CocoDetection

    gc.collect()
    rss_before, _ = _memory_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    dataset = CocoDetection(ann_file.parent, ann_file, keep_coco=False)
    build_seconds, build_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    gc.collect()
    rss_after, _ = _memory_mib()
    result = {
        "images": len(dataset),
        "boxes": dataset.records.num_boxes,
        "build_s": build_seconds,
        "build_cpu_s": build_cpu,
        "rss_added_mib": rss_after - rss_before,
        "arrays_mib": dataset.records.nbytes / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_uss_mib": _forked_uss(dataset, freeze=True),
        "worker_uss_no_freeze_mib": _forked_uss(dataset, freeze=False),
    }
    del dataset
    gc.collect()
    text = ann_file.read_text(encoding="utf-8")
    from ddetr.data.validation import parse_json

    start, cpu_start = time.perf_counter(), time.process_time()
    data = parse_json(text, ann_file)
    result["json_loads_s"], result["json_loads_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu_start
    del data, text
    return result


def write_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` 640 x 480 JPEGs of smooth noise (about COCO's bytes per image) and their annotation file."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        coarse = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((640, 480), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))
        noisy = np.clip(np.asarray(picture, dtype=np.int16) + rng.integers(-12, 13, (480, 640, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{index}.jpg", quality=90)
        images.append({"id": index + 1, "file_name": f"{index}.jpg", "width": 640, "height": 480})
        for _ in range(7):
            x, y = rng.uniform(0, 500), rng.uniform(0, 350)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": 1,
                    "bbox": [x, y, rng.uniform(10, 140), rng.uniform(10, 130)],
                }
            )
    path = folder / "annotations.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})
    )
    return path


def loader_images_per_second(ann_file: Path, workers: int, uint8: bool, num_batches: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    from ddetr.data import CocoDetection, collate_detection, make_train_transforms
    from ddetr.data.datamodule import freeze_inherited_objects

    dataset = CocoDetection(ann_file.parent, ann_file, make_train_transforms(normalize=not uint8), keep_coco=False)
    indices = [(i % len(dataset), i) for i in range(2 * (num_batches + 2 * workers))]
    loader = DataLoader(
        dataset,
        batch_size=2,
        sampler=indices,
        num_workers=workers,
        collate_fn=collate_detection,
        worker_init_fn=freeze_inherited_objects if workers else None,
    )
    iterator = iter(loader)
    for _ in range(2 * workers):  # start-up and the first batches are not timed
        next(iterator)
    start = time.perf_counter()
    count = 0
    for images, _, _ in iterator:
        assert images.dtype == (torch.uint8 if uint8 else torch.float32)
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def coco_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of a COCO-like image: long side 640, short side 300..640, 70% landscape."""
    short, landscape = int(rng.integers(300, 641)), rng.uniform() < 0.7
    return (short, 640) if landscape else (640, short)


def batch_shapes(num_images: int, batch_size: int = 2, seed: int = 0) -> dict[int, dict[str, float]]:
    """Distinct padded shapes and padding cost per `pad_to_multiple` over one shuffled pass (see item 4)."""
    from ddetr.data import make_train_transforms

    rng = np.random.default_rng(seed)
    transform = make_train_transforms(normalize=False)
    sizes = []
    for index in range(num_images):
        height, width = coco_like_size(rng)
        image = np.zeros((height, width, 3), dtype=np.uint8)
        out, _, _ = transform(image, np.array([[0, 0, width / 2, height / 2]]), np.array([0]), seed=index)
        sizes.append(tuple(out.shape[-2:]))
    order = rng.permutation(num_images)
    result = {}
    for multiple in (1, 32, 64, 128):
        shapes, padded, content = set(), 0, 0
        for start in range(0, num_images, batch_size):
            batch = [sizes[i] for i in order[start : start + batch_size]]
            height = -(-max(h for h, _ in batch) // multiple) * multiple
            width = -(-max(w for _, w in batch) // multiple) * multiple
            shapes.add((len(batch), height, width))
            padded += len(batch) * height * width
            content += sum(h * w for h, w in batch)
        result[multiple] = {"distinct_shapes": len(shapes), "padding_share": 1 - content / padded, "pixels": padded}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr.bench data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--num-boxes", type=int, default=COCO_TRAIN_BOXES)
    parser.add_argument("--jpegs", type=int, default=24, help="COCO-sized JPEGs for the pipeline (0: skip it)")
    parser.add_argument("--batches", type=int, default=24, help="timed batches per pipeline measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shape-images", type=int, default=4000, help="images for the batch-shape count (0: skip it)")
    parser.add_argument("--skip-startup", action="store_true", help="skip items 1 and 2")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep the generated files here (default: a temp dir)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as temp:
        work = args.work_dir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        ann_file = work / f"coco_like_{args.num_images}_{args.num_boxes}.json"
        if not ann_file.exists() and not args.skip_startup:
            write_coco_like_annotations(ann_file, args.num_images, args.num_boxes)
        r = {} if args.skip_startup else startup_and_workers(ann_file)
        if r:
            print(
                f"annotations: {ann_file.stat().st_size / 2**20:.0f} MiB of JSON, {r['images']} images, {r['boxes']} boxes kept"
            )
            print(
                f"start-up: build {r['build_s']:.2f} s wall, {r['build_cpu_s']:.2f} s CPU (bare json.loads of the file: "
                f"{r['json_loads_s']:.2f} s wall, {r['json_loads_cpu_s']:.2f} s CPU; CPU ratio "
                f"{r['build_cpu_s'] / r['json_loads_cpu_s']:.2f}); memory added {r['rss_added_mib']:.0f} MiB RSS, "
                f"record arrays {r['arrays_mib']:.1f} MiB, peak RSS {r['peak_rss_mib']:.0f} MiB"
            )
            print(
                f"forked worker after a pass + gc.collect(): USS {r['worker_uss_mib']:.1f} MiB "
                f"({r['worker_uss_no_freeze_mib']:.1f} MiB without gc.freeze in the worker)"
            )
        if args.jpegs:
            jpeg_file = write_jpegs(work / "jpegs", args.jpegs)
            rates: dict[tuple[int, bool], list[float]] = {}
            for _ in range(args.repeats):
                for workers in (1, 2):
                    for uint8 in (False, True):
                        rate = loader_images_per_second(jpeg_file, workers, uint8, args.batches)
                        rates.setdefault((workers, uint8), []).append(rate)
            for (workers, uint8), values in sorted(rates.items()):
                best = max(values)
                print(
                    f"pipeline, {workers} worker(s), {'uint8  ' if uint8 else 'float32'} batches: "
                    f"{best:.1f} images/s ({best / workers:.1f} per worker; runs {', '.join(f'{v:.1f}' for v in values)})"
                )
            ratio = max(rates[(2, True)]) / max(rates[(2, False)])
            print(f"uint8 / float32 images/s with 2 workers: {ratio:.2f}")
        if args.shape_images:
            shapes = batch_shapes(args.shape_images)
            exact = shapes[1]["pixels"]
            for multiple, info in shapes.items():
                print(
                    f"batch shapes, pad_to_multiple={multiple:>3}: {info['distinct_shapes']:>5} distinct over "
                    f"{args.shape_images} images (batch 2), padding {100 * info['padding_share']:.1f}% of batch pixels, "
                    f"{100 * (info['pixels'] / exact - 1):+.1f}% pixels vs exact padding"
                )
    sys.stdout.flush()
    return 0
