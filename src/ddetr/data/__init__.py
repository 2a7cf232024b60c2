"""Data: synthetic dataset, COCO dataset + validation, albumentations transforms, collate, DataModules."""

from .category_mapping import CategoryMapping
from .coco import CocoDetection
from .collate import collate_detection
from .datamodule import CocoDataModule, DetectionDataModule, SyntheticDataModule
from .errors import DatasetError, ImageLoadError
from .samplers import UnpaddedDistributedSampler
from .skips import SkipRecord, SkipReport, pop_batch_skips
from .synthetic import SHAPES, ensure_synthetic_dataset
from .transforms import (
    DetectionTransform,
    make_plain_transforms,
    make_train_transforms,
    make_val_transforms,
)

__all__ = [
    "SHAPES",
    "CategoryMapping",
    "CocoDataModule",
    "CocoDetection",
    "DatasetError",
    "DetectionDataModule",
    "DetectionTransform",
    "ImageLoadError",
    "SkipRecord",
    "SkipReport",
    "SyntheticDataModule",
    "UnpaddedDistributedSampler",
    "collate_detection",
    "ensure_synthetic_dataset",
    "make_plain_transforms",
    "make_train_transforms",
    "make_val_transforms",
    "pop_batch_skips",
]
