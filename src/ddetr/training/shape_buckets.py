"""Image-size buckets for ``model.compile=reduce-overhead``: a batch's padded height and width rounded
up to a few sizes, so the compiled forward sees (and a GPU records a CUDA graph for) few shapes.

A side is rounded up to a multiple of ``SIDE_MULTIPLE``, then up to the next entry of ``SIDE_BUCKETS``;
a side above the largest bucket keeps its multiple. With the official training augmentation (short
side 480..800, long side at most 1333) every side lands in one of the buckets from 512 up, so a batch
size has at most ``len(SIDE_BUCKETS) ** 2`` image shapes whatever the data's ``pad_to_multiple``
(docs/speed.md, "CUDA graph keys"). The padding is bottom/right with zeros and a True mask, as the
data's own padding: what ``pad_to_multiple`` does, at coarser steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SIDE_MULTIPLE = 64  # every level of the stride-32/64 feature pyramid divides it
SIDE_BUCKETS = (64, 128, 256, 384, 512, 640, 768, 896, 1024, 1344)


def bucket_side(side: int, buckets: Sequence[int] = SIDE_BUCKETS, multiple: int = SIDE_MULTIPLE) -> int:
    """``side`` rounded up to a multiple of ``multiple``, then up to the smallest bucket that holds it
    (unchanged above the largest bucket)."""
    rounded = -(-side // multiple) * multiple
    return next((bucket for bucket in sorted(buckets) if bucket >= rounded), rounded)


def pad_to_bucket(
    images: torch.Tensor,
    mask: torch.Tensor,
    buckets: Sequence[int] = SIDE_BUCKETS,
    multiple: int = SIDE_MULTIPLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads a batch to its bucket shape (``bucket_side`` of its height and width).

    Args:
        images: (batch_size, 3, H, W).
        mask: bool (batch_size, H, W), True on padding.

    Returns:
        images (batch_size, 3, H', W') zero-padded bottom/right, mask (batch_size, H', W') True on the
        added pixels; the inputs themselves when the batch already has its bucket shape.
    """
    height, width = images.shape[-2:]
    extra_h = bucket_side(height, buckets, multiple) - height
    extra_w = bucket_side(width, buckets, multiple) - width
    if not (extra_h or extra_w):
        return images, mask
    images = F.pad(images, (0, extra_w, 0, extra_h))  # (batch_size, 3, H', W')
    mask = F.pad(mask, (0, extra_w, 0, extra_h), value=True)  # (batch_size, H', W')
    return images, mask
