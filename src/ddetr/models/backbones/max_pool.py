"""The ResNet stem's max pooling, in channels-last memory on the CPU where no gradient is needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channels_last_pays(x: torch.Tensor) -> bool:
    """Whether ``ChannelsLastMaxPool2d`` pools ``x`` in channels-last memory: a contiguous 4-d CPU tensor
    that needs no gradient, outside traced and compiled graphs.

    PyTorch's CPU max pooling of contiguous (NCHW) maps is slow for the stem's 3x3 / 2 window (torch
    2.14, 2 threads: 37 ms for (2, 64, 192, 192), the R50 step's stem, against 3.7 ms for the same map
    in channels-last memory and 11 ms with both layout copies). With a gradient the channels-last
    backward is slower than the plain one at that size (70 against 45 ms), so a trainable stem keeps
    the plain pooling.
    """
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.is_contiguous()
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, same values) that pools in channels-last memory when
    ``channels_last_pays`` and returns contiguous (NCHW) memory as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not channels_last_pays(x) or self.return_indices:
            return super().forward(x)
        pooled = F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last),
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
        )  # (B, C, H', W') in channels-last memory
        return pooled.contiguous()


def channels_last_max_pool(pool: nn.MaxPool2d) -> ChannelsLastMaxPool2d:
    """A ``ChannelsLastMaxPool2d`` with the settings of ``pool``."""
    return ChannelsLastMaxPool2d(
        pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode
    )
