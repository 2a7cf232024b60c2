"""Backbones: the interface (``Backbone``), the registry keyed by ``model.backbone.name``, the frozen
batch norm, and the built-in families: torchvision ResNets (``resnet18`` .. ``resnet101``) and timm
feature extractors (``timm:<model>``). See docs/backbones.md."""

from ddetr.models.backbones.base import LEVEL_STRIDES, Backbone, backbone_strides, set_trainable
from ddetr.models.backbones.frozen_batch_norm import FrozenBatchNorm2d, freeze_batch_norm
from ddetr.models.backbones.registry import BACKBONES, backbone_constructor, build_backbone, register_backbone
from ddetr.models.backbones.resnet import RESNETS, ResNetBackbone
from ddetr.models.backbones.timm_models import TimmBackbone
from ddetr.models.backbones.weights import load_backbone_weights

__all__ = [
    "BACKBONES",
    "LEVEL_STRIDES",
    "RESNETS",
    "Backbone",
    "FrozenBatchNorm2d",
    "ResNetBackbone",
    "TimmBackbone",
    "backbone_constructor",
    "build_backbone",
    "freeze_batch_norm",
    "backbone_strides",
    "load_backbone_weights",
    "register_backbone",
    "set_trainable",
]
