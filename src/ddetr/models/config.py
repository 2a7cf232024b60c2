"""The typed configuration of Deformable DETR: the single source of the official defaults.

``DeformableDETRConfig`` describes the detector (architecture, option names as in the official
command line), ``LossConfig`` the matcher costs and loss weights, ``OptimConfig`` the optimiser and
schedule. Their dataclass defaults are the official values (R-50, multi-scale, 300 queries, the
COCO recipe); the builders, the layers, the LightningModule, the Hydra schema of ``conf/model`` and
the checkpoint converters all read them from here, so a default is written exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def _from_mapping(cls, values: Mapping[str, Any], what: str):
    """``cls(**values)`` with a ``TypeError`` naming the unknown keys and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown {what} options {unknown}; expected some of {sorted(known)}")
    return cls(**values)


def _plain(value: Any) -> Any:
    """``value`` with every mapping a dict and every sequence a list (e.g. from OmegaConf), for checkpoints."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(item) for item in value]
    return value


LEVEL_STRIDES = (8, 16, 32)  # the strides of the backbone levels the detector can use, finest first
FINE_STRIDE = 4  # the stride-4 level a backbone adds with backbone.min_stride=4 (DINO's 5 scales)


def strides_up_to(max_stride: int, min_stride: int = LEVEL_STRIDES[0]) -> tuple[int, ...]:
    """The strides of ``LEVEL_STRIDES`` (and 4 when ``min_stride`` is 4) from ``min_stride`` up to
    ``max_stride`` (``BackboneConfig.min_stride``, ``BackboneConfig.max_stride``)."""
    return tuple(stride for stride in (FINE_STRIDE, *LEVEL_STRIDES) if min_stride <= stride <= max_stride)


CHANNELS_LAST = (True, False, "auto")  # model.backbone.channels_last


@dataclass
class BackboneConfig:
    """The backbone: a name of the registry in ``ddetr.models.backbones`` and its training policy."""

    name: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | timm:<model> | a registered name
    dilation: bool = False  # DC5: dilation instead of stride in layer4 (ResNets)
    weights: str | None = None  # local state-dict file; or torchvision's weights name (ResNets) / pretrained (timm)
    train_backbone: bool = True
    norm: str = "frozen"  # frozen (official) | batch (trainable, for training from scratch)
    freeze_stem: bool = True  # the layers before the stride-8 stage (ResNet: stem and layer1) never train (official)
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm: keyword arguments of timm.create_model
    # channels-last memory (docs/backbones.md: faster convolutions on the CPU): true converts the backbone's
    # weights and input; auto converts the input on the CPU only (the convolutions follow it), leaving the
    # GPU path as it was (not measured there); false never
    channels_last: bool | str = "auto"
    # the deepest backbone stage used, by its stride (8 | 16 | 32): 16 stops a ResNet after layer3, and the
    # detector's strided convolutions make the coarser levels (docs/default_run.md: the small model's
    # layer4 cost a third of its backbone's time at 96 pixels)
    max_stride: int = 32
    # the finest backbone stage used, by its stride (8 | 4): 4 adds the stride-4 stage (ResNet layer1) as the
    # finest level, as DINO's 5-scale models do
    min_stride: int = 8

    def __post_init__(self) -> None:
        self.kwargs = _plain(self.kwargs or {})
        if self.channels_last not in CHANNELS_LAST:
            raise ValueError(f"backbone.channels_last must be true, false or auto, got {self.channels_last!r}")
        if self.max_stride not in LEVEL_STRIDES:
            raise ValueError(f"backbone.max_stride must be one of {LEVEL_STRIDES}, got {self.max_stride!r}")
        if self.min_stride not in (FINE_STRIDE, LEVEL_STRIDES[0]):
            raise ValueError(f"backbone.min_stride must be {FINE_STRIDE} or {LEVEL_STRIDES[0]}, got {self.min_stride!r}")


CHECKPOINTING = ("none", "encoder", "all")  # model.checkpointing: which layer stacks recompute in backward


@dataclass
class LayerConfig:
    """What one encoder or decoder layer needs; derived from ``DeformableDETRConfig``."""

    hidden_dim: int
    dim_feedforward: int
    dropout: float
    num_levels: int
    num_heads: int
    num_points: int
    attn_backend: str


@dataclass
class DenoisingConfig:
    """Contrastive denoising (DINO's CDN; ``ddetr.models.denoising``): noised ground-truth boxes and labels as
    extra decoder queries while training, a positive and a negative query per box and group.

    ``num_queries`` is DINO's ``dn_number``: the positive denoising queries of a batch, split into
    ``max(1, num_queries // most boxes of an image in the batch)`` groups (each group holds every box once as a
    positive and once as a negative query). A label is replaced by a random class with probability
    ``label_noise_ratio / 2``; a positive box's corners move by less than ``box_noise_scale`` times half its
    size, a negative's by between one and two times that.
    """

    enabled: bool = False
    num_queries: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 0.4

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ValueError(f"denoising.num_queries must be at least 1, got {self.num_queries}")
        if not 0 <= self.label_noise_ratio <= 1:
            raise ValueError(f"denoising.label_noise_ratio must be in [0, 1], got {self.label_noise_ratio}")
        if self.box_noise_scale < 0:
            raise ValueError(f"denoising.box_noise_scale must be at least 0, got {self.box_noise_scale}")


@dataclass
class HybridConfig:
    """H-DETR's hybrid matching (``ddetr.models.hybrid``): while training, ``num_queries`` more queries
    decode beside the model's own (each set blind to the other in self-attention) and are matched one-to-many
    to the ground truth repeated ``k`` times; their losses (``loss_*_one2many``) weigh ``loss_weight``.
    ``num_queries`` null: five times the model's ``num_queries`` (H-DETR's 1500 beside 300)."""

    enabled: bool = False
    num_queries: int | None = None
    k: int = 6
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.num_queries is not None and self.num_queries < 1:
            raise ValueError(f"hybrid.num_queries must be at least 1 or null, got {self.num_queries}")
        if self.k < 1:
            raise ValueError(f"hybrid.k must be at least 1, got {self.k}")


QUERY_SELECTION = ("pure", "mixed")  # model.query_selection (two-stage)
VARIANTS = ("deformable", "dino")  # model.variant: the decoder and its heads (docs/dino.md)


# the flat official option names of the backbone (official ``args``) -> BackboneConfig fields
_FLAT_BACKBONE = {
    "dilation": "dilation",
    "backbone_weights": "weights",
    "train_backbone": "train_backbone",
    "backbone_norm": "norm",
    "freeze_stem": "freeze_stem",
}


@dataclass
class DeformableDETRConfig:
    """Architecture of Deformable DETR; the defaults are the official multi-scale R-50 model.

    The variants of the paper: single-scale ``num_feature_levels=1``; DC5 ``+ backbone.dilation``;
    multi-scale ``num_feature_levels=4``; ``with_box_refine=True``; two-stage ``two_stage=True``
    (with box refinement).
    """

    num_classes: int = 91  # COCO's 91 category-id slots, as the official checkpoints
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_feature_levels: int = 4
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_queries: int = 300
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    attn_backend: str = "auto"  # auto | pytorch | cpu | cuda
    checkpointing: str = "none"  # none | encoder | all: activation checkpointing of those layers (less memory)
    # DINO-class training switches (docs/convergence.md); all off is the official model
    # the box of decoder layer l is refined from layer l-1's box with its gradient (DINO's look forward twice)
    look_forward_twice: bool = False
    # two-stage: pure (official) takes content and position queries from the top proposals; mixed (DINO) only
    # the references and positions, the content queries are learned (transformer.tgt_embed)
    query_selection: str = "pure"
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    # deformable (official) | dino: DINO's model (ddetr.models.dino_transformer): query positions from the
    # anchors' sine embedding (ref_point_head), a LayerNorm on every decoder layer's output, one class and one
    # box head shared by the layers, proposals ranked by their best class and trained on the real labels
    # (interm_outputs); needs two_stage, with_box_refine and query_selection=mixed
    variant: str = "deformable"
    position_temperature: float = 10000.0  # the sine position encoding's temperature (DINO: 20)

    def __post_init__(self) -> None:
        if isinstance(self.backbone, Mapping):
            self.backbone = _from_mapping(BackboneConfig, self.backbone, "backbone")
        if isinstance(self.denoising, Mapping):
            self.denoising = _from_mapping(DenoisingConfig, self.denoising, "denoising")
        if isinstance(self.hybrid, Mapping):
            self.hybrid = _from_mapping(HybridConfig, self.hybrid, "hybrid")
        if self.query_selection not in QUERY_SELECTION:
            raise ValueError(f"query_selection must be one of {QUERY_SELECTION}, got {self.query_selection!r}")
        if self.query_selection == "mixed" and not self.two_stage:
            raise ValueError("query_selection=mixed selects two-stage proposals: it needs two_stage=true")
        if self.denoising.enabled and not self.two_stage:
            raise ValueError(
                "denoising needs two_stage=true: a denoising query's position embedding comes from its box "
                "through the two-stage position projection (pos_trans)"
            )
        if self.hidden_dim % 32:
            raise ValueError(
                f"hidden_dim must be a multiple of 32 (GroupNorm(32) on the input projections), got {self.hidden_dim}"
            )
        if self.num_feature_levels < 1:
            raise ValueError(f"num_feature_levels must be at least 1, got {self.num_feature_levels}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "dino" and not (
            self.two_stage and self.with_box_refine and self.query_selection == "mixed"
        ):
            raise ValueError("variant=dino needs two_stage=true, with_box_refine=true and query_selection=mixed")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}")

    @property
    def num_one2many_queries(self) -> int:
        """The hybrid branch's one-to-many queries (0 without it)."""
        if not self.hybrid.enabled:
            return 0
        return self.hybrid.num_queries if self.hybrid.num_queries is not None else 5 * self.num_queries

    @property
    def num_backbone_levels(self) -> int:
        """Levels taken from the backbone (strides 8, 16, 32 up to ``backbone.max_stride``; the last
        ones when fewer); the other ``num_feature_levels`` come from strided convolutions in the detector."""
        return min(self.num_feature_levels, len(strides_up_to(self.backbone.max_stride, self.backbone.min_stride)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> DeformableDETRConfig:
        """A config from (possibly partial) values; ``backbone`` may be a dict of ``BackboneConfig``
        fields. Unknown keys raise ``TypeError``."""
        return _from_mapping(cls, {**(values or {}), **overrides}, "model")

    @classmethod
    def from_official(cls, **options: Any) -> DeformableDETRConfig:
        """A config from flat official option names: ``backbone`` is the ResNet name and
        ``dilation``, ``backbone_weights``, ``train_backbone``, ``backbone_norm``, ``freeze_stem``
        set the backbone's fields; every other name is a field of this class."""
        options = dict(options)
        backbone = options.pop("backbone", {})
        backbone = {"name": backbone} if isinstance(backbone, str) else dict(backbone)
        for flat, name in _FLAT_BACKBONE.items():
            if flat in options:
                backbone[name] = options.pop(flat)
        return cls.from_dict(options, backbone=backbone)

    def official_options(self) -> dict[str, Any]:
        """The options the official command line has (``backbone`` as its name, ``dilation``)."""
        values = {name: getattr(self, name) for name in OFFICIAL_OPTIONS if hasattr(self, name)}
        return {**values, "backbone": self.backbone.name, "dilation": self.backbone.dilation}

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the backbone as a dict), as stored in checkpoints."""
        return dataclasses.asdict(self)

    def layer(self, num_points: int) -> LayerConfig:
        """The config of one encoder (``enc_n_points``) or decoder (``dec_n_points``) layer."""
        return LayerConfig(
            hidden_dim=self.hidden_dim,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            num_levels=self.num_feature_levels,
            num_heads=self.nheads,
            num_points=num_points,
            attn_backend=self.attn_backend,
        )


# DeformableDETRConfig fields the official command line does not have (ours: run-time choices and the
# DINO-class training switches)
NOT_OFFICIAL = (
    "num_classes",
    "backbone",
    "aux_loss",
    "attn_backend",
    "checkpointing",
    "look_forward_twice",
    "query_selection",
    "denoising",
    "hybrid",
    "variant",
    "position_temperature",
)
# the architecture options of the official command line (and of the converters): the backbone's name
# and dilation, then every field of DeformableDETRConfig that the official has
OFFICIAL_OPTIONS = (
    "backbone",
    "dilation",
    *(f.name for f in dataclasses.fields(DeformableDETRConfig) if f.name not in NOT_OFFICIAL),
)


CLASS_LOSSES = ("focal", "varifocal", "ia_bce")  # model.loss.class_loss


@dataclass
class LossConfig:
    """Matcher costs, loss weights and the focal loss's alpha and gamma (official names and values)."""

    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0  # the focal loss's exponent, in the loss and the matcher's class cost
    # the class loss: focal (official) | varifocal (RT-DETR: the IoU as the positive's target) | ia_bce
    # (Align-DETR: s^a * IoU^(1-a) as the positive's target); the matcher keeps the focal class cost
    class_loss: str = "focal"
    varifocal_alpha: float = 0.75  # varifocal: the weight of a negative, alpha * p^gamma (RT-DETR's 0.75)
    ia_bce_alpha: float = 0.25  # ia_bce: the exponent a of the score in the target (Align-DETR's 0.25)

    def __post_init__(self) -> None:
        if self.class_loss not in CLASS_LOSSES:
            raise ValueError(f"loss.class_loss must be one of {CLASS_LOSSES}, got {self.class_loss!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None) -> LossConfig:
        return _from_mapping(cls, dict(values or {}), "loss")


@dataclass
class OptimConfig:
    """AdamW with the official parameter groups and learning-rate schedule.

    The official recipe (the defaults) is ``schedule="step"``: the lr x ``lr_drop_gamma`` every
    ``lr_drop`` epochs (StepLR). ``schedule="cosine"`` anneals per step from ``lr`` to
    ``lr * min_lr_factor`` over the whole run (``total_steps``, default: the trainer's
    ``estimated_stepping_batches``); ``schedule="drop"`` keeps ``lr`` and multiplies it by
    ``lr_drop_gamma`` after ``lr_drop_fraction`` of the run's steps. ``warmup_steps`` ramps the lr linearly from ``lr / warmup_steps``
    to ``lr`` over the first optimiser steps, for every schedule (0: no warmup, the official recipe).
    See ``ddetr.training.schedules``.
    """

    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    lr_linear_proj_names: list[str] = field(default_factory=lambda: ["sampling_offsets", "reference_points"])
    # the total batch the lrs were tuned for (the COCO recipe states 32); None: never rescaled
    reference_batch: int | None = None
    lr_scaling: str = "sqrt"  # none | linear | sqrt: how the lrs follow another total batch
    weight_decay: float = 1e-4
    lr_drop: int = 40
    lr_drop_gamma: float = 0.1
    schedule: str = "step"  # step (official, per epoch) | cosine | drop (per step, sized to the run)
    warmup_steps: int = 0
    min_lr_factor: float = 0.01  # cosine: the final lr as a fraction of the initial one
    lr_drop_fraction: float = 0.8  # drop: lr x lr_drop_gamma after this fraction of the run's steps
    total_steps: int | None = None  # cosine: null = the trainer's estimated_stepping_batches
    fused: bool = False  # AdamW's fused kernel (one pass over all parameters; much faster on the CPU)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None) -> OptimConfig:
        return _from_mapping(cls, dict(values or {}), "optim")


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits flat keyword options into (architecture, loss) by the fields of the two configs."""
    loss_names = {f.name for f in dataclasses.fields(LossConfig)}
    architecture = {k: v for k, v in options.items() if k not in loss_names}
    return architecture, {k: v for k, v in options.items() if k in loss_names}
