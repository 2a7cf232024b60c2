"""Repeat-factor sampling (data.sampler=repeat_factor): the factors against LVIS's formula by hand, the
epoch of fixed length shared disjointly by ranks and resumable mid-epoch; the synthetic generator's rare class."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from _layout_writers import write_coco_roboflow

from ddetr.data import FolderDataModule, RepeatFactorSampler, ensure_synthetic_dataset, repeat_factors
from ddetr.data.synthetic import RARE_SHAPE, SHAPES

# five images, three classes: image -> labels of its boxes
IMAGE_LABELS = [[0, 0], [0, 1], [0], [], [2]]


def _offsets_and_labels(image_labels):
    offsets = np.cumsum([0] + [len(labels) for labels in image_labels])
    return offsets, np.array([label for labels in image_labels for label in labels], dtype=np.int64)


def test_repeat_factors_follow_the_lvis_formula():
    offsets, labels = _offsets_and_labels(IMAGE_LABELS)
    # by hand: class 0 is in 3 of 5 images (f = 0.6), class 1 and class 2 in 1 of 5 (f = 0.2)
    # t = 0.5: r_0 = max(1, sqrt(0.5 / 0.6)) = 1, r_1 = r_2 = sqrt(0.5 / 0.2) = sqrt(2.5); an image takes its max
    factors = repeat_factors(offsets, labels, num_classes=3, threshold=0.5)
    np.testing.assert_allclose(factors, [1, math.sqrt(2.5), 1, 1, math.sqrt(2.5)])
    # t = 0.9: r_0 = sqrt(1.5), r_1 = r_2 = sqrt(4.5) = 2.1213...; image 1 holds classes 0 and 1: the larger
    factors = repeat_factors(offsets, labels, num_classes=3, threshold=0.9)
    np.testing.assert_allclose(factors, [math.sqrt(1.5), math.sqrt(4.5), math.sqrt(1.5), 1, math.sqrt(4.5)])
    with pytest.raises(ValueError, match="repeat_threshold must be positive"):
        repeat_factors(offsets, labels, 3, 0.0)


class _Sized:
    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


FACTORS = np.array([1.0, 2.5, 1.0, 1.2, 3.0, 1.0, 1.0, 1.7])


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_the_epoch_has_one_length_and_repeats_each_image_about_its_factor():
    sampler = RepeatFactorSampler(_Sized(len(FACTORS)), FACTORS, seed=3)
    counts = Counter()
    for epoch in range(400):
        pairs = _epoch(sampler, epoch)
        assert len(pairs) == len(sampler) == sampler.epoch_length  # the same every epoch
        counts.update(index for index, _ in pairs)
    # expected number of copies of image i per epoch: r_i (stochastic rounding), scaled by the cut or extension of
    # each epoch to the fixed length (on average epoch_length / sum(r))
    scale = sampler.epoch_length / FACTORS.sum()
    mean = np.array([counts[i] / 400 for i in range(len(FACTORS))])
    np.testing.assert_allclose(mean, FACTORS * scale, rtol=0.06)
    assert abs(sampler.epoch_length - FACTORS.sum()) <= 3  # one draw of sum(floor(r) + Bernoulli(frac(r)))
    first = _epoch(sampler, 1)
    assert first == _epoch(sampler, 1) and first != _epoch(sampler, 2)  # from (seed, epoch) only
    assert len({seed for _, seed in first}) == len(first)  # repeats of an image get their own augmentation


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_the_epoch_disjointly_and_resume_mid_epoch(world_size):
    whole = RepeatFactorSampler(_Sized(len(FACTORS)), FACTORS, num_replicas=1, rank=0, seed=5)
    ranks = [
        RepeatFactorSampler(_Sized(len(FACTORS)), FACTORS, num_replicas=world_size, rank=r, seed=5)
        for r in range(world_size)
    ]
    expected = _epoch(whole, 4)
    shares = [_epoch(sampler, 4) for sampler in ranks]
    assert len({len(share) for share in shares}) == 1  # every rank runs the same number of steps
    padded = (expected * 2)[: len(shares[0]) * world_size]  # padded by repetition as DistributedSampler does
    interleaved = [pair for step in zip(*shares) for pair in step]
    assert interleaved == padded
    assert len(padded) - len(expected) < world_size  # positions 0..len-1 each once, at most world_size-1 pads

    resumed = RepeatFactorSampler(_Sized(len(FACTORS)), FACTORS, num_replicas=world_size, rank=1, seed=5)
    resumed.set_epoch(4)
    resumed.resume(4, 3)
    assert list(resumed) == shares[1][3:]


def test_data_module_with_repeat_factor_sampling(tmp_path):
    root = write_coco_roboflow(tmp_path / "set")
    module = FolderDataModule(root, num_workers=0, batch_size=2, sampler="repeat_factor", repeat_threshold=0.9)
    loader = module.train_dataloader()
    dataset = module.train_dataset
    factors = repeat_factors(dataset.records.box_offsets, dataset.box_labels, dataset.num_classes, 0.9)
    assert isinstance(loader.sampler, RepeatFactorSampler) and np.array_equal(loader.sampler.factors, factors)
    assert len(loader) == math.ceil(loader.sampler.epoch_length / 2)
    assert sum(len(batch[2]) for batch in loader) == loader.sampler.epoch_length
    # a checkpoint's data state (epoch 1, 4 samples consumed) resumes the repeated epoch after them
    loader.sampler.set_epoch(1)
    full = list(loader.sampler)
    resumed = FolderDataModule(root, num_workers=0, batch_size=2, sampler="repeat_factor", repeat_threshold=0.9)
    resumed.load_state_dict({"epoch": 1, "consumed_samples": 4})
    sampler = resumed.train_dataloader().sampler
    sampler.set_epoch(1)
    assert list(sampler) == full[4:] and len(full) == loader.sampler.epoch_length
    with pytest.raises(ValueError, match="sampler must be one of random, repeat_factor"):
        FolderDataModule(root, sampler="balanced")


def test_synthetic_rare_class_option(tmp_path):
    root = ensure_synthetic_dataset(
        tmp_path / "rare", num_train=80, num_val=1, image_size=32, rare_class_frac=0.05, progress=False, num_workers=0
    )
    annotations = json.loads((root / "annotations" / "instances_train.json").read_text())
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    counts = Counter(names[a["category_id"]] for a in annotations["annotations"])
    total = sum(counts.values())
    assert total > 300 and 0.02 < counts[RARE_SHAPE] / total < 0.09, counts  # 5% +- 3 standard deviations
    assert all(counts[name] / total > 0.12 for name in SHAPES if name != RARE_SHAPE)
    with pytest.raises(ValueError, match="rare_class_frac must be in"):
        ensure_synthetic_dataset(tmp_path / "bad", num_train=1, num_val=1, rare_class_frac=1.0, progress=False)
