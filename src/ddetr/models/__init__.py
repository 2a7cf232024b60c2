"""Deformable DETR model parts: backbone, position encoding, deformable attention, transformer, detector,
and (criterion, matcher, post-processing) for training and evaluation."""

from ddetr.models.build import build_criterion, build_deformable_detr
from ddetr.models.config import DeformableDETRConfig, LossConfig, OptimConfig
from ddetr.models.deformable_detr import DeformableDETR

__all__ = [
    "DeformableDETR",
    "DeformableDETRConfig",
    "LossConfig",
    "OptimConfig",
    "build_criterion",
    "build_deformable_detr",
]
