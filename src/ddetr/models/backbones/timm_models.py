"""timm networks as backbones: ``model.backbone.name=timm:<model>`` (``timm:convnext_tiny``).

Any timm model that builds with ``features_only=True`` and has feature maps at strides 8, 16 and 32
(ConvNeXt, EfficientNet, RegNet, ResNet-D, MobileNet, Swin, ...). timm is an optional dependency
(``pip install 'ddetr[timm]'``): it is imported only when such a backbone is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.models.backbones.base import LEVEL_STRIDES, Backbone, backbone_strides, set_trainable, shared_options
from ddetr.models.backbones.frozen_batch_norm import freeze_batch_norm
from ddetr.models.backbones.registry import register_backbone
from ddetr.models.backbones.weights import load_backbone_weights
from ddetr.models.config import BackboneConfig

if TYPE_CHECKING:
    from ddetr.models.config import DeformableDETRConfig

PREFIX = "timm:"
PRETRAINED = "pretrained"  # model.backbone.weights=pretrained: timm's weights of the name's tag (downloaded)
NORMS = ("frozen", "batch")


def import_timm(name: str) -> Any:
    """The timm module; one line naming the extra when it is not installed."""
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            f"backbone {name!r} needs timm, which is not installed: pip install 'ddetr[timm]' (or pip install timm)"
        ) from error
    return timm


def _create(timm: Any, model_name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(model_name, features_only=True, ...)`` with one-line errors."""
    if not timm.is_model(model_name.split(".", 1)[0]):
        raise ValueError(
            f"timm has no model {model_name!r} (list them with timm.list_models('pattern*'); "
            f"model.backbone.name=timm:<model>)"
        )
    try:
        return timm.create_model(model_name, pretrained=pretrained, features_only=True, **kwargs)
    except OSError as error:  # no network for pretrained weights (huggingface_hub / urllib errors)
        raise RuntimeError(
            f"cannot download timm's pretrained weights of {model_name} ({error}). Offline, save "
            f"timm.create_model('{model_name}', pretrained=True).state_dict() elsewhere and pass the file: "
            f"model.backbone.weights=/path/to/file.pth"
        ) from error
    except (TypeError, RuntimeError) as error:  # no features_only, or an unknown keyword in kwargs
        raise ValueError(
            f"timm cannot build {model_name} as a feature extractor (features_only=True): {error}"
        ) from error


def _patch_size(timm: Any, body: nn.Module) -> tuple[int, int]:
    """The patch size of a transformer's patch embedding (input sides must be multiples of it); (1, 1) for
    convolutional networks. ``ValueError`` for a patch embedding that accepts only one input size."""
    for module in body.modules():
        if isinstance(module, timm.layers.PatchEmbed):
            if module.strict_img_size:
                raise ValueError(
                    f"this timm model accepts only {tuple(module.img_size)} inputs; Deformable DETR needs any size: "
                    "build it with +model.backbone.kwargs.strict_img_size=false if the model takes that"
                )
            return tuple(module.patch_size)
    return (1, 1)


class TimmBackbone(Backbone):
    """A timm feature extractor returning its last stages at strides 8, 16, 32 (the last ``num_levels``).

    The levels are chosen by stride from timm's ``feature_info`` (the last feature map at each
    stride), so networks whose first feature map is at stride 2 or 4 fit alike. Channels-last (NHWC)
    outputs (Swin, MambaOut) are permuted to channels first. Transformers with a patch embedding get
    their input padded at the bottom/right to a multiple of the patch size (the mask marks it as padding).

    Policy as for ResNets: ``norm="frozen"`` freezes every batch norm (``FrozenBatchNorm2d`` with the
    network's own eps; layer norm and the rest untouched), ``norm="batch"`` keeps it trainable;
    ``freeze_stem`` keeps every parameter registered before the stride-8 stage (the stem and the
    stride-4 stage) frozen; ``train_backbone=False`` freezes everything.

    ``weights``: a local file with ``timm.create_model(model_name).state_dict()`` (the classifier and
    head entries are ignored), or ``pretrained`` for timm's pretrained weights of ``model_name``
    (``convnext_tiny.fb_in1k`` picks a tag), downloaded where a network is available.
    ``kwargs`` go to ``timm.create_model``. ``max_stride`` (16 or 8) takes the levels up to that stride
    only, and the network is built with timm's ``out_indices`` up to the last of them, so that the later
    stages are neither built nor run where timm's feature wrapper drops them (``FeatureListNet``:
    ConvNeXt, RegNet, ResNet-D, Swin, ...; EfficientNet's wrapper keeps them); ``out_indices`` given in
    ``kwargs`` are kept as they are.
    """

    def __init__(
        self,
        model_name: str,
        num_levels: int = 3,
        train_backbone: bool = BackboneConfig.train_backbone,
        weights: str | Path | None = None,
        norm: str = BackboneConfig.norm,
        freeze_stem: bool = BackboneConfig.freeze_stem,
        kwargs: dict[str, Any] | None = None,
        max_stride: int = BackboneConfig.max_stride,
        min_stride: int = BackboneConfig.min_stride,
    ) -> None:
        super().__init__()
        if min_stride != LEVEL_STRIDES[0]:
            raise ValueError(f"timm backbones return levels from stride 8; backbone.min_stride={min_stride} is not supported")
        if norm not in NORMS:
            raise ValueError(f"unknown backbone norm {norm!r}; expected one of {sorted(NORMS)}")
        timm = import_timm(PREFIX + model_name)
        pretrained = str(weights) == PRETRAINED and not Path(str(weights)).is_file()
        kwargs = dict(kwargs or {})
        # below max_stride 32 a first, randomly initialised build only tells where the levels lie; the
        # network is then built again without the stages after them (unless kwargs choose out_indices)
        cut = max_stride < LEVEL_STRIDES[-1] and "out_indices" not in kwargs
        random_state = torch.random.get_rng_state()
        body = _create(timm, model_name, pretrained and not cut, kwargs)
        info = body.feature_info
        reductions, channels, modules = info.reduction(), info.channels(), info.module_name()
        strides = backbone_strides(num_levels, max_stride)
        available = sorted(set(reductions))
        indices = []
        for stride in backbone_strides(3):  # the stride-8 stage is also where the trained layers begin
            at_stride = [index for index, reduction in enumerate(reductions) if reduction == stride]
            if not at_stride:
                raise ValueError(
                    f"timm:{model_name} has feature maps at strides {available}; Deformable DETR needs 8, 16 and 32 "
                    "(docs/backbones.md lists the families that fit)"
                )
            indices.append(at_stride[-1])
        stem_end = modules[indices[0]]  # timm's name of the stride-8 stage; features_only may flatten it
        stage_prefixes = (stem_end + ".", stem_end.replace(".", "_", 1) + ".")
        self.level_indices = [indices[LEVEL_STRIDES.index(stride)] for stride in strides]
        if cut:
            # timm's feature wrappers stop after their last output (FeatureListNet; a few, such as
            # EfficientNet's, keep every block); the same random state gives the kept stages the same weights
            torch.random.set_rng_state(random_state)
            out_indices = tuple(range(max(self.level_indices) + 1))
            body = _create(timm, model_name, pretrained, {**kwargs, "out_indices": out_indices})
        self.strides = list(strides)
        self.num_channels = [channels[index] for index in self.level_indices]
        self.channels_last_output = str(getattr(body, "output_fmt", "NCHW")).upper().endswith("NHWC")
        self.patch_size = _patch_size(timm, body)
        if weights is not None and not pretrained:
            load_backbone_weights(body, weights, f"timm {model_name}")
        if norm == "frozen":
            freeze_batch_norm(body)
        names = [name for name, _ in body.named_parameters()]
        first_trained = next((i for i, name in enumerate(names) if name.startswith(stage_prefixes)), None)
        if first_trained is None:
            raise ValueError(f"timm:{model_name}: no parameters under its stride-8 stage {stem_end!r}")
        stem = set(names[:first_trained]) if freeze_stem else set()
        set_trainable(body, train_backbone, stem.__contains__)
        self.body = body

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """As ``Backbone.forward``; pads to a multiple of the patch size first (transformers only)."""
        patch_height, patch_width = self.patch_size
        if patch_height > 1 or patch_width > 1:
            pad_bottom, pad_right = -images.shape[-2] % patch_height, -images.shape[-1] % patch_width
            images = F.pad(images, (0, pad_right, 0, pad_bottom))
            mask = F.pad(mask, (0, pad_right, 0, pad_bottom), value=True)
        return super().forward(images, mask)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (batch_size, 3, height, width) -> the maps at the chosen strides, channels first."""
        features = self.body(images)
        levels = [features[index] for index in self.level_indices]
        if self.channels_last_output:  # (B, H, W, C) -> (B, C, H, W)
            levels = [level.permute(0, 3, 1, 2) for level in levels]
        return levels


@register_backbone(PREFIX)
def build_timm(config: DeformableDETRConfig) -> TimmBackbone:
    """The timm model of ``config.backbone.name`` (``timm:<model>``) with ``config.num_backbone_levels``
    levels."""
    backbone = config.backbone
    if backbone.dilation:
        raise ValueError("dilation (DC5) is for torchvision ResNets; timm backbones take timm's own kwargs")
    return TimmBackbone(backbone.name.removeprefix(PREFIX), kwargs=backbone.kwargs, **shared_options(config))
