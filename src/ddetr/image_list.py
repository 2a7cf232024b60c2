"""Batching images of different sizes: zero padding at the bottom and right, the padding mask, its
resized copy at every feature level, and each image's extent read back from the mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads CHW images to the largest height and width of the batch.

    Args:
        images: tensors of shape (channels, height_i, width_i), all with the same channels and dtype.

    Returns:
        images: (batch_size, channels, max_height, max_width), the originals at the top left, zeros elsewhere.
        mask: (batch_size, max_height, max_width) bool, True on padding.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    channels = images[0].shape[0]
    if any(image.dim() != 3 or image.shape[0] != channels for image in images):
        raise ValueError(f"expected CHW images with {channels} channels, got shapes {[tuple(i.shape) for i in images]}")
    max_height = max(image.shape[1] for image in images)
    max_width = max(image.shape[2] for image in images)
    batch = images[0].new_zeros((len(images), channels, max_height, max_width))
    mask = torch.ones((len(images), max_height, max_width), dtype=torch.bool, device=images[0].device)
    for index, image in enumerate(images):
        height, width = image.shape[1:]
        batch[index, :, :height, :width] = image
        mask[index, :height, :width] = False
    return batch, mask


def valid_extent(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The height and width of each image inside its padding (``pad_images`` pads at the bottom and right).

    Args:
        mask: (batch_size, height, width) bool, True on padding.

    Returns:
        valid_height, valid_width: (batch_size,) int64 each, the unpadded rows and columns.
    """
    valid_height = (~mask[:, :, 0]).sum(1)  # the first column: padding only below the image
    valid_width = (~mask[:, 0, :]).sum(1)  # the first row: padding only to the right
    return valid_height, valid_width


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The padding mask of a feature level: ``mask`` (batch_size, height, width) bool resized to ``size``
    (height_l, width_l) with nearest interpolation (``F.interpolate``'s default, as the official model).

    Returns:
        (batch_size, height_l, width_l) bool, True on padding.
    """
    # (B, H, W) -> (1, B, H, W) so that interpolate resizes the two spatial dims
    return torch.nn.functional.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]
