"""ResNet backbone with frozen batch norm, returning the feature levels Deformable DETR uses."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from ddetr.models.config import BackboneConfig

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
STAGES = ("layer2", "layer3", "layer4")
STAGE_STRIDES = (8, 16, 32)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, none trained).

    ``y = x * scale + shift`` with ``scale = weight * rsqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, applied as one ``addcmul`` in the dtype of ``x`` (under
    autocast the backbone stays in half precision). ``scale`` and ``shift`` are computed once and
    reused until a buffer changes (in place, by ``load_state_dict``, or replaced by ``.to()``).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self._affine_cache: tuple | None = None  # (buffers, their versions, dtype, scale, shift)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in checkpoints of nn.BatchNorm2d
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _compute_affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # (C,) -> (1, C, 1, 1) to broadcast over (B, C, H, W)
        return scale.reshape(1, -1, 1, 1).to(dtype), shift.reshape(1, -1, 1, 1).to(dtype)

    def affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` of shape (1, C, 1, 1) in ``dtype``, from the cache while the buffers are unchanged."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._compute_affine(dtype)  # traced graphs fuse it; no Python state in them
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        try:
            versions = tuple(buffer._version for buffer in buffers)
        except RuntimeError:  # inference tensors have no version counter: no cache
            return self._compute_affine(dtype)
        cached = self._affine_cache
        if (
            cached is not None
            and cached[2] == dtype
            and cached[1] == versions
            and all(old is new for old, new in zip(cached[0], buffers, strict=True))
        ):
            return cached[3], cached[4]
        # ordinary tensors also inside inference_mode, so a later training step can save them for backward
        with torch.no_grad(), torch.inference_mode(False):
            scale, shift = self._compute_affine(dtype)
        self._affine_cache = (buffers, versions, dtype, scale, shift)
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(x.dtype)
        return torch.addcmul(shift, x, scale)  # shift + x * scale, one kernel

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _out_channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage: those of its last convolution."""
    convolutions = [module for module in stage.modules() if isinstance(module, nn.Conv2d)]
    return convolutions[-1].out_channels


TORCHVISION_WEIGHT_NAMES = {"DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"}


def download_resnet_weights(resnet: nn.Module, weight_name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for this ResNet (cached by torch.hub); a clear error offline."""
    blocks_per_stage = tuple(len(getattr(resnet, f"layer{stage}")) for stage in range(1, 5))
    bottleneck = isinstance(resnet.layer1[0], torchvision.models.resnet.Bottleneck)
    name = {
        ((2, 2, 2, 2), False): "ResNet18",
        ((3, 4, 6, 3), False): "ResNet34",
        ((3, 4, 6, 3), True): "ResNet50",
        ((3, 4, 23, 3), True): "ResNet101",
    }[(blocks_per_stage, bottleneck)]
    weights = torchvision.models.get_weight(f"{name}_Weights.{weight_name}")
    try:
        return weights.get_state_dict(progress=True)
    except OSError as error:  # URLError and socket errors
        raise RuntimeError(
            f"cannot download torchvision's {name} {weight_name} weights from {weights.url} ({error}). "
            f"Offline, download that file elsewhere and pass its path: model.backbone.weights=/path/to/file.pth"
        ) from error


def load_resnet_weights(resnet: nn.Module, path: str | Path) -> None:
    """Loads a torchvision ResNet state dict file into ``resnet``; ``fc.*`` may be absent.

    ``path`` may also name torchvision's ImageNet weights (``DEFAULT``, ``IMAGENET1K_V1``,
    ``IMAGENET1K_V2``), which are downloaded (and cached) where a network is available.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file, when keys are missing, unexpected or of another shape.
    """
    path = Path(path)
    if not path.is_file() and str(path) in TORCHVISION_WEIGHT_NAMES:
        state = download_resnet_weights(resnet, str(path))
    elif not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file not found: {path} (a torchvision ResNet state dict file, or one of "
            f"{sorted(TORCHVISION_WEIGHT_NAMES)} to download torchvision's ImageNet weights)"
        )
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    own = resnet.state_dict()
    missing = sorted(key for key in own if key not in state and not key.startswith("fc."))
    unexpected = sorted(key for key in state if key not in own)
    mismatched = sorted(
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in state
        if key in own and state[key].shape != own[key].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"backbone weights {path} do not fit the torchvision ResNet: missing {missing[:8]} "
            f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}), "
            f"shape mismatches {mismatched[:8]} ({len(mismatched)})"
        )
    resnet.load_state_dict(state, strict=False)


NORM_LAYERS = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}


class Backbone(nn.Module):
    """A torchvision ResNet with frozen batch norm that returns its last ``num_levels`` stages.

    ``num_levels`` of 1, 2 or 3 returns ``layer4``; ``layer3, layer4``; ``layer2, layer3, layer4``
    (strides 8, 16, 32; 16 for ``layer4`` with ``dilation``, the DC5 variant). As in the official
    model (``norm="frozen"``, ``freeze_stem=True``) batch norm is frozen, the stem and ``layer1``
    never train and ``layer2..4`` train when ``train_backbone``. For training from scratch without
    pretrained weights, ``norm="batch"`` uses ordinary (trainable) batch norm and ``freeze_stem=False``
    trains the stem and ``layer1`` too.

    Attributes:
        strides: stride of every returned level.
        num_channels: channels of every returned level, read from the network.
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
    ) -> None:
        super().__init__()
        if norm not in NORM_LAYERS:
            raise ValueError(f"unknown backbone norm {norm!r}; expected one of {sorted(NORM_LAYERS)}")
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; expected one of {RESNETS}")
        if not 1 <= num_levels <= len(STAGES):
            raise ValueError(f"a ResNet backbone returns 1 to {len(STAGES)} levels, got {num_levels}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101); {name} has basic blocks")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=NORM_LAYERS[norm]
        )
        if weights is not None:
            load_resnet_weights(resnet, weights)
        for parameter_name, parameter in resnet.named_parameters():
            trainable = train_backbone and (parameter_name.startswith(STAGES) or not freeze_stem)
            parameter.requires_grad_(trainable)
        stages = STAGES[len(STAGES) - num_levels :]
        self.body = IntermediateLayerGetter(resnet, return_layers={stage: stage for stage in stages})
        self.stage_names = list(stages)
        self.num_channels = [_out_channels(getattr(resnet, stage)) for stage in stages]
        strides = dict(zip(STAGES, STAGE_STRIDES, strict=True))
        if dilation:
            strides["layer4"] = 16
        self.strides = [strides[stage] for stage in stages]

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Runs the ResNet.

        Args:
            images: (batch_size, 3, height, width).
            mask: (batch_size, height, width) bool, True on padding.

        Returns:
            One ``(features, mask)`` pair per level, finest first: features
            (batch_size, num_channels[level], height_l, width_l) and mask (batch_size, height_l, width_l)
            bool, the image mask resized with nearest interpolation.
        """
        features = self.body(images)
        levels = []
        for stage in self.stage_names:
            feature = features[stage]
            # (B, H, W) -> (1, B, H, W) so that interpolate resizes the two spatial dims
            level_mask = F.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
            levels.append((feature, level_mask))
        return levels
