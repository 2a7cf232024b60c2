"""torchvision ResNets (the official backbone): ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from ddetr.models.backbones.base import LEVEL_STRIDES, Backbone, backbone_strides, set_trainable, shared_options
from ddetr.models.backbones.frozen_batch_norm import FrozenBatchNorm2d
from ddetr.models.backbones.frozen_norm_blocks import FrozenNormBasicBlock, FrozenNormBottleneck
from ddetr.models.backbones.max_pool import channels_last_max_pool
from ddetr.models.backbones.registry import register_backbone
from ddetr.models.backbones.weights import load_backbone_weights, load_state_dict
from ddetr.models.config import BackboneConfig

if TYPE_CHECKING:
    from ddetr.models.config import DeformableDETRConfig

# blocks in layer1..layer4 of each ResNet, and the ResNets built of bottleneck blocks (the others: basic)
RESNET_DEPTHS = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}
BOTTLENECK_RESNETS = ("resnet50", "resnet101")
# each ResNet's layout: (blocks in layer3, bottleneck blocks); the converters tell the depth of a checkpoint by it
RESNET_LAYOUTS = {name: (depths[2], name in BOTTLENECK_RESNETS) for name, depths in RESNET_DEPTHS.items()}
RESNETS = tuple(RESNET_LAYOUTS)
STAGES = ("layer2", "layer3", "layer4")  # the stages at strides 8, 16, 32
STAGE_OF_STRIDE = {4: "layer1", **dict(zip(LEVEL_STRIDES, STAGES))}  # layer1: the stride-4 level (min_stride=4)
NORM_LAYERS = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}
TORCHVISION_WEIGHT_NAMES = {"DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"}
_WEIGHT_ENUMS = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101"}


def _out_channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage: those of its last convolution."""
    convolutions = [module for module in stage.modules() if isinstance(module, nn.Conv2d)]
    return convolutions[-1].out_channels


def download_resnet_weights(name: str, weight_name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of ResNet ``name`` (cached by torch.hub); a clear error offline."""
    enum_name = _WEIGHT_ENUMS[name]
    weights = torchvision.models.get_weight(f"{enum_name}_Weights.{weight_name}")
    try:
        return weights.get_state_dict(progress=True)
    except OSError as error:  # URLError and socket errors
        raise RuntimeError(
            f"cannot download torchvision's {enum_name} {weight_name} weights from {weights.url} ({error}). "
            f"Offline, download that file elsewhere and pass its path: model.backbone.weights=/path/to/file.pth"
        ) from error


class ResNetBackbone(Backbone):
    """A torchvision ResNet returning its last ``num_levels`` stages.

    ``num_levels`` of 1, 2 or 3 returns ``layer4``; ``layer3, layer4``; ``layer2, layer3, layer4``
    (strides 8, 16, 32; 16 for ``layer4`` with ``dilation``, the DC5 variant); ``min_stride=4`` adds
    ``layer1`` (stride 4) as the finest level, so 4 levels return ``layer1..layer4``. ``max_stride=16``
    (or 8) ends the network after ``layer3`` (``layer2``): the last ``num_levels`` stages up to that
    stride are returned and the later stages are not built. As in the official
    model (``norm="frozen"``, ``freeze_stem=True``) batch norm is frozen, the stem and ``layer1``
    never train and ``layer2..4`` train when ``train_backbone``. For training from scratch without
    pretrained weights, ``norm="batch"`` uses ordinary (trainable) batch norm and ``freeze_stem=False``
    trains the stem and ``layer1`` too. The state-dict names are torchvision's under ``body.``.

    ``weights``: a local file with a torchvision ResNet state dict (``fc.*`` ignored), or one of
    ``DEFAULT``, ``IMAGENET1K_V1``, ``IMAGENET1K_V2`` to download torchvision's where a network is
    available.
    """

    def __init__(
        self,
        name: str = BackboneConfig.name,
        num_levels: int = 3,
        dilation: bool = BackboneConfig.dilation,
        train_backbone: bool = BackboneConfig.train_backbone,
        weights: str | Path | None = None,
        norm: str = BackboneConfig.norm,
        freeze_stem: bool = BackboneConfig.freeze_stem,
        max_stride: int = BackboneConfig.max_stride,
        min_stride: int = BackboneConfig.min_stride,
    ) -> None:
        super().__init__()
        if norm not in NORM_LAYERS:
            raise ValueError(f"unknown backbone norm {norm!r}; expected one of {sorted(NORM_LAYERS)}")
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; expected one of {RESNETS}")
        strides = list(backbone_strides(num_levels, max_stride, min_stride))
        if dilation and not RESNET_LAYOUTS[name][1]:
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101); {name} has basic blocks")
        if dilation and max_stride < LEVEL_STRIDES[-1]:
            raise ValueError(f"dilation (DC5) dilates layer4, which backbone.max_stride={max_stride} leaves out")
        # torchvision's resnet18..101 (weights=None), built of blocks that fold frozen norms into their convolutions
        block = FrozenNormBottleneck if name in BOTTLENECK_RESNETS else FrozenNormBasicBlock
        resnet = torchvision.models.resnet.ResNet(
            block,
            list(RESNET_DEPTHS[name]),
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=NORM_LAYERS[norm],
        )
        resnet.maxpool = channels_last_max_pool(resnet.maxpool)  # faster on the CPU without a gradient
        stages = [STAGE_OF_STRIDE[stride] for stride in strides]
        # IntermediateLayerGetter keeps the modules up to the last returned stage: later ones are dropped
        self.body = IntermediateLayerGetter(resnet, return_layers={stage: stage for stage in stages})
        if weights is not None and not Path(weights).is_file() and str(weights) in TORCHVISION_WEIGHT_NAMES:
            load_state_dict(self.body, download_resnet_weights(name, str(weights)), str(weights), f"torchvision {name}")
        elif weights is not None:
            if not Path(weights).is_file():
                raise FileNotFoundError(
                    f"backbone weights file not found: {weights} (a torchvision ResNet state dict file, or one of "
                    f"{sorted(TORCHVISION_WEIGHT_NAMES)} to download torchvision's ImageNet weights)"
                )
            load_backbone_weights(self.body, weights, f"torchvision {name}")
        set_trainable(self.body, train_backbone, lambda parameter: freeze_stem and not parameter.startswith(STAGES))
        self.stage_names = list(stages)
        self.num_channels = [_out_channels(getattr(resnet, stage)) for stage in stages]
        if dilation:
            strides[-1] = LEVEL_STRIDES[-2]  # layer4 dilated instead of strided
        self.strides = strides

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (batch_size, 3, height, width) -> the returned stages, finest first."""
        features = self.body(images)
        return [features[stage] for stage in self.stage_names]


@register_backbone("resnet18")
@register_backbone("resnet34")
@register_backbone("resnet50")
@register_backbone("resnet101")
def build_resnet(config: DeformableDETRConfig) -> ResNetBackbone:
    """The ResNet of ``config.backbone`` with ``config.num_backbone_levels`` levels."""
    return ResNetBackbone(config.backbone.name, dilation=config.backbone.dilation, **shared_options(config))
