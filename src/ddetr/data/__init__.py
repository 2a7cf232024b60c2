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
from .image_loading import ImageLoadError
from .layouts import DatasetLayout, find_layout
from .records import DetectionRecords, ImageRecord
from .samplers import RepeatFactorSampler, UnpaddedDistributedSampler, repeat_factors
from .skips import SkipRecord, SkipReport, pop_batch_skips
from .synthetic import SHAPES, ensure_synthetic_dataset
from .transforms import (
    DetectionTransform,
    make_plain_transforms,
    make_train_transforms,
    make_val_transforms,
)
from .validation import DatasetError

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
    "DetectionTransform",
    "FolderDataModule",
    "ImageLoadError",
    "ImageRecord",
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
