"""`data=folder`: a dataset folder of any layout `layouts.find_layout` knows (COCO JSON, YOLO, Pascal VOC, as
written by hand or exported by Roboflow), read without naming its format or files.

    python -m ddetr.train data=folder data.data_dir=DIR
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .coco import CocoDetection
from .conversion import ConvertedSplit
from .datamodule import DetectionDataModule, _ConvertedDataModule
from .layouts import DatasetLayout, find_layout
from .transforms import DetectionTransform
from .validation import DatasetError
from .voc import dataset_class_names, read_voc_split
from .yolo import read_yolo_split

log = logging.getLogger(__name__)


class FolderDataModule(_ConvertedDataModule):
    """The dataset in `data_dir`, its format and splits detected on first use (`layouts.find_layout`; at the first
    dataset or category access, so that an entry point reports a bad folder in one line).

    Splits: "train", "val" (the dataset's val, valid or validation) and "test"; `eval_split` picks the
    evaluated one. Once the datasets a run needs are read, one line is logged: the layout, each split's
    images and boxes, and the classes with their training boxes. Category ids and names as the format's
    own module (`DetectionDataModule`, `YoloDataModule`, `VocDataModule`) has them.

    Args:
        data_dir: the dataset folder.
        class_names: VOC only: the classes in head order; None (default) collects them from the XML files.
        **kwargs: `DetectionDataModule` options.

    Raises:
        DatasetError: no layout, several, two annotation files for one split (one line naming the folder and
            the candidates); a split the dataset does not have.
    """

    def __init__(self, data_dir: str | os.PathLike, class_names: Sequence[str] | None = None, **kwargs: Any):
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        super().__init__(data_dir, **kwargs)
        self._layout: DatasetLayout | None = None
        self._reported = False

    @property
    def layout(self) -> DatasetLayout:
        if self._layout is None:
            self._layout = find_layout(self.data_dir)
        return self._layout

    @property
    def crowd_label(self) -> str:
        """What the summary calls boxes with iscrowd=1: VOC's "difficult", else "crowd"."""
        return "difficult" if self.layout.format == "voc" else "crowd"

    # ------------------------------------------------------------------ reading a split
    def _split_name(self, split: str) -> str:
        if split not in self.layout.splits:
            found = ", ".join(self.layout.splits) or "none"
            raise DatasetError(f"{self.data_dir}: no {split} split in this {self.layout.kind} dataset (found: {found})")
        return self.layout.splits[split]

    def read_split(self, split: str) -> ConvertedSplit:
        name = self._split_name(split)
        skip, max_pixels = self.dataset_options["skip_bad_images"], self.dataset_options["max_image_pixels"]
        if self.layout.format == "yolo":
            return read_yolo_split(self.data_dir, name, skip, max_pixels)
        if self.class_names is None:  # VOC: collected once for every split
            self.class_names = dataset_class_names(self.data_dir)
        return read_voc_split(self.data_dir, name, self.class_names, skip, max_pixels)

    def build_dataset(
        self, split: str, transforms: DetectionTransform, keep_empty: bool, keep_coco: bool
    ) -> CocoDetection:
        if self.layout.format != "coco":
            return super().build_dataset(split, transforms, keep_empty, keep_coco)  # read_split, converted
        self._split_name(split)
        images, annotations = self.layout.coco_files[split]
        setattr(self, f"{split}_images", images)
        setattr(self, f"{split}_annotations", annotations)
        return DetectionDataModule.build_dataset(self, split, transforms, keep_empty, keep_coco)  # the JSON as is

    # ------------------------------------------------------------------ the detection summary
    @property
    def train_dataset(self) -> CocoDetection:
        dataset = super().train_dataset
        self.report()
        return dataset

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.report()

    def report(self) -> None:
        """Log the detection summary once (`summary`)."""
        if not self._reported:
            self._reported = True
            log.info("%s", self.summary())

    def summary(self) -> str:
        """One line: layout, splits with their image and box counts (of those read), classes with their boxes."""
        built = {"train": self._train_dataset, self.eval_split: self._val_dataset}
        parts = []
        for split in self.layout.splits:
            dataset = built.get(split)
            counts = "not read" if dataset is None else f"{len(dataset)} images, {dataset.records.num_boxes} boxes"
            evaluated = ", evaluated" if split == self.eval_split else ""
            parts.append(f"{split} = {self.layout.describe_split(split)} ({counts}{evaluated})")
        counted = next((d for d in (self._train_dataset, self._val_dataset) if d is not None), None)
        classes = ""
        if counted is not None:
            per_class = np.bincount(counted.box_labels, minlength=counted.num_classes).tolist()  # (num_classes,)
            source = "train" if counted is self._train_dataset else self.eval_split
            classes = f"; {counted.num_classes} classes (boxes in {source}): " + ", ".join(
                f"{name} ({count})" for name, count in zip(counted.category_names, per_class)
            )
            dropped = getattr(counted, "dropped_categories", [])
            if dropped:
                classes += "; left out as placeholders: " + ", ".join(repr(name) for _, name in dropped)
        return f"data=folder: {self.data_dir}: {self.layout.kind}; {'; '.join(parts)}{classes}"
