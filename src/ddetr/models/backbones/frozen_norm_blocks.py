"""torchvision's ResNet blocks with each frozen batch norm folded into the convolution before it.

A frozen norm is an affine map per channel, ``y = x * scale + shift``, so ``norm(conv(x))`` is one
convolution with weights ``weight * scale`` (per output channel) and bias ``shift``: the norm's pass
over the activations (an ``addcmul`` forward, a ``mul`` backward) goes away, and the fold costs one
product over the weights. In the R50 train step (2 x 384 px, ``layer2..4`` trained) the backbone's
forward and backward took 1,128-1,212 ms folded against 1,265-1,382 ms unfolded (three alternated
pairs, 2 threads); the outputs agree to float32 rounding (largest difference 3.5e-3 of 1,982).

The blocks keep torchvision's modules and names (``conv1``, ``bn1``, ``downsample.0``, ...), so state
dicts and checkpoints are unchanged; with trainable batch norm (``nn.BatchNorm2d``) they are
torchvision's blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ddetr.models.backbones.frozen_batch_norm import FrozenBatchNorm2d


def conv_frozen_norm(conv: nn.Conv2d, norm: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))`` as one convolution, the norm's scale folded into the weights and its shift into the bias."""
    scale, shift = norm.affine(conv.weight.dtype)  # (1, C, 1, 1) each
    scale, shift = scale.flatten(), shift.flatten()  # (C,)
    weight = conv.weight * scale[:, None, None, None]  # (C, C_in / groups, kH, kW)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        # the input's memory format: a no-op where the weights already are channels-last (backbone.channels_last
        # true, or auto on the CPU); NCHW weights would be converted by the convolution on every call anyway
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = shift if conv.bias is None else torch.addcmul(shift, conv.bias, scale)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _folded(block: nn.Module) -> bool:
    return isinstance(block.bn1, FrozenBatchNorm2d)


class FrozenNormBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock``; with frozen norms each one folded into its convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _folded(self):
            return super().forward(x)
        out = self.relu(conv_frozen_norm(self.conv1, self.bn1, x))
        out = conv_frozen_norm(self.conv2, self.bn2, out)
        identity = x if self.downsample is None else conv_frozen_norm(self.downsample[0], self.downsample[1], x)
        out += identity
        return self.relu(out)


class FrozenNormBottleneck(Bottleneck):
    """torchvision's ``Bottleneck``; with frozen norms each one folded into its convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _folded(self):
            return super().forward(x)
        out = self.relu(conv_frozen_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_frozen_norm(self.conv2, self.bn2, out))
        out = conv_frozen_norm(self.conv3, self.bn3, out)
        identity = x if self.downsample is None else conv_frozen_norm(self.downsample[0], self.downsample[1], x)
        out += identity
        return self.relu(out)
