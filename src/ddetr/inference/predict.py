"""The library side of ``python -m ddetr.predict`` (see ``ddetr/predict.py`` for what it writes)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ddetr.checkpoints import load_module, trust_checkpoint
from ddetr.data.image_loading import ImageLoadError, load_rgb_image
from ddetr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFICIAL_MAX_SIZE,
    OFFICIAL_VAL_SIZE,
    make_val_transforms,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the GPU when one is present, else the CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def list_images(input_path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The root folder and the sorted image files of ``input_path`` (one file, or a folder searched
    recursively for ``IMAGE_SUFFIXES``)."""
    path = Path(input_path)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input: no image or folder at {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"input: no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    return path, files


def run_config_of(ckpt_path: str | os.PathLike) -> Path | None:
    """The Hydra config of the ddetr run a checkpoint belongs to: ``<run>/.hydra/config.yaml`` for a
    checkpoint in a run's ``checkpoints/`` folder (``<run>/checkpoints/x.ckpt``); None for a checkpoint
    anywhere else (a converted or downloaded file: a config two folders up is not its run's)."""
    path = Path(ckpt_path).resolve()
    if path.parent.name != "checkpoints":
        return None
    config = path.parent.parent / ".hydra" / "config.yaml"
    return config if config.is_file() else None


def run_val_resize(config: Path) -> dict[str, int]:
    """``size`` and ``max_size`` of ``data.val_transforms`` in a run's config (those present), read with
    ``yaml.safe_load``: plain values only, no tags that build objects, no interpolations resolved.

    Raises ``ValueError`` naming the file for one that is not YAML or whose values are not whole numbers."""
    try:
        values = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"predict: cannot read the training run's config {config} ({reason}); "
            "pass size= and max_size= to do without it"
        ) from None
    data = values.get("data") if isinstance(values, dict) else None
    transforms = data.get("val_transforms") if isinstance(data, dict) else None
    found = {}
    for name in ("size", "max_size"):
        value = transforms.get(name) if isinstance(transforms, dict) else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"predict: {config}: data.val_transforms.{name} is {value!r}, not a whole number; "
                "pass size= and max_size= to do without it"
            )
        found[name] = value
    return found


def resolve_resize(size: int | None, max_size: int | None, ckpt_path: str | os.PathLike) -> tuple[int, int, str]:
    """The evaluation resize (shortest side, longest-side cap) and where it came from.

    Explicit values win; missing ones come from the training run's config when the checkpoint lies in
    a ddetr run's ``checkpoints/`` folder (``run_config_of``, key ``data.val_transforms``), else the
    official 800 / 1333.
    """
    run_config = run_config_of(ckpt_path) if size is None or max_size is None else None
    if run_config is not None:
        trained = run_val_resize(run_config)
        if "size" in trained:
            return (
                int(size if size is not None else trained["size"]),
                int(max_size if max_size is not None else trained.get("max_size", OFFICIAL_MAX_SIZE)),
                str(run_config),
            )
    source = "config" if size is not None and max_size is not None else "official defaults"
    return (
        int(size if size is not None else OFFICIAL_VAL_SIZE),
        int(max_size if max_size is not None else OFFICIAL_MAX_SIZE),
        source,
    )


def resolve_class_names(module, option: str | Sequence[str] | None = "auto") -> list[str]:
    """Class names per head index.

    ``"auto"``: the module's ``category_names``, except that a 91-class model without names (e.g. a
    converted official COCO checkpoint) gets COCO's 91-slot names. ``"coco"``: COCO's names. A list:
    those names (one per head index).
    """
    from ddetr.data.category_mapping import COCO91_NAMES

    num_classes = int(module.hparams.num_classes)
    if option is None or option == "auto":
        names = list(module.category_names)
        unnamed = names == [str(c) for c in module.label_to_category_id]
        return list(COCO91_NAMES) if unnamed and num_classes == len(COCO91_NAMES) else names
    if option == "coco":
        return list(COCO91_NAMES)
    if isinstance(option, str):
        raise ValueError(f"class_names must be 'auto', 'coco' or a list of names, got {option!r}")
    names = [str(name) for name in option]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names, the model has {num_classes} classes")
    return names


def image_ids(root: Path, files: Sequence[Path], annotations: str | os.PathLike | None) -> list[int]:
    """Image ids: 1..N, or the ids of the COCO ``annotations`` file whose ``file_name`` (relative to
    the input folder, or the bare name) matches every file."""
    if annotations is None:
        return list(range(1, len(files) + 1))
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"annotations: no COCO file at {path}")
    entries = json.loads(path.read_text()).get("images", [])
    by_name = {str(entry["file_name"]): int(entry["id"]) for entry in entries}
    ids, unknown = [], []
    for file in files:
        relative = file.relative_to(root).as_posix()
        image_id = by_name.get(relative, by_name.get(file.name))
        ids.append(-1 if image_id is None else image_id)
        if image_id is None:
            unknown.append(relative)
    if unknown:
        raise ValueError(f"{path}: no image entry for {len(unknown)} input file(s), e.g. {unknown[:5]}")
    return ids


class ImageFiles(Dataset):
    """The input images, read and resized for the network.

    Each item is a dict with ``index``, ``image`` (3, height, width) normalised float32 (None when
    the file cannot be read), ``pixels`` (orig_height, orig_width, 3) uint8 and ``error`` (the reason
    the file could not be read, else None).
    """

    def __init__(
        self,
        files: Sequence[Path],
        size: int,
        max_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.files = list(files)
        self.transform = make_val_transforms(size=size, max_size=max_size, mean=mean, std=std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            pixels = load_rgb_image(self.files[index])
        except ImageLoadError as error:
            return {"index": index, "image": None, "pixels": None, "error": error.reason}
        image, _, _ = self.transform(pixels, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), seed=0)
        return {"index": index, "image": image, "pixels": pixels, "error": None}


def output_name(root: Path, file: Path, taken: set[str]) -> str:
    """A unique output stem for ``file``: its path below ``root`` without suffix (the suffix kept when
    another input has the same stem)."""
    relative = file.relative_to(root)
    name = relative.with_suffix("").as_posix()
    if name in taken:
        name = relative.as_posix()
    taken.add(name)
    return name


def coco_results(
    image_id: int, detection: dict[str, torch.Tensor], label_to_category_id: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO results entries for one image's detections (absolute xyxy boxes -> xywh)."""
    results = []
    for box, score, label in zip(
        detection["boxes"].tolist(), detection["scores"].tolist(), detection["labels"].tolist()
    ):
        x0, y0, x1, y1 = box
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(label_to_category_id[label]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            }
        )
    return results


def readable_items(
    batch: list[dict[str, Any]], files: Sequence[Path], skipped: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """The items of ``batch`` whose image could be read; each other one is appended to ``skipped`` as
    (file, reason) and named in a warning."""
    for item in batch:
        if item["error"] is not None:
            skipped.append((str(files[item["index"]]), item["error"]))
            log.warning("skipping %s: %s", files[item["index"]], item["error"])
    return [item for item in batch if item["error"] is None]


def save_attention_pictures(
    folder: Path,
    recorder,
    outputs: dict[str, Any],
    model,
    batch: list[dict[str, Any]],
    cfg: DictConfig,
    class_names: Sequence[str],
) -> None:
    """The sampling-location pictures of a batch's top detections (``recorder`` held the decoder's
    attention during the forward that gave ``outputs``): ``<folder>/<name>_<rank>.png``."""
    from ddetr.pictures.attention import level_strides, pictures_from_attention

    pictures = pictures_from_attention(
        recorder.attention,
        {key: outputs[key].cpu() for key in ("pred_logits", "pred_boxes")},
        level_strides(model),
        [item["image"] for item in batch],
        [item["pixels"] for item in batch],
        top_k=cfg.attention_top_k,
        threshold=cfg.threshold,
        class_names=class_names,
    )
    for item, image_pictures in zip(batch, pictures):
        for rank, (_, picture) in enumerate(image_pictures):
            path = folder / f"{item['name']}_{rank}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)


@dataclass
class Predictor:
    """What prediction needs of a model, from a checkpoint or an exported file.

    ``detect(images, orig_sizes)`` takes normalised (3, height_i, width_i) images and (batch_size, 2)
    original sizes (h, w) and returns ``(outputs, detections)``: the model's ``pred_logits`` /
    ``pred_boxes`` and one dict per image (``scores``, ``labels``, ``boxes`` xyxy in pixels of the file).
    """

    detect: Callable[[list[torch.Tensor], torch.Tensor], tuple[dict[str, Any], list[dict[str, torch.Tensor]]]]
    size: int
    max_size: int
    resize_source: str
    mean: Sequence[float]
    std: Sequence[float]
    class_names: list[str]
    label_to_category_id: list[int]
    module: Any = None  # the DeformableDETRModule (PyTorch only: attention pictures)


def checkpoint_predictor(cfg: DictConfig, device: torch.device) -> Predictor:
    """The PyTorch model of ``cfg.ckpt_path`` on ``device``."""
    from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    module = load_module(cfg.ckpt_path, device, trust=trust_checkpoint(cfg))
    size, max_size, resize_source = resolve_resize(cfg.get("size"), cfg.get("max_size"), cfg.ckpt_path)

    def detect(images: list[torch.Tensor], orig_sizes: torch.Tensor):
        outputs = module.model([image.to(device) for image in images])
        return outputs, module.postprocess(outputs, orig_sizes.to(device))

    return Predictor(
        detect,
        size,
        max_size,
        resize_source,
        IMAGENET_MEAN,
        IMAGENET_STD,
        resolve_class_names(module, cfg.get("class_names", "auto")),
        list(module.label_to_category_id),
        module,
    )


def exported_predictor(cfg: DictConfig) -> Predictor:
    """The exported model of ``cfg.model_file`` (``ddetr.inference.runtime``), with the resize,
    normalisation and class names it carries (``size``/``max_size``/``class_names`` override them)."""
    from ddetr.image_list import pad_images
    from ddetr.inference.runtime import ExportedModel
    from ddetr.models.postprocess import PostProcess

    model = ExportedModel(cfg.model_file, threads=cfg.get("threads"))
    metadata = model.metadata
    postprocess = PostProcess(num_select=metadata.num_select)
    names = cfg.get("class_names", "auto")
    if names not in (None, "auto"):
        if isinstance(names, str) or len(names) != len(metadata.class_names):
            raise ValueError(f"class_names must be 'auto' or {len(metadata.class_names)} names for {cfg.model_file}")
        names = [str(name) for name in names]
    else:
        names = list(metadata.class_names)

    def detect(images: list[torch.Tensor], orig_sizes: torch.Tensor):
        outputs = model(pad_images([image.cpu() for image in images]))
        return outputs, postprocess(outputs, orig_sizes.cpu())

    given = cfg.get("size") is not None or cfg.get("max_size") is not None
    return Predictor(
        detect,
        int(cfg.size if cfg.get("size") is not None else metadata.size),
        int(cfg.max_size if cfg.get("max_size") is not None else metadata.max_size),
        "config" if given else f"{cfg.model_file}",
        metadata.mean,
        metadata.std,
        names,
        list(metadata.label_to_category_id),
    )


def load_predictor(cfg: DictConfig, device: torch.device) -> Predictor:
    """A checkpoint (``ckpt_path``) or an exported file (``model_file``): exactly one of the two."""
    from ddetr.inference.runtime import ExportedModelError

    model_file, ckpt_path = cfg.get("model_file"), cfg.get("ckpt_path")
    if model_file is not None and ckpt_path is not None:
        raise ExportedModelError(
            f"give either ckpt_path ({ckpt_path}) or model_file ({model_file}), not both: "
            "an exported file carries its own settings"
        )
    if model_file is None and ckpt_path is None:
        raise ExportedModelError("give ckpt_path=CHECKPOINT or model_file=MODEL.onnx|MODEL.xml")
    if model_file is None:
        return checkpoint_predictor(cfg, device)
    if cfg.attention:
        raise ExportedModelError(f"attention=true needs the PyTorch model (ckpt_path), not the exported {model_file}")
    return exported_predictor(cfg)


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Runs prediction as ``cfg`` says (see the module docstring); returns a summary dict with
    ``num_images``, ``num_detections``, ``skipped`` (list of (file, reason)) and the written paths."""
    from ddetr.pictures.attention import DecoderAttentionRecorder

    device = resolve_device(cfg.device)
    predictor = load_predictor(cfg, device)
    root, files = list_images(cfg.input)
    ids = image_ids(root, files, cfg.get("annotations"))
    size, max_size = predictor.size, predictor.max_size
    class_names = predictor.class_names
    log.info("resize: shortest side %d, longest at most %d (%s)", size, max_size, predictor.resize_source)

    output = Path(cfg.output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    if cfg.attention:
        (output / "attention").mkdir(parents=True, exist_ok=True)
    loader = DataLoader(
        ImageFiles(files, size, max_size, predictor.mean, predictor.std),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=list,
    )
    results: list[dict[str, Any]] = []
    images_json: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    taken: set[str] = set()
    recorder = DecoderAttentionRecorder(predictor.module.model) if cfg.attention else contextlib.nullcontext()
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not cfg.progress_bar):
        batch = readable_items(batch, files, skipped)
        if not batch:
            continue
        orig_sizes = torch.tensor([item["pixels"].shape[:2] for item in batch])  # (B, 2) as (h, w)
        with torch.no_grad(), recorder:
            outputs, detections = predictor.detect([item["image"] for item in batch], orig_sizes)
        for item, detection in zip(batch, detections):
            file = files[item["index"]]
            keep = detection["scores"] >= cfg.threshold
            detection = {key: value[keep].cpu() for key, value in detection.items()}
            image_id = ids[item["index"]]
            height, width = item["pixels"].shape[:2]
            images_json.append(
                {"id": image_id, "file_name": file.relative_to(root).as_posix(), "width": width, "height": height}
            )
            results += coco_results(image_id, detection, predictor.label_to_category_id)
            name = output_name(root, file, taken)
            save_detection_picture(output / "images" / f"{name}.png", item["pixels"], detection, class_names)
            item["name"] = name
        if cfg.attention:
            model = predictor.module.model
            save_attention_pictures(output / "attention", recorder, outputs, model, batch, cfg, class_names)

    return write_results(output, cfg, results, images_json, skipped)


def save_detection_picture(
    path: Path, pixels: np.ndarray, detection: dict[str, torch.Tensor], class_names: Sequence[str]
) -> None:
    """Draws ``detection`` (``boxes`` (K, 4) xyxy in pixels, ``labels`` (K,), ``scores`` (K,)) on ``pixels``
    (height, width, 3) uint8 and saves the picture as ``path``."""
    from ddetr.pictures.drawing import draw_detections

    path.parent.mkdir(parents=True, exist_ok=True)
    picture = draw_detections(
        pixels, detection["boxes"], detection["labels"].tolist(), detection["scores"].tolist(), class_names
    )
    picture.save(path)


def write_results(
    output: Path,
    cfg: DictConfig,
    results: list[dict[str, Any]],
    images_json: list[dict[str, Any]],
    skipped: list[tuple[str, str]],
) -> dict[str, Any]:
    """Writes the COCO results (``cfg.results_file``) and ``images.json``, prints what was done and skipped;
    returns ``predict``'s summary dict."""
    detections_path = output / cfg.results_file
    detections_path.write_text(json.dumps(results))
    (output / "images.json").write_text(json.dumps(images_json, indent=1))
    summary = {
        "num_images": len(images_json),
        "num_detections": len(results),
        "skipped": skipped,
        "detections": str(detections_path),
        "images": str(output / "images"),
    }
    print(
        f"\n{len(images_json)} image(s), {len(results)} detection(s) with score >= {cfg.threshold}; "
        f"pictures in {output / 'images'}, COCO results in {detections_path}"
    )
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s):")
        for file, reason in skipped:
            print(f"  {file}: {reason}")
    return summary
