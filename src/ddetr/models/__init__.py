"""Deformable DETR model parts: backbone, position encoding, deformable attention, transformer, detector,
and (criterion, matcher, post-processing) for training and evaluation."""

from ddetr.models.build import build_deformable_detr
from ddetr.models.deformable_detr import DeformableDETR

__all__ = ["DeformableDETR", "build_deformable_detr"]
