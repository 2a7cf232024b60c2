"""Backbones by name: ``model.backbone.name`` picks the constructor registered under that name.

A name is either exact (``resnet50``) or a family prefix ending in ``:`` followed by the family's own
model name (``timm:convnext_tiny``: the ``timm:`` entry gets the whole name). A constructor takes the
whole ``DeformableDETRConfig`` (``config.backbone`` and ``config.num_backbone_levels``) and returns a
``Backbone``.

Register your own before the model is built (in the script that trains, evaluates or predicts)::

    @register_backbone("my_net")
    class MyNet(Backbone):
        def __init__(self, config: DeformableDETRConfig) -> None: ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ddetr.models.backbones.base import place_conv_weights

if TYPE_CHECKING:
    from ddetr.models.backbones.base import Backbone
    from ddetr.models.config import DeformableDETRConfig

BackboneConstructor = Callable[["DeformableDETRConfig"], "Backbone"]

BACKBONES: dict[str, BackboneConstructor] = {}


def register_backbone(name: str) -> Callable[[BackboneConstructor], BackboneConstructor]:
    """Decorator registering a backbone class or function under ``name`` (``"family:"`` for a family
    prefix). Registering a name again replaces the earlier entry."""
    if not name or (":" in name and not name.endswith(":")) or name.count(":") > 1:
        raise ValueError(f"a backbone name is a plain name or a family prefix ending in ':', got {name!r}")

    def register(constructor: BackboneConstructor) -> BackboneConstructor:
        BACKBONES[name] = constructor
        return constructor

    return register


def backbone_constructor(name: str) -> BackboneConstructor:
    """The constructor registered for ``name`` (exact name first, then its ``family:`` prefix)."""
    if name in BACKBONES:
        return BACKBONES[name]
    family = name.split(":", 1)[0] + ":" if ":" in name else None
    if family in BACKBONES and name != family:
        return BACKBONES[family]
    known = sorted(key + "<model>" if key.endswith(":") else key for key in BACKBONES)
    raise ValueError(
        f"unknown backbone {name!r}; registered: {known} (register your own with "
        f"ddetr.models.backbones.register_backbone before building the model)"
    )


def build_backbone(config: DeformableDETRConfig) -> Backbone:
    """The backbone named by ``config.backbone.name``, built from ``config``; with
    ``config.backbone.channels_last`` true its weights (and, in ``forward``, its input) in channels-last
    memory, with ``auto`` both on the CPU only (``place_conv_weights``, ``Backbone.forward``)."""
    backbone = backbone_constructor(config.backbone.name)(config)
    backbone.channels_last = config.backbone.channels_last
    place_conv_weights(backbone, backbone.channels_last)
    if len(backbone.num_channels) != config.num_backbone_levels or len(backbone.strides) != config.num_backbone_levels:
        raise ValueError(
            f"backbone {config.backbone.name!r} declares {len(backbone.num_channels)} channel counts and "
            f"{len(backbone.strides)} strides; the model needs {config.num_backbone_levels} levels "
            f"(config.num_backbone_levels)"
        )
    return backbone
