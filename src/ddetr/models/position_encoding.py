"""Sine position encoding of a 2-d feature map, normalised by the valid (unpadded) extent of each image."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """The DETR sine encoding with the Deformable DETR offset: positions are ``cumsum - 0.5``.

    For every pixel the row (y) and column (x) positions count the valid pixels up to it; when
    ``normalize`` they become ``(count - offset) / (total + 1e-6) * scale`` (``offset`` 0.5, the
    Deformable DETR one; DINO's ``PositionEmbeddingSineHW`` has 0 and ``temperature`` 20). Each axis is encoded with
    ``num_pos_feats`` sines and cosines at frequencies ``temperature ** (2 * (i // 2) / num_pos_feats)``;
    the y encoding comes first in the channels.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
        offset: float = 0.5,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used when normalize=True")
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """Encodes the positions of a padded batch.

        Args:
            mask: (batch_size, height, width) bool, True on padding.

        Returns:
            (batch_size, 2 * num_pos_feats, height, width) float32.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (batch_size, height, width)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t  # (batch_size, height, width, num_pos_feats)
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin of even and cos of odd frequencies: (B, H, W, F/2, 2) -> (B, H, W, F)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)
