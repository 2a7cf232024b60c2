"""Augmentation pipelines: official resize arithmetic, box consistency, and a hypothesis property."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddetr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionTransform,
    RandomSizeCrop,
    make_train_transforms,
    make_val_transforms,
    shortest_side_resize_hw,
)


@pytest.mark.parametrize(
    ("hw", "size", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1066)),  # 640 * 800 / 480 = 1066.67 -> truncated
        ((800, 600), 800, 1333, (1066, 800)),  # portrait
        (
            (100, 1000),
            800,
            1333,
            (133, 1330),
        ),  # capped: size = round(1333 * 100 / 1000) = 133
        ((800, 1000), 800, 1333, (800, 1000)),  # already the right size
        ((50, 50), 128, None, (128, 128)),
    ],
)
def test_shortest_side_resize_matches_hand_values(hw, size, max_size, expected):
    assert shortest_side_resize_hw(*hw, size, max_size) == expected


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_val_transform_scales_boxes_exactly():
    transform = make_val_transforms(size=120, max_size=500)
    boxes = np.array([[0, 0, 200, 60], [30, 10, 50, 59.5]], dtype=np.float32)
    image, out_boxes, labels = transform(_image(60, 200), boxes, np.array([4, 9]))
    assert image.shape == (3, 120, 400)
    np.testing.assert_allclose(out_boxes.numpy(), boxes * 2, rtol=1e-5)
    assert labels.tolist() == [4, 9]
    # normalisation: the mean pixel of a constant image maps to (value/255 - mean) / std
    constant = np.full((60, 200, 3), 200, np.uint8)
    out = transform(constant, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))[0]
    expected = (200 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[:, 5, 5].numpy(), expected, rtol=1e-5)


def test_flip_moves_each_box_with_its_label():
    transform = DetectionTransform([A.HorizontalFlip(p=1.0)])
    boxes = np.array([[0, 0, 10, 5], [20, 3, 50, 8]], dtype=np.float32)
    _, out, labels = transform(_image(10, 50), boxes, np.array([1, 2]))
    order = np.argsort(labels.numpy())
    np.testing.assert_allclose(out.numpy()[order], [[40, 0, 50, 5], [0, 3, 30, 8]])
    assert sorted(labels.tolist()) == [1, 2]


def test_random_size_crop_bounds():
    transform = DetectionTransform([RandomSizeCrop(20, 30)])
    for seed in range(20):
        torch.manual_seed(seed)
        image = transform(_image(40, 60), np.zeros((0, 4), np.float32), np.zeros(0))[0]
        assert 20 <= image.shape[1] <= 30 and 20 <= image.shape[2] <= 30
    # an image smaller than min_size is cropped within its own size instead of failing
    small = transform(_image(10, 12), np.zeros((0, 4), np.float32), np.zeros(0))[0]
    assert small.shape[1:] == (10, 12)


def test_train_transform_sizes_and_reseeding():
    transform = make_train_transforms(
        scales=[32, 48],
        max_size=64,
        crop_resize_scales=[40],
        crop_min_size=20,
        crop_max_size=30,
    )
    boxes = np.array([[5, 5, 30, 25]], dtype=np.float32)
    shapes = set()
    for seed in range(30):
        torch.manual_seed(seed)
        image, _, _ = transform(_image(50, 70), boxes, np.array([0]))
        assert min(image.shape[1:]) in (32, 48) or max(image.shape[1:]) <= 64
        assert max(image.shape[1:]) <= 64
        shapes.add(tuple(image.shape[1:]))
    assert len(shapes) > 2  # the random choices vary
    # the pipeline is reseeded from torch's seed: same seed, same augmentation
    torch.manual_seed(123)
    first = transform(_image(50, 70), boxes, np.array([0]))
    torch.manual_seed(123)
    second = transform(_image(50, 70), boxes, np.array([0]))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


_coord = st.floats(min_value=-40.0, max_value=240.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(8, 200),
    width=st.integers(8, 200),
    raw_boxes=st.lists(st.tuples(_coord, _coord, _coord, _coord), min_size=0, max_size=12),
    seed=st.integers(0, 2**31 - 1),
)
def test_train_transform_property(height, width, raw_boxes, seed):
    """Random sizes and boxes on/over the borders: boxes stay inside with positive area, labels aligned."""
    transform = _property_transform()
    # boxes as a COCO loader would hand them over: clipped to the image, positive area
    boxes = []
    for x0, y0, x1, y1 in raw_boxes:
        x0, x1 = sorted((min(max(x0, 0), width), min(max(x1, 0), width)))
        y0, y1 = sorted((min(max(y0, 0), height), min(max(y1, 0), height)))
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1, y1))
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.arange(len(boxes)) * 10 + 3
    torch.manual_seed(seed)
    image, out_boxes, out_labels = transform(_image(height, width, seed % 7), boxes, labels)
    out_h, out_w = image.shape[1:]
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert out_boxes.dtype == torch.float32 and out_boxes.shape == (len(out_labels), 4)
    assert out_labels.dtype == torch.int64
    b = out_boxes.numpy()
    assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0)
    assert np.all(b[:, 2] <= out_w) and np.all(b[:, 3] <= out_h)
    assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
    # each output label is an input label, at most once (one box per input box)
    assert set(out_labels.tolist()) <= set(labels.tolist())
    assert len(set(out_labels.tolist())) == len(out_labels)
    # each output box comes from the input box with its label: it never grows beyond that box's size
    # times the largest resize factor of the pipeline (direct resize to 96, or resize to 64, crop
    # down to a side of 24, resize that side to 96)
    max_factor = max(96 / min(height, width), 64 / min(height, width) * 96 / 24)
    for box, label in zip(b, out_labels.tolist()):
        source = boxes[(label - 3) // 10]
        assert box[2] - box[0] <= (source[2] - source[0]) * max_factor + 1e-3
        assert box[3] - box[1] <= (source[3] - source[1]) * max_factor + 1e-3


_CACHE: dict = {}


def _property_transform() -> DetectionTransform:
    if "t" not in _CACHE:
        _CACHE["t"] = make_train_transforms(
            scales=[48, 64, 96],
            max_size=160,
            crop_resize_scales=[40, 64],
            crop_min_size=24,
            crop_max_size=64,
        )
    return _CACHE["t"]


def test_normalised_images_are_contiguous_and_the_same_numbers_as_before():
    """The float32 path normalises contiguous memory (faster; ``python -m ddetr.bench data``) and gives the tensors
    of the formula it replaced, computed out of place on the transform's permuted view, bit for bit; and those of
    the uint8 path, normalised later, batched."""
    from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_images

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    boxes, labels = np.array([[10.0, 10.0, 60.0, 50.0]]), np.array([0])
    transform = make_train_transforms(scales=[48, 64], max_size=96, crop_resize_scales=[40], crop_min_size=24)
    floats, _, _ = transform(image, boxes, labels, seed=11, normalize=True)
    pixels, _, _ = transform(image, boxes, labels, seed=11, normalize=False)  # (3, H, W) uint8, a permuted view
    assert floats.dtype == torch.float32 and floats.is_contiguous()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255)
    assert torch.equal(floats, (pixels.to(torch.float32) - mean) * inv_std)  # the former formula, on the view
    batch = torch.stack([pixels, pixels.flip(-1)])  # (2, 3, H, W): the uint8 path's batches
    assert torch.equal(normalize_images(batch), torch.stack([floats, normalize_images(pixels.flip(-1))]))
    assert pixels.dtype == torch.uint8  # the input is left as it was
