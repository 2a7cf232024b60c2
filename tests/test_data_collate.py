"""Padding collate: shapes, content and masks."""

from __future__ import annotations

import pytest
import torch

from ddetr.data import collate_detection


def test_pads_bottom_right_with_mask():
    a = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5) + 1
    b = torch.arange(3 * 6 * 3, dtype=torch.float32).reshape(3, 6, 3) + 1
    targets = [{"image_id": 1}, {"image_id": 2}]
    images, mask, out_targets = collate_detection([(a, targets[0]), (b, targets[1])])
    assert images.shape == (2, 3, 6, 5) and mask.shape == (2, 6, 5) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :4, :5], a) and torch.equal(images[1, :, :6, :3], b)
    assert images[0, :, 4:].abs().sum() == 0 and images[1, :, :, 3:].abs().sum() == 0
    expected_a = torch.ones(6, 5, dtype=torch.bool)
    expected_a[:4, :5] = False
    expected_b = torch.ones(6, 5, dtype=torch.bool)
    expected_b[:6, :3] = False
    assert torch.equal(mask[0], expected_a) and torch.equal(mask[1], expected_b)
    assert out_targets == targets


def test_same_size_has_no_padding():
    images, mask, _ = collate_detection([(torch.ones(3, 4, 4), {}), (torch.zeros(3, 4, 4), {})])
    assert images.shape == (2, 3, 4, 4) and not mask.any()


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError):
        collate_detection([])


def test_uint8_batches_normalised_after_transfer_equal_float32_batches(tmp_path):
    """The same samples as uint8 batches normalised in `on_after_batch_transfer` and as float32 batches:
    equal within float32 rounding, padding 0 in both, against the textbook (pixel / 255 - mean) / std."""
    import json

    import numpy as np
    from PIL import Image

    from ddetr.data import DetectionDataModule, make_train_transforms, make_val_transforms
    from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(0)
    images = []
    for index, (width, height) in enumerate([(40, 30), (24, 36), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
        images.append({"id": index + 1, "file_name": f"{index}.png", "width": width, "height": height})
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 3, 10, 12]} for i in range(3)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}))
    options = dict(
        batch_size=3,
        num_workers=0,
        seed=3,
        train_transforms=make_train_transforms(
            scales=[24, 32], max_size=48, crop_resize_scales=[30], crop_min_size=16, crop_max_size=24
        ),
        val_transforms=make_val_transforms(24, 48),
    )
    batches = {}
    for uint8 in (True, False):
        module = DetectionDataModule(tmp_path, ann, tmp_path, ann, uint8_batches=uint8, **options)
        for name in ("train", "val"):
            batch = next(iter(getattr(module, f"{name}_dataloader")()))
            assert batch[0].dtype == (torch.uint8 if uint8 else torch.float32)
            batches[name, uint8] = (batch[0].clone(), module.on_after_batch_transfer(batch, 0))
    for name in ("train", "val"):
        raw, (images_u, mask_u, targets_u) = batches[name, True]
        _, (images_f, mask_f, targets_f) = batches[name, False]
        assert torch.equal(mask_u, mask_f) and mask_u.any()  # sizes differ: there is padding
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets_u, targets_f))
        torch.testing.assert_close(images_u, images_f, rtol=0, atol=1e-5)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        textbook = ((raw.double() / 255 - mean.double()) / std.double()).masked_fill(mask_u[:, None], 0)
        torch.testing.assert_close(images_u.double(), textbook, rtol=0, atol=1e-5)
        assert torch.all(images_u.masked_select(mask_u[:, None].expand_as(images_u)) == 0)


def test_pad_to_multiple_rounds_the_batch_up_and_masks_the_extra():
    a = torch.full((3, 50, 70), 7, dtype=torch.uint8)
    b = torch.full((3, 64, 33), 9, dtype=torch.uint8)
    images, mask, _ = collate_detection([(a, {}), (b, {})], pad_to_multiple=32)
    assert images.shape == (2, 3, 64, 96) and mask.shape == (2, 64, 96) and images.dtype == torch.uint8
    assert torch.equal(images[0, :, :50, :70], a) and images[0, :, 50:].eq(0).all() and images[0, :, :, 70:].eq(0).all()
    assert mask[0].sum() == 64 * 96 - 50 * 70 and mask[1].sum() == 64 * 96 - 64 * 33
    assert not mask[0, :50, :70].any() and not mask[1, :64, :33].any()
    exact, _, _ = collate_detection([(a, {}), (b, {})])
    assert exact.shape == (2, 3, 64, 70)
