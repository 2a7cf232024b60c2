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
    assert (
        images.shape == (2, 3, 6, 5)
        and mask.shape == (2, 6, 5)
        and mask.dtype == torch.bool
    )
    assert torch.equal(images[0, :, :4, :5], a) and torch.equal(images[1, :, :6, :3], b)
    assert images[0, :, 4:].abs().sum() == 0 and images[1, :, :, 3:].abs().sum() == 0
    expected_a = torch.ones(6, 5, dtype=torch.bool)
    expected_a[:4, :5] = False
    expected_b = torch.ones(6, 5, dtype=torch.bool)
    expected_b[:6, :3] = False
    assert torch.equal(mask[0], expected_a) and torch.equal(mask[1], expected_b)
    assert out_targets == targets


def test_same_size_has_no_padding():
    images, mask, _ = collate_detection(
        [(torch.ones(3, 4, 4), {}), (torch.zeros(3, 4, 4), {})]
    )
    assert images.shape == (2, 3, 4, 4) and not mask.any()


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError):
        collate_detection([])
