"""LightningDataModules for detection data: COCO-format files, the COCO layout, YOLO, Pascal VOC, the synthetic set."""

from __future__ import annotations

import functools
import gc
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from ddetr.image_list import pad_images
from ddetr.lightning_internals import processed_batches

from .category_mapping import CategoryMapping, HasCategories, MappingMode
from .coco import CocoDetection
from .conversion import ConvertedSplit
from .image_loading import DEFAULT_MAX_IMAGE_PIXELS, ExifMode
from .samplers import (
    RepeatFactorSampler,
    ResumableDistributedSampler,
    UnpaddedDistributedSampler,
    class_repeat_factors,
    repeat_factors,
)
from .skips import SkipReport, pop_batch_skips
from .synthetic import ensure_synthetic_dataset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionTransform,
    make_train_transforms,
    make_val_transforms,
    normalize_images,
)
from .validation import DatasetError
from .voc import dataset_class_names, read_voc_split
from .yolo import read_yolo_split

log = logging.getLogger(__name__)


EVAL_SPLITS = ("val", "test", "train")
SAMPLERS = ("random", "repeat_factor")


def collate_detection(
    samples: list[tuple[torch.Tensor, dict]], pad_to_multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Stacks ``(image (3, h_i, w_i), target)`` samples into ``(images, mask, targets)``.

    Args:
        samples: the batch's samples.
        pad_to_multiple: H and W are rounded up to a multiple of this (1: the largest sizes exactly),
            which bounds the number of distinct batch shapes (fewer recompilations, cached kernels).

    Returns:
        images: (batch_size, 3, H, W) of the samples' dtype, H/W the largest height/width (rounded up to
            `pad_to_multiple`), zero-padded bottom/right.
        mask: bool (batch_size, H, W), True on padding.
        targets: the targets, unchanged, in sample order.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    images, mask = pad_images([image for image, _ in samples])
    if pad_to_multiple > 1:
        height, width = images.shape[-2:]
        extra_h, extra_w = -height % pad_to_multiple, -width % pad_to_multiple
        if extra_h or extra_w:
            images = torch.nn.functional.pad(images, (0, extra_w, 0, extra_h))  # (batch_size, 3, H', W'), zeros
            mask = torch.nn.functional.pad(mask, (0, extra_w, 0, extra_h), value=True)  # (batch_size, H', W')
    return images, mask, [target for _, target in samples]


def freeze_inherited_objects(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: move every object inherited from the parent out of the garbage
    collector's reach, so collections in the worker do not write to (and so copy) the parent's pages."""
    gc.freeze()


class DetectionDataModule(HasCategories, LightningDataModule):
    """Train/val COCO-format detection data given file by file.

    Batches are `(images (B, 3, H, W), mask (B, H, W) bool True = padding, targets list[dict])`
    (see `CocoDetection` for the target keys). Category information (`num_classes`,
    `label_to_category_id`, `category_names`) is available right after construction: it builds the
    val dataset on first use (parsing its annotation file); train and val must declare the same
    categories.

    uint8 batches (`uint8_batches=True`, the default): the workers pad uint8 images (4x fewer bytes
    to pass between processes than float32) and `on_after_batch_transfer` normalises the batch on
    the device (`normalize_images` with the transforms' mean/std), padding set to 0 as before;
    Lightning calls it, code that iterates the loaders itself calls it too (or sets False).

    Skipped images: `on_before_batch_transfer` removes the skip records carried by each batch and
    adds them to `skip_reports[stage]` ("train" or "val"); `pop_skip_report(stage)` returns and
    resets it (`SkipReportCallback` logs it at the end of every train/val epoch).

    Training uses `ResumableDistributedSampler` (shuffled per epoch from `seed`, sharded over ranks,
    a fixed augmentation seed per sample); `state_dict()` records the position in the epoch in
    every checkpoint, so a run resumed mid-epoch sees exactly the samples and augmentations that an
    uninterrupted run would. The val loader uses `UnpaddedDistributedSampler`, so every val image is
    seen exactly once over all ranks (ranks may get different batch counts: do not sync per val step).

    Args:
        train_images, train_annotations, val_images, val_annotations: image folders and COCO JSONs.
        batch_size: per-device train batch size; `val_batch_size` defaults to it.
        num_workers: DataLoader workers (0 = load in the main process).
        category_mapping: "contiguous" or "coco91" (see `CategoryMapping`).
        train_transforms, val_transforms: `DetectionTransform`s (default: the official recipe).
        skip_bad_images, keep_empty, exif_transpose, max_image_pixels: see `CocoDetection`.
        seed: seeds the train shuffling (non-distributed).
        pin_memory, persistent_workers: DataLoader options.
        uint8_batches: uint8 images in the batches, normalised in `on_after_batch_transfer` (above).
        pad_to_multiple: batch heights and widths rounded up to a multiple of this (`collate_detection`).
        test_images, test_annotations: the test split's image folder and COCO JSON (optional; for `eval_split`).
        eval_split: the split validation and `ddetr.eval` evaluate: "val" (default), "test" or "train".
        sampler: "random" (each image once per epoch) or "repeat_factor" (LVIS's repeat-factor sampling,
            `RepeatFactorSampler`: images of classes in fewer than `repeat_threshold` of the images repeated).
        repeat_threshold: the repeat-factor threshold t (fraction of the images; LVIS uses 0.001).
    """

    def __init__(
        self,
        train_images: str | os.PathLike,
        train_annotations: str | os.PathLike,
        val_images: str | os.PathLike,
        val_annotations: str | os.PathLike,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        category_mapping: MappingMode = "contiguous",
        train_transforms: DetectionTransform | None = None,
        val_transforms: DetectionTransform | None = None,
        skip_bad_images: bool = True,
        keep_empty: bool = True,
        exif_transpose: ExifMode = "auto",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        uint8_batches: bool = True,
        pad_to_multiple: int = 1,
        test_images: str | os.PathLike | None = None,
        test_annotations: str | os.PathLike | None = None,
        eval_split: str = "val",
        sampler: str = "random",
        repeat_threshold: float = 0.001,
    ):
        super().__init__()
        # plain strings, so checkpoints holding these hyper-parameters load with weights_only=True
        train_images, train_annotations = str(train_images), str(train_annotations)
        val_images, val_annotations = str(val_images), str(val_annotations)
        test_images = None if test_images is None else str(test_images)
        test_annotations = None if test_annotations is None else str(test_annotations)
        if eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split must be one of {', '.join(EVAL_SPLITS)}, got {eval_split!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        self.save_hyperparameters(ignore=["train_transforms", "val_transforms"], logger=False)
        self.train_images, self.train_annotations = (
            Path(train_images),
            Path(train_annotations),
        )
        self.val_images, self.val_annotations = Path(val_images), Path(val_annotations)
        self.test_images = None if test_images is None else Path(test_images)
        self.test_annotations = None if test_annotations is None else Path(test_annotations)
        self.eval_split, self.sampler, self.repeat_threshold = eval_split, sampler, float(repeat_threshold)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.category_mapping = category_mapping
        self.train_transforms = train_transforms if train_transforms is not None else make_train_transforms()
        self.val_transforms = val_transforms if val_transforms is not None else make_val_transforms()
        self.dataset_options = {
            "category_mapping": category_mapping,
            "skip_bad_images": skip_bad_images,
            "exif_transpose": exif_transpose,
            "max_image_pixels": max_image_pixels,
        }
        self.keep_empty = keep_empty
        self.uint8_batches = uint8_batches
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be at least 1, got {pad_to_multiple}")
        self.pad_to_multiple = int(pad_to_multiple)
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.skip_reports: dict[str, SkipReport] = {}
        self._train_dataset: CocoDetection | None = None
        self._train_sampler: ResumableDistributedSampler | None = None
        self._resume_state: dict[str, int] | None = None
        self._val_dataset: CocoDetection | None = None

    # ------------------------------------------------------------------ datasets
    def ensure_files(self) -> None:
        """Make sure the data files exist (a no-op here; the synthetic variant generates them)."""

    def prepare_data(self) -> None:
        self.ensure_files()

    def build_dataset(
        self, split: str, transforms: DetectionTransform, keep_empty: bool, keep_coco: bool
    ) -> CocoDetection:
        """The `split` ("train", "val" or "test") dataset; subclasses for other formats convert their files here."""
        images, annotations = {
            "train": (self.train_images, self.train_annotations),
            "val": (self.val_images, self.val_annotations),
            "test": (self.test_images, self.test_annotations),
        }[split]
        if images is None or annotations is None:
            raise DatasetError(f"eval_split={split}: set data.{split}_images and data.{split}_annotations")
        return CocoDetection(
            images,
            annotations,
            transforms,
            keep_empty=keep_empty,
            keep_coco=keep_coco,
            uint8_images=self.uint8_batches,
            **self.dataset_options,
        )

    @property
    def train_dataset(self) -> CocoDetection:
        # training keeps only the flat records; the parsed file is freed (no COCO index needed)
        if self._train_dataset is None:
            self.ensure_files()
            self._train_dataset = self.build_dataset("train", self.train_transforms, self.keep_empty, keep_coco=False)
            self._check_same_categories(self._train_dataset, self.val_dataset)
        return self._train_dataset

    @property
    def val_dataset(self) -> CocoDetection:
        """The evaluated split (`eval_split`, "val" by default)."""
        # val keeps every image (negatives included) so that evaluation covers the whole split
        if self._val_dataset is None:
            self.ensure_files()
            self._val_dataset = self.build_dataset(
                self.eval_split, self.val_transforms, keep_empty=True, keep_coco=True
            )
        return self._val_dataset

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs ("fit": train and val; otherwise val)."""
        if stage in (None, "fit"):
            _ = self.train_dataset
        _ = self.val_dataset

    @staticmethod
    def _check_same_categories(train: CocoDetection, val: CocoDetection) -> None:
        if train.label_to_category_id != val.label_to_category_id:
            only_train = sorted(set(train.label_to_category_id) - set(val.label_to_category_id))[:5]
            only_val = sorted(set(val.label_to_category_id) - set(train.label_to_category_id))[:5]
            raise DatasetError(
                f"{train.ann_file} and {val.ann_file} declare different categories "
                f"(only in train: {only_train}, only in val: {only_val})"
            )

    # ------------------------------------------------------------------ category information
    # (num_classes, label_to_category_id, category_names: HasCategories, from the val split's mapping)
    @property
    def mapping(self) -> CategoryMapping:
        return self.val_dataset.mapping

    @property
    def val_coco(self):
        """pycocotools `COCO` of the val annotations (ground truth for `CocoEvaluator`)."""
        return self.val_dataset.coco

    # ------------------------------------------------------------------ loaders
    def make_train_sampler(self) -> ResumableDistributedSampler:
        """The training sampler of `sampler`: every image once per epoch, or repeat-factor sampling."""
        dataset = self.train_dataset
        if self.sampler == "random":
            return ResumableDistributedSampler(dataset, seed=self.seed)
        box_offsets, box_labels = dataset.records.box_offsets, dataset.box_labels
        factors = repeat_factors(box_offsets, box_labels, dataset.num_classes, self.repeat_threshold)
        sampler = RepeatFactorSampler(dataset, factors, seed=self.seed)
        per_class = class_repeat_factors(box_offsets, box_labels, dataset.num_classes, self.repeat_threshold)
        names = dataset.category_names
        repeated = [f"{name} x{factor:.2f}" for name, factor in zip(names, per_class) if 1 < factor < float("inf")]
        log.info(
            "repeat-factor sampling (threshold %g): %d samples per epoch from %d images; classes repeated: %s",
            self.repeat_threshold,
            sampler.epoch_length,
            len(dataset),
            ", ".join(repeated) or "none",
        )
        return sampler

    def train_dataloader(self) -> DataLoader:
        self._train_sampler = self.make_train_sampler()
        if self._resume_state is not None:
            self._train_sampler.resume(self._resume_state["epoch"], self._resume_state["consumed_samples"])
            self._resume_state = None
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler,
            # its own generator: creating the loader's iterator draws nothing from the global RNG
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=False,
            **self._loader_options(),
        )

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> dict[str, Any]:
        """The position in the training epoch, saved in every checkpoint (Lightning calls this)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        consumed_batches = processed_batches(trainer)  # not public API: ddetr.lightning_internals
        return {"epoch": trainer.current_epoch, "consumed_samples": consumed_batches * self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: the next training epoch iteration continues after the samples already used."""
        self._resume_state = dict(state_dict) if state_dict else None
        if self._resume_state:
            # the sampler resumes mid-epoch, which Lightning cannot see from the DataLoader itself
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def val_dataloader(self) -> DataLoader:
        sampler = UnpaddedDistributedSampler(self.val_dataset) if _is_distributed() else None
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            sampler=sampler,
            **self._loader_options(),
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "worker_init_fn": freeze_inherited_objects if self.num_workers > 0 else None,
            "collate_fn": functools.partial(collate_detection, pad_to_multiple=self.pad_to_multiple),
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }

    # ------------------------------------------------------------------ skipped images
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Move the skip records out of the batch into the report of the current stage (main process)."""
        records = pop_batch_skips(batch)
        if records:
            trainer = getattr(self, "trainer", None)
            stage = "train" if trainer is not None and trainer.training else "val"
            self.skip_reports.setdefault(stage, SkipReport()).add(records)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """uint8 batches: normalise the images on their device, padding (mask True) set to 0 (float batches pass)."""
        images, mask, targets = batch
        if images.dtype != torch.uint8:
            return batch
        transforms = (
            self.train_transforms
            if getattr(self, "trainer", None) is not None and self.trainer.training
            else self.val_transforms
        )
        mean, std = getattr(transforms, "mean", IMAGENET_MEAN), getattr(transforms, "std", IMAGENET_STD)
        images = normalize_images(images, mean, std).masked_fill_(mask[:, None], 0.0)  # (batch_size, 3, H, W)
        return images, mask, targets

    def pop_skip_report(self, stage: str | None = None) -> SkipReport:
        """Return the skips seen since the last call for `stage` ("train"/"val"; None: all) and reset them."""
        stages = list(self.skip_reports) if stage is None else [stage]
        report = SkipReport()
        for name in stages:
            report.add(self.skip_reports.pop(name, SkipReport()).records)
        return report


class CocoDataModule(DetectionDataModule):
    """The official COCO layout under `data_dir`: `train2017/`, `val2017/`,
    `annotations/instances_{train,val}2017.json`. Defaults to the 91-slot "coco91" mapping so that
    official checkpoints apply; other arguments as `DetectionDataModule`."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        category_mapping: MappingMode = "coco91",
        **kwargs: Any,
    ):
        data_dir = str(data_dir)  # a plain string in the saved hyper-parameters (weights_only loading)
        root = Path(data_dir)
        super().__init__(
            train_images=root / "train2017",
            train_annotations=root / "annotations" / "instances_train2017.json",
            val_images=root / "val2017",
            val_annotations=root / "annotations" / "instances_val2017.json",
            test_images=root / "test2017",  # COCO's own test split has no public annotations: a copy's may
            test_annotations=root / "annotations" / "instances_test2017.json",
            category_mapping=category_mapping,
            **kwargs,
        )


class _ConvertedDataModule(DetectionDataModule):
    """Shared part of the YOLO and VOC modules: each split is read by `read_split` into a COCO dict.

    Args:
        data_dir: the dataset (folder or file, see the subclass).
        train_split, val_split, test_split: names of the splits in it (default "train", "val", "test"; "val"
            also finds "valid" and "validation", `split_names`).
        **kwargs: `DetectionDataModule` options.
    """

    crowd_label = "crowd"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        **kwargs: Any,
    ):
        data_dir = str(data_dir)
        self.data_dir = Path(data_dir)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        super().__init__(
            train_images=data_dir, train_annotations=data_dir, val_images=data_dir, val_annotations=data_dir, **kwargs
        )

    def read_split(self, split: str) -> ConvertedSplit:
        raise NotImplementedError

    def build_dataset(
        self, split: str, transforms: DetectionTransform, keep_empty: bool, keep_coco: bool
    ) -> CocoDetection:
        converted = self.read_split(split)
        return CocoDetection(
            converted.image_dir,
            converted.source,
            transforms,
            keep_empty=keep_empty,
            keep_coco=keep_coco,
            data=converted.data,
            crowd_label=self.crowd_label,
            reader_problems=converted.problems,
            uint8_images=self.uint8_batches,
            **self.dataset_options,
        )


class YoloDataModule(_ConvertedDataModule):
    """An Ultralytics YOLO dataset: `data_dir` holds data.yaml (or dataset.yaml), or is that file
    (layout and rules: `ddetr.data.yolo`). Category id == class index; contiguous mapping by default.

    Args:
        data_dir: the dataset folder or its YAML.
        train_split, val_split, test_split: the YAML keys of the splits (default "train", "val", "test").
        **kwargs: `DetectionDataModule` options.
    """

    def read_split(self, split: str) -> ConvertedSplit:
        return read_yolo_split(
            self.data_dir,
            self.splits[split],
            self.dataset_options["skip_bad_images"],
            self.dataset_options["max_image_pixels"],
        )


class VocDataModule(_ConvertedDataModule):
    """A Pascal VOC dataset: a year folder (`Annotations/`, `JPEGImages/`, `ImageSets/Main/<split>.txt`) or one
    folder per split with the XML files beside the images (rules: `ddetr.data.voc`). `difficult` objects are
    kept out of training and ignored by evaluation.

    Args:
        data_dir: the year folder (e.g. VOCdevkit/VOC2012) or the folder of the split folders.
        train_split, val_split, test_split: names of the split lists or folders (default "train", "val", "test").
        class_names: the classes, in head order; None (default): every name in the dataset's XML files, sorted
            (for VOC itself the 20 classes in their usual order).
        **kwargs: `DetectionDataModule` options.
    """

    crowd_label = "difficult"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        train_split: str = "train",
        val_split: str = "val",
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ):
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        super().__init__(data_dir, train_split, val_split, **kwargs)

    def read_split(self, split: str) -> ConvertedSplit:
        if self.class_names is None:  # collected once for every split
            self.class_names = dataset_class_names(self.data_dir)
        return read_voc_split(
            self.data_dir,
            self.splits[split],
            self.class_names,
            self.dataset_options["skip_bad_images"],
            self.dataset_options["max_image_pixels"],
        )


# SyntheticDataModule options passed through to ensure_synthetic_dataset (whose defaults they keep when
# absent) -> its parameter names (the data module's own `seed` seeds the augmentation)
GENERATION_OPTIONS = {
    "num_train": "num_train",
    "num_val": "num_val",
    "image_size": "image_size",
    "synthetic_seed": "seed",
    "max_objects": "max_objects",
    "min_object_frac": "min_object_frac",
    "max_object_frac": "max_object_frac",
    "rare_class_frac": "rare_class_frac",
}


class SyntheticDataModule(DetectionDataModule):
    """The built-in synthetic shapes dataset (generated on first use under `root`, then cached).

    Args:
        root: dataset folder.
        **kwargs: the generation options `GENERATION_OPTIONS` (num_train, num_val, image_size, synthetic_seed,
            max_objects, min_object_frac, max_object_frac, rare_class_frac: see `ensure_synthetic_dataset`, whose
            defaults apply; `synthetic_seed` is its `seed`), and `DetectionDataModule` options (batch_size,
            transforms, ...); the mapping is contiguous.
    """

    def __init__(self, root: str | os.PathLike = "data/synthetic", **kwargs: Any):
        root = str(root)  # a plain string in the saved hyper-parameters (weights_only loading)
        self.root = Path(root)
        self.generation = {
            GENERATION_OPTIONS[name]: value for name, value in kwargs.items() if name in GENERATION_OPTIONS
        }
        options = {name: value for name, value in kwargs.items() if name not in GENERATION_OPTIONS}
        options.setdefault("category_mapping", "contiguous")
        super().__init__(
            train_images=self.root / "train",
            train_annotations=self.root / "annotations" / "instances_train.json",
            val_images=self.root / "val",
            val_annotations=self.root / "annotations" / "instances_val.json",
            **options,
        )

    def ensure_files(self) -> None:
        ensure_synthetic_dataset(self.root, **self.generation)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
