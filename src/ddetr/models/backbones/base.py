"""The backbone interface: what the detector needs from a feature extractor.

A backbone is an ``nn.Module`` subclass of ``Backbone`` that
- returns ``num_levels`` feature maps, finest first, at the strides in ``strides`` (in input pixels,
  increasing; the built-in ones give the last of 8, 16, 32) with the channel counts in
  ``num_channels`` (read from the network, never hard-coded);
- takes normalised images (batch_size, 3, height, width) of any height and width, zero-padded at the
  bottom/right, and returns with each map its padding mask (the image mask resized with nearest
  interpolation; ``Backbone.forward`` does that, a subclass only implements ``feature_maps``);
- applies the training policy of ``BackboneConfig`` itself: batch norm frozen (``norm="frozen"``) or
  trained (``"batch"``), which parameters train (``train_backbone``, ``freeze_stem``: the layers that
  run before the stride-8 stage stay frozen, as the official stem and ``layer1``).

The detector adds the input projections, the extra strided levels and the position encoding; the
optimiser puts every parameter under ``backbone.`` into the backbone's parameter group
(``lr_backbone``). Backbones are built by name through ``ddetr.models.backbones.registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ddetr.image_list import resize_mask
from ddetr.models.config import LEVEL_STRIDES, strides_up_to

if TYPE_CHECKING:
    from ddetr.models.config import DeformableDETRConfig


def backbone_strides(
    num_levels: int, max_stride: int = LEVEL_STRIDES[-1], min_stride: int = LEVEL_STRIDES[0]
) -> tuple[int, ...]:
    """The strides of ``num_levels`` backbone levels: the last ones of 8, 16, 32 (4, 8, 16, 32 with
    ``min_stride=4``) up to ``max_stride``."""
    strides = strides_up_to(max_stride, min_stride)
    if not 1 <= num_levels <= len(strides):
        raise ValueError(f"a backbone up to stride {max_stride} returns 1 to {len(strides)} levels, got {num_levels}")
    return strides[len(strides) - num_levels :]


def shared_options(config: DeformableDETRConfig) -> dict[str, Any]:
    """The keyword arguments every built-in backbone constructor takes from ``config``: ``num_levels``
    (``config.num_backbone_levels``), ``max_stride``, ``min_stride`` and the training policy of ``config.backbone``
    (``train_backbone``, ``weights``, ``norm``, ``freeze_stem``)."""
    backbone = config.backbone
    return {
        "num_levels": config.num_backbone_levels,
        "max_stride": backbone.max_stride,
        "min_stride": backbone.min_stride,
        "train_backbone": backbone.train_backbone,
        "weights": backbone.weights,
        "norm": backbone.norm,
        "freeze_stem": backbone.freeze_stem,
    }


def runs_channels_last(setting: bool | str, device: torch.device) -> bool:
    """Whether ``model.backbone.channels_last`` (true, false or "auto") runs the convolutions on ``device``
    in channels-last memory: always with true, on the CPU with "auto", never with false."""
    return setting is True or (setting == "auto" and device.type == "cpu")


def place_conv_weights(module: nn.Module, setting: bool | str) -> None:
    """Puts the 4-d parameters and buffers of ``module`` (the convolution weights) in the memory format
    that ``setting`` (``model.backbone.channels_last``) gives on their device: channels-last with true,
    and with "auto" on the CPU, NCHW with "auto" elsewhere; false leaves them as they are. Nothing is
    copied when they already are in that format.

    The parameters stay the same objects (``nn.Module.to`` swaps their data), so an optimiser built on
    them still holds them. With channels-last weights and input a convolution needs no per-call copy of
    its weight to channels-last and of its gradient back to NCHW. Against NCHW weights with a
    channels-last input (R50, 2 x 384 px, 2 threads, ``bench parts``, 11 repetitions): the backbone's
    forward + backward 0.98x (per-repetition median; quartiles 0.94-1.00), the whole loss + backward
    1.00x (0.97-1.05), within the machine's noise.
    """
    if setting is False:
        return
    weights = [t for t in (*module.parameters(), *module.buffers()) if t.dim() == 4]
    if not weights:
        return
    memory_format = torch.channels_last if runs_channels_last(setting, weights[0].device) else torch.contiguous_format
    if not all(t.is_contiguous(memory_format=memory_format) for t in weights):
        module.to(memory_format=memory_format)


def set_trainable(body: nn.Module, train_backbone: bool, is_stem: Callable[[str], bool]) -> None:
    """The training policy of a backbone's parameters: none train without ``train_backbone``; else every
    one except those for which ``is_stem(name)`` holds (pass ``lambda name: False`` to train them all)."""
    for name, parameter in body.named_parameters():
        parameter.requires_grad_(train_backbone and not is_stem(name))


class Backbone(nn.Module):
    """Base class of every backbone; subclasses set ``strides`` and ``num_channels`` in ``__init__`` and
    implement ``feature_maps``.

    Attributes:
        strides: stride in input pixels of every returned level, finest first.
        num_channels: channels of every returned level.
    """

    strides: list[int]
    num_channels: list[int]
    # set by build_backbone (model.backbone.channels_last): True for channels-last weights and input,
    # "auto" for both on the CPU only (weights placed again on every device move, ``_apply``)
    channels_last: bool | str = False

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (batch_size, 3, height, width) -> one (batch_size, num_channels[level], height_l, width_l)
        tensor per level, finest first (channels first)."""
        raise NotImplementedError(f"{type(self).__name__} must implement feature_maps(images)")

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Runs the network.

        Args:
            images: (batch_size, 3, height, width).
            mask: (batch_size, height, width) bool, True on padding.

        Returns:
            One ``(features, mask)`` pair per level, finest first: features
            (batch_size, num_channels[level], height_l, width_l) and mask (batch_size, height_l, width_l)
            bool, the image mask resized with nearest interpolation.
        """
        if runs_channels_last(self.channels_last, images.device):
            images = images.contiguous(memory_format=torch.channels_last)  # the convolutions follow the input
        features = self.feature_maps(images)
        if len(features) != len(self.num_channels):
            raise RuntimeError(
                f"{type(self).__name__} returned {len(features)} feature maps, it declares {len(self.num_channels)}"
            )
        return [(feature, resize_mask(mask, feature.shape[-2:])) for feature in features]

    def _apply(self, fn, recurse=True):
        """``nn.Module``'s device and dtype moves (``to``, ``cuda``, ``cpu``, ...); then the convolution
        weights take the memory format that ``channels_last`` gives on the new device
        (``place_conv_weights``: with "auto", channels-last on the CPU, NCHW elsewhere)."""
        super()._apply(fn, recurse)
        place_conv_weights(self, self.channels_last)
        return self
