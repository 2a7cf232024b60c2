"""Batching detection samples: pad images bottom/right to the largest in the batch."""

from __future__ import annotations

import torch


def collate_detection(
    samples: list[tuple[torch.Tensor, dict]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Stack `(image (3, h_i, w_i), target)` samples into `(images, mask, targets)`.

    Returns:
        images: float (batch_size, 3, H, W), H/W the largest height/width, zero-padded bottom/right.
        mask: bool (batch_size, H, W), True on padding.
        targets: the targets, unchanged, in sample order.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    images = [image for image, _ in samples]
    channels = images[0].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = images[0].new_zeros((len(images), channels, height, width))  # (B, 3, H, W)
    mask = torch.ones((len(images), height, width), dtype=torch.bool)  # (B, H, W)
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        batch[i, :, :h, :w] = image
        mask[i, :h, :w] = False
    return batch, mask, [target for _, target in samples]
