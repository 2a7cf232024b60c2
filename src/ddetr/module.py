"""The LightningModule: Deformable DETR with its criterion, post-processing, optimiser and evaluation."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from torch import nn

from ddetr.models.build import build_deformable_detr
from ddetr.models.criterion import build_criterion
from ddetr.models.postprocess import PostProcess

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = {
    "name": "resnet50",
    "dilation": False,
    "weights": None,
    "train_backbone": True,
    "norm": "frozen",
    "freeze_stem": True,
}
DEFAULT_LOSS = {
    "set_cost_class": 2.0,
    "set_cost_bbox": 5.0,
    "set_cost_giou": 2.0,
    "cls_loss_coef": 2.0,
    "bbox_loss_coef": 5.0,
    "giou_loss_coef": 2.0,
    "focal_alpha": 0.25,
}
DEFAULT_OPTIM = {
    "lr": 2e-4,
    "lr_backbone": 2e-5,
    "lr_linear_proj_mult": 0.1,
    "lr_linear_proj_names": ["sampling_offsets", "reference_points"],
    "weight_decay": 1e-4,
    "lr_drop": 40,
    "lr_drop_gamma": 0.1,
}


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite (on any rank) and the run is set to stop."""


class DeformableDETRModule(L.LightningModule):
    """Deformable DETR for training, evaluation and prediction.

    Holds ``model`` (``DeformableDETR``), ``criterion`` (``SetCriterion``) and ``postprocess``
    (``PostProcess``). Calling the module on a list of normalised CHW tensors (or an ``(images, mask)``
    pair) returns the model's output dict (``pred_logits``, ``pred_boxes``, ``aux_outputs`` and, for
    two-stage, ``enc_outputs``).

    The architecture options use the official names. ``backbone``, ``loss`` and ``optim`` are dicts
    whose missing keys take the official defaults (``DEFAULT_BACKBONE``, ``DEFAULT_LOSS``,
    ``DEFAULT_OPTIM``). Every constructor argument is saved as a hyper-parameter, so
    ``DeformableDETRModule.load_from_checkpoint(path)`` rebuilds the model without any config.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: dict[str, Any] | None = None,
        num_feature_levels: int = 4,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_queries: int = 300,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        with_box_refine: bool = False,
        two_stage: bool = False,
        aux_loss: bool = True,
        attn_backend: str = "auto",
        loss: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        num_select: int = 100,
        on_nonfinite_loss: str = "raise",
        init_from: str | None = None,
        label_to_category_id: list[int] | None = None,
        category_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if on_nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite_loss must be 'raise' or 'skip', got {on_nonfinite_loss!r}")
        self.save_hyperparameters()
        backbone_cfg = {**DEFAULT_BACKBONE, **(backbone or {})}
        self.loss_cfg = {**DEFAULT_LOSS, **(loss or {})}
        self.optim_cfg = {**DEFAULT_OPTIM, **(optim or {})}
        self.model = build_deformable_detr(
            num_classes=num_classes,
            backbone=backbone_cfg["name"],
            dilation=backbone_cfg["dilation"],
            backbone_weights=backbone_cfg["weights"],
            train_backbone=backbone_cfg["train_backbone"],
            backbone_norm=backbone_cfg["norm"],
            freeze_stem=backbone_cfg["freeze_stem"],
            num_feature_levels=num_feature_levels,
            hidden_dim=hidden_dim,
            nheads=nheads,
            enc_layers=enc_layers,
            dec_layers=dec_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            num_queries=num_queries,
            enc_n_points=enc_n_points,
            dec_n_points=dec_n_points,
            with_box_refine=with_box_refine,
            two_stage=two_stage,
            aux_loss=aux_loss,
            attn_backend=attn_backend,
        )
        self.criterion = build_criterion(
            num_classes=num_classes,
            dec_layers=dec_layers,
            aux_loss=aux_loss,
            two_stage=two_stage,
            **self.loss_cfg,
        )
        self.postprocess = PostProcess(num_select=num_select)
        self.label_to_category_id = label_to_category_id or list(range(num_classes))
        self.category_names = category_names or [str(c) for c in self.label_to_category_id]
        self.on_nonfinite_loss = on_nonfinite_loss
        self.evaluator = None  # a CocoEvaluator, attached in setup() from the data module
        if init_from:
            load_pretrained(self.model, init_from)

    # ------------------------------------------------------------------ inference
    def forward(self, images: list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        """Runs the detector; see ``DeformableDETR.forward`` for the output keys and shapes."""
        return self.model(images)

    @torch.no_grad()
    def predict_images(
        self, images: list[torch.Tensor], orig_sizes: torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        """Detections for normalised images, boxes scaled to ``orig_sizes`` (batch_size, 2) as (h, w)."""
        return self.postprocess(self(images), orig_sizes)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int):
        images, mask, targets = batch
        # a skipped step must leave no trace, also in the running statistics of batch norm
        buffers = {k: v.clone() for k, v in self.model.named_buffers()} if self.on_nonfinite_loss == "skip" else None
        outputs = self.model((images, mask))
        if _all_finite(outputs):
            loss_dict = self.criterion(outputs, targets)
            total = self.criterion.weighted_total(loss_dict)
        else:  # the matcher cannot match non-finite predictions: report them as the bad terms
            total = torch.full((), float("nan"), device=images.device)
            loss_dict = {name: total for name in ("pred_logits", "pred_boxes")}
        if not self._all_ranks_finite(total):
            bad = sorted(k for k, v in loss_dict.items() if not torch.isfinite(v).all())
            message = (
                f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}): total={total.item()}; non-finite terms on this rank: {bad or 'none'}"
            )
            if self.on_nonfinite_loss == "skip":
                log.warning("%s; skipping the step", message)
                with torch.no_grad():
                    for name, value in self.model.named_buffers():
                        value.copy_(buffers[name])
                self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum", on_step=False, on_epoch=True)
                return None
            raise NonFiniteLossError(message)
        batch_size = images.shape[0]
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        main_terms = {f"train/{k}": v for k, v in loss_dict.items() if "_" not in k.removeprefix("loss_")}
        self.log_dict(main_terms, on_step=False, on_epoch=True, batch_size=batch_size)
        return total

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        """True only when the loss is finite on every rank, so all ranks stop or skip together."""
        finite = bool(torch.isfinite(loss).item())
        if self.trainer is None or self.trainer.world_size == 1:
            return finite
        return bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))

    # ------------------------------------------------------------------ validation
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and stage in ("fit", "validate") and hasattr(datamodule, "val_coco"):
            from ddetr.evaluation import CocoEvaluator

            self.evaluator = CocoEvaluator(datamodule.val_coco, datamodule.label_to_category_id)

    def on_validation_epoch_start(self) -> None:
        if self.evaluator is not None:
            self.evaluator.reset()

    def validation_step(self, batch, batch_idx: int) -> dict[str, Any]:
        """Logs the validation loss and feeds the detections (original-image coordinates) to the
        evaluator; returns ``{"detections": list of {scores, labels, boxes}}`` for callbacks."""
        images, mask, targets = batch
        outputs = self.model((images, mask))
        # ranks may run different numbers of val steps: nothing collective per step
        loss_dict = self.criterion(outputs, targets, sync_num_boxes=False)
        total = self.criterion.weighted_total(loss_dict)
        batch_size = images.shape[0]
        self.log("val/loss", total, on_epoch=True, sync_dist=True, batch_size=batch_size)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        detections = self.postprocess(outputs, orig_sizes)
        if self.evaluator is not None:
            self.evaluator.update({int(t["image_id"]): d for t, d in zip(targets, detections)})
        return {"detections": detections}

    def on_validation_epoch_end(self) -> None:
        if self.evaluator is None or self.trainer.sanity_checking:
            return
        self.evaluator.synchronize()
        metrics = self.evaluator.compute()
        # every rank holds the gathered result, so no further reduction is needed
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()}, sync_dist=False, rank_zero_only=False)

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """The official parameter groups: backbone at ``lr_backbone``, sampling offsets and reference
        points at ``lr * lr_linear_proj_mult``, everything else at ``lr``."""
        cfg = self.optim_cfg
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "linear_proj": [], "rest": []}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("backbone."):
                groups["backbone"].append(param)
            elif any(key in name for key in cfg["lr_linear_proj_names"]):
                groups["linear_proj"].append(param)
            else:
                groups["rest"].append(param)
        lrs = {
            "backbone": cfg["lr_backbone"],
            "linear_proj": cfg["lr"] * cfg["lr_linear_proj_mult"],
            "rest": cfg["lr"],
        }
        return [{"params": params, "lr": lrs[name], "name": name} for name, params in groups.items() if params]

    def configure_optimizers(self):
        cfg = self.optim_cfg
        optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg["lr_drop"], gamma=cfg["lr_drop_gamma"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _all_finite(outputs: dict[str, Any]) -> bool:
    """Whether every predicted logit and box (final, auxiliary and encoder outputs) is finite."""
    heads = [outputs, *outputs.get("aux_outputs", []), outputs.get("enc_outputs", {})]
    checks = [torch.isfinite(head[key]).all() for head in heads for key in ("pred_logits", "pred_boxes") if key in head]
    return bool(torch.stack(checks).all())  # one device sync per step, not one per tensor


CLASS_HEAD_MARKERS = ("class_embed",)


def load_pretrained(model: nn.Module, path: str) -> None:
    """Initialises ``model`` from a ddetr checkpoint (e.g. one written by ``python -m ddetr.convert``).

    Class-head weights whose shape differs (another number of classes) are left at their fresh
    initialisation with a warning; any other missing or mismatched weight is an error naming it.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"model.init_from: no checkpoint at {path}") from None
    if "state_dict" in checkpoint:  # a Lightning checkpoint: keep the detector's weights
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    else:  # a plain state dict of DeformableDETR
        state = dict(checkpoint)
    own = model.state_dict()
    reinitialised = []
    for key in list(state):
        if key in own and own[key].shape != state[key].shape:
            if any(marker in key for marker in CLASS_HEAD_MARKERS):
                reinitialised.append(key)
                del state[key]
            else:
                raise ValueError(
                    f"{path}: weight {key} has shape {tuple(state[key].shape)}, the model expects {tuple(own[key].shape)}"
                )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in reinitialised]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    if reinitialised:
        log.warning(
            "%s: the number of classes differs; re-initialised the class heads (%s)", path, ", ".join(reinitialised)
        )

