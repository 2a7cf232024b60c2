"""Data: synthetic dataset, COCO dataset + validation, YOLO and VOC readers, dataset folder detection, transforms,
samplers, collate, DataModules."""

from .category_mapping import COCO91_NAMES, CategoryMapping
from .coco import CocoDetection
from .datamodule import (
    CocoDataModule,
    DetectionDataModule,
    SyntheticDataModule,
    VocDataModule,
    YoloDataModule,
    collate_detection,
)
from .folder import FolderDataModule
from .layouts import DatasetLayout, find_layout
from .records import DetectionRecords, ImageRecord
from .image_loading import ImageLoadError
from .samplers import RepeatFactorSampler, UnpaddedDistributedSampler, repeat_factors
from .skips import SkipRecord, SkipReport, pop_batch_skips
from .synthetic import SHAPES, ensure_synthetic_dataset
from .validation import DatasetError
from .transforms import (
    DetectionTransform,
    make_plain_transforms,
    make_train_transforms,
    make_val_transforms,
)

__all__ = [
    "COCO91_NAMES",
    "SHAPES",
    "CategoryMapping",
    "CocoDataModule",
    "CocoDetection",
    "DatasetError",
    "DatasetLayout",
    "DetectionDataModule",
    "DetectionRecords",
    "ImageRecord",
    "DetectionTransform",
    "FolderDataModule",
    "ImageLoadError",
    "RepeatFactorSampler",
    "SkipRecord",
    "SkipReport",
    "SyntheticDataModule",
    "UnpaddedDistributedSampler",
    "VocDataModule",
    "YoloDataModule",
    "collate_detection",
    "ensure_synthetic_dataset",
    "find_layout",
    "make_plain_transforms",
    "make_train_transforms",
    "make_val_transforms",
    "pop_batch_skips",
    "repeat_factors",
]
