"""DataModules: category info before setup, batches, samplers, skip reporting through Lightning, configs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _runs import quiet_trainer
from hydra.utils import instantiate
from PIL import Image

from ddetr.data import (
    CocoDataModule,
    DatasetError,
    DetectionDataModule,
    SyntheticDataModule,
    UnpaddedDistributedSampler,
    make_train_transforms,
    make_val_transforms,
)
from ddetr.training.callbacks import SkipReportCallback


def _small_transforms() -> dict:
    return {
        "train_transforms": make_train_transforms(
            scales=[48, 64],
            max_size=96,
            crop_resize_scales=[48],
            crop_min_size=32,
            crop_max_size=48,
        ),
        "val_transforms": make_val_transforms(64, 96),
    }


def _write_split(root: Path, split: str, count: int, categories, bad: tuple[int, ...] = ()) -> tuple[Path, Path]:
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    rng = np.random.default_rng(len(split))
    for i in range(1, count + 1):
        name = f"{i}.jpg"
        if i in bad:
            (root / split / name).write_bytes(b"\xff\xd8\xff broken")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / split / name)
        images.append({"id": i, "file_name": name, "width": 50, "height": 40})
        annotations.append(
            {"id": i, "image_id": i, "category_id": categories[i % len(categories)]["id"], "bbox": [5, 5, 20, 15]}
        )
    ann = root / f"{split}.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root / split, ann


CATS = [{"id": 2, "name": "b"}, {"id": 5, "name": "e"}]


def test_synthetic_module_category_info_before_setup(tmp_path):
    dm = SyntheticDataModule(
        root=tmp_path / "syn",
        num_train=12,
        num_val=5,
        image_size=64,
        batch_size=4,
        num_workers=0,
        **_small_transforms(),
    )
    assert dm.num_classes == 6  # generates the data and reads the categories, no setup needed
    assert dm.category_names[:3] == ["circle", "square", "triangle"]
    assert dm.label_to_category_id == [1, 2, 3, 4, 5, 6]
    dm.setup("fit")
    images, mask, targets = next(iter(dm.train_dataloader()))
    assert images.shape[0] == 4 and mask.shape == (4, *images.shape[2:]) and mask.dtype == torch.bool
    for target, image_mask in zip(targets, mask):
        h, w = target["size"].tolist()
        assert not image_mask[:h, :w].any() and image_mask.sum() == image_mask.numel() - h * w
        assert target["boxes"].shape[1] == 4 and target["labels"].max() < 6
        assert torch.all((target["boxes"] >= 0) & (target["boxes"] <= 1))
    val_images, _, val_targets = next(iter(dm.val_dataloader()))
    assert val_images.shape[-2:] == (64, 64) and val_targets[0]["orig_size"].tolist() == [64, 64]
    assert len(dm.val_coco.getImgIds()) == 5


def test_train_shuffle_is_seeded(tmp_path):
    train = _write_split(tmp_path, "train", 10, CATS)
    val = _write_split(tmp_path, "val", 3, CATS)

    def order(seed):
        dm = DetectionDataModule(*train, *val, batch_size=10, num_workers=0, seed=seed, **_small_transforms())
        return [t["image_id"] for t in next(iter(dm.train_dataloader()))[2]]

    assert order(0) == order(0) and order(0) != order(1)


def test_mismatched_categories_are_an_error(tmp_path):
    train = _write_split(tmp_path, "train", 3, CATS)
    val = _write_split(tmp_path, "val", 3, CATS[:1])
    dm = DetectionDataModule(*train, *val, num_workers=0)
    with pytest.raises(DatasetError, match="different categories"):
        dm.setup("fit")


def test_unpadded_sampler_sees_every_index_once():
    data = list(range(5))
    parts = [list(UnpaddedDistributedSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert parts == [[0, 2, 4], [1, 3]]
    assert [len(UnpaddedDistributedSampler(data, num_replicas=2, rank=r)) for r in range(2)] == [3, 2]


class _TinyModule(pl.LightningModule):
    """Checks the batch contract; learns nothing."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def _check(self, batch):
        images, mask, targets = batch
        assert images.dim() == 4 and mask.shape == (images.shape[0], *images.shape[2:])
        assert all("skipped" not in t for t in targets)
        return (images.mean() - self.weight) ** 2

    def training_step(self, batch, batch_idx):
        return self._check(batch)

    def validation_step(self, batch, batch_idx):
        self._check(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_skips_reach_the_epoch_report_through_lightning(tmp_path, caplog):
    train = _write_split(tmp_path, "train", 6, CATS, bad=(3,))
    val = _write_split(tmp_path, "val", 4, CATS, bad=(2,))
    dm = DetectionDataModule(*train, *val, batch_size=2, num_workers=2, **_small_transforms())
    trainer = quiet_trainer(
        max_epochs=1, devices=1, num_sanity_val_steps=0, callbacks=[SkipReportCallback()], default_root_dir=tmp_path
    )
    with caplog.at_level("WARNING", logger="ddetr.training.callbacks"):
        trainer.fit(_TinyModule(), datamodule=dm)
    assert trainer.callback_metrics["train/skipped_images"] == 1
    assert trainer.callback_metrics["val/skipped_images"] == 1
    lines = [r.getMessage() for r in caplog.records if "skipped 1 images" in r.getMessage()]
    assert any("train/3.jpg" in line for line in lines) and any("val/2.jpg" in line for line in lines)
    assert len(dm.pop_skip_report()) == 0  # reported and reset


def _data_config(name: str):
    """The composed ``data`` group ``name`` (with its transforms group)."""
    from ddetr.app import compose

    return compose([f"data={name}"]).data


def test_coco_layout_and_configs(tmp_path):
    dm = CocoDataModule(tmp_path / "coco", num_workers=0)
    assert dm.train_images == tmp_path / "coco" / "train2017"
    assert dm.val_annotations == tmp_path / "coco" / "annotations" / "instances_val2017.json"
    assert dm.category_mapping == "coco91"

    for name in ("synthetic", "coco", "custom"):
        cfg = _data_config(name)
        assert cfg._target_.startswith("ddetr.data.")
    synthetic = _data_config("synthetic")
    synthetic.root = str(tmp_path / "syn")
    synthetic.num_train, synthetic.num_val, synthetic.num_workers = 6, 3, 0
    dm = instantiate(synthetic)
    assert isinstance(dm, SyntheticDataModule) and dm.num_classes == 6
    coco = _data_config("coco")
    coco.data_dir = str(tmp_path / "coco")
    assert isinstance(instantiate(coco), CocoDataModule)
    custom = _data_config("custom")
    train = _write_split(tmp_path, "train", 3, CATS)
    val = _write_split(tmp_path, "val", 3, CATS)
    custom.train_images, custom.train_annotations = str(train[0]), str(train[1])
    custom.val_images, custom.val_annotations = str(val[0]), str(val[1])
    dm = instantiate(custom)
    assert dm.num_classes == 2 and dm.label_to_category_id == [2, 5]
