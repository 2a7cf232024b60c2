"""The LightningModule: Deformable DETR with its criterion, post-processing, optimiser and evaluation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from ddetr.models.build import build_criterion, build_deformable_detr
from ddetr.models.config import DeformableDETRConfig, LossConfig, OptimConfig
from ddetr.models.criterion import TRAINING_ONLY
from ddetr.models.matcher import NonFinitePredictionError
from ddetr.models.postprocess import PostProcess
from ddetr.training.compilation import (
    REDUCE_OVERHEAD,
    bucket_batch,
    compile_options,
    compile_step,
    mark_step_begin,
)
from ddetr.training.lr_scaling import scale_to_batch
from ddetr.training.schedules import lr_schedulers

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite (on any rank) and the run is set to stop."""


@dataclasses.dataclass
class _PendingStep:
    """A training step whose loss finiteness is still on its way to the host (see ``training_step``):
    ``finite`` the host copy of the all-ranks flag (1.0 / 0.0, filled asynchronously), ``ready`` the
    CUDA event after that copy (None on the CPU), the rest what its log and error message need."""

    finite: torch.Tensor
    ready: torch.cuda.Event | None
    total: torch.Tensor
    loss_dict: dict[str, torch.Tensor]
    batch_size: int
    global_step: int
    epoch: int
    batch_idx: int


class DeformableDETRModule(L.LightningModule):
    """Deformable DETR for training, evaluation and prediction.

    Holds ``model`` (``DeformableDETR``), ``criterion`` (``SetCriterion``) and ``postprocess``
    (``PostProcess``). Calling the module on a list of normalised CHW tensors (or an ``(images, mask)``
    pair) returns the model's output dict (``pred_logits``, ``pred_boxes``, ``aux_outputs`` and, for
    two-stage, ``enc_outputs``).

    The architecture is a ``DeformableDETRConfig``, given whole (``config=``) or as its fields
    (``num_classes=5, enc_layers=2, backbone={"name": "resnet18"}``); ``loss`` and ``optim`` are
    ``LossConfig`` / ``OptimConfig`` or dicts of their fields. Missing values take the official
    defaults of those dataclasses. The resolved values are saved as plain hyper-parameters, so
    ``DeformableDETRModule.load_from_checkpoint(path)`` rebuilds the model without Hydra.
    Initialising from another checkpoint (``model.init_from``) belongs to the start of training
    (``ddetr.checkpoints.load_pretrained``), not to the module's identity; so does ``compile``:
    ``False``, ``True`` (the detector's forward through ``torch.compile`` with dynamic shapes) or
    ``"reduce-overhead"`` (the forward and the losses after the matching, CUDA graphs on a GPU); see
    ``ddetr.training.compilation``.
    """

    def __init__(
        self,
        config: DeformableDETRConfig | None = None,
        loss: LossConfig | dict[str, Any] | None = None,
        optim: OptimConfig | dict[str, Any] | None = None,
        num_select: int = 100,
        on_nonfinite_loss: str = "raise",
        label_to_category_id: list[int] | None = None,
        category_names: list[str] | None = None,
        compile: bool | str = False,
        **architecture: Any,
    ) -> None:
        super().__init__()
        if on_nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite_loss must be 'raise' or 'skip', got {on_nonfinite_loss!r}")
        compile_options(compile)  # an unknown setting fails here, before anything is built
        if architecture.pop("init_from", None):  # saved by earlier checkpoints: the weights are in the checkpoint
            log.debug("ignoring the init_from hyper-parameter of an older checkpoint")
        base = config.to_dict() if config is not None else {}
        self.config = DeformableDETRConfig.from_dict(base, **architecture)
        self.loss_cfg = loss if isinstance(loss, LossConfig) else LossConfig.from_dict(loss)
        self.optim_cfg = optim if isinstance(optim, OptimConfig) else OptimConfig.from_dict(optim)
        num_classes = self.config.num_classes
        self.label_to_category_id = list(label_to_category_id or range(num_classes))
        self.category_names = list(category_names or [str(c) for c in self.label_to_category_id])
        # plain values only: checkpoints stay loadable with weights_only=True and without Hydra
        architecture = self.config.to_dict()
        # initial weights (a file, a download) belong to the start of training: the checkpoint holds the trained ones
        architecture["backbone"]["weights"] = None
        self.save_hyperparameters(
            {
                **architecture,
                "loss": dataclasses.asdict(self.loss_cfg),
                "optim": dataclasses.asdict(self.optim_cfg),
                "num_select": num_select,
                "on_nonfinite_loss": on_nonfinite_loss,
                "label_to_category_id": self.label_to_category_id,
                "category_names": self.category_names,
            }
        )
        self.model = build_deformable_detr(self.config)
        self.criterion = build_criterion(self.config, self.loss_cfg)
        self.postprocess = PostProcess(num_select=num_select)
        self.on_nonfinite_loss = on_nonfinite_loss
        self.evaluator = None  # a CocoEvaluator, attached in setup() from the data module
        # a run-time choice, not part of the saved model: a compiled forward is a function, not a
        # submodule, so the state dict names (and checkpoints) are the eager model's
        self.compile_setting = compile  # not self.compile: that is nn.Module.compile
        self._compiled_forward = compile_step(self.model, self.criterion, compile)
        self._pending: _PendingStep | None = None  # the previous training step, read late (training_step)
        self._buffers_before_step: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    @property
    def detector(self) -> Callable[..., dict[str, Any]]:
        """What the steps call: the detector's compiled forward (``compile``), else ``model``."""
        return self._compiled_forward or self.model

    # ------------------------------------------------------------------ inference
    def forward(self, images: list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        """Runs the detector; see ``DeformableDETR.forward`` for the output keys and shapes."""
        return self.detector(images)

    @torch.no_grad()
    def predict_images(self, images: list[torch.Tensor], orig_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections for normalised images, boxes scaled to ``orig_sizes`` (batch_size, 2) as (h, w)."""
        return self.postprocess(self(images), orig_sizes)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int):
        """The loss of one batch; a non-finite loss (on any rank) stops the run or skips the step
        (``on_nonfinite_loss``).

        With a fused AdamW optimizer the finiteness never stalls the step: the all-ranks flag stays on
        the device, where it makes the optimizer skip the update (``found_inf``) and (skip mode) keeps
        the batch norm statistics of before the step; its copy to the host, made without blocking, is read at
        the start of the next step (or before validation, at the end of the epoch), long after it
        arrived. There the error is raised or the skip logged, naming the step it happened in, and a
        finite step's loss is logged. Other optimizers cannot skip an update on the device, so for
        them the flag is read in the step itself.
        """
        self._settle_pending_step()
        mark_step_begin(self.compile_setting)  # the previous step's values are read: CUDA graphs may reuse them
        images, mask, targets = batch
        images, mask = bucket_batch(self.compile_setting, images, mask)  # reduce-overhead: few image shapes
        deferred = self._fused_optimizer() is not None
        # a skipped step must leave no trace, also in the running statistics of batch norm
        buffers = {k: v.clone() for k, v in self.model.named_buffers()} if self.on_nonfinite_loss == "skip" else None
        # denoising builds extra queries from the targets; otherwise the detector sees the images only
        outputs = self.detector((images, mask), targets) if self.config.denoising.enabled else self.detector((images, mask))
        try:
            loss_dict = self.criterion(outputs, targets)
            total = self.criterion.weighted_total(loss_dict)
        except NonFinitePredictionError:  # cannot be matched: report the predictions as the bad terms
            if deferred:  # every rank still runs backward (DDP): a NaN loss with a graph, update skipped
                total = (outputs["pred_logits"].sum() + outputs["pred_boxes"].sum()) * float("nan")
            else:
                total = torch.full((), float("nan"), device=images.device)
            loss_dict = {name: total.detach() for name in ("pred_logits", "pred_boxes")}
        batch_size = images.shape[0]
        if deferred:
            self._defer_finiteness(total, loss_dict, buffers, batch_size, batch_idx)
            return total
        if not self._all_ranks_finite(total):
            message = self._nonfinite_message(total, loss_dict, self.global_step, self.current_epoch, batch_idx)
            if self.on_nonfinite_loss == "skip":
                log.warning("%s; skipping the step", message)
                with torch.no_grad():
                    for name, value in self.model.named_buffers():
                        value.copy_(buffers[name])
                self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum", on_step=False, on_epoch=True)
                return None
            raise NonFiniteLossError(message)
        self._log_training_loss(total, loss_dict, batch_size, on_step=True)
        return total

    def _log_training_loss(self, total, loss_dict, batch_size: int, on_step: bool) -> None:
        self.log("train/loss", total, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=batch_size)
        main_terms = {f"train/{k}": v for k, v in loss_dict.items() if "_" not in k.removeprefix("loss_")}
        # the training-only branches' last-layer terms, each beside its matching twin (loss_ce_dn, ...)
        main_terms.update({f"train/{k}": v for k, v in loss_dict.items() if k.endswith(TRAINING_ONLY)})
        self.log_dict(main_terms, on_step=False, on_epoch=True, batch_size=batch_size)

    @staticmethod
    def _nonfinite_message(total, loss_dict, global_step: int, epoch: int, batch_idx: int) -> str:
        bad = sorted(k for k, v in loss_dict.items() if not torch.isfinite(v).all())
        return (
            f"non-finite training loss at global step {global_step} (epoch {epoch}, "
            f"batch {batch_idx}): total={total.item()}; non-finite terms on this rank: {bad or 'none'}"
        )

    def _fused_optimizer(self) -> torch.optim.Optimizer | None:
        """The fused AdamW of the running fit (it can skip an update on the device), else None."""
        if self._trainer is None or not self.trainer.training or len(self.trainer.optimizers) != 1:
            return None
        optimizer = self.trainer.optimizers[0]
        fused = isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))
        return optimizer if fused else None

    def _defer_finiteness(self, total, loss_dict, buffers, batch_size: int, batch_idx: int) -> None:
        """The device side of a step whose finiteness is read later: the all-ranks flag, the optimizer's
        ``found_inf``, the batch norm statistics of before the step when non-finite, the host copy."""
        with torch.no_grad():
            finite = torch.isfinite(total.detach()).to(torch.float32)  # () 1.0 or 0.0
            if self.trainer.world_size > 1 and torch.distributed.is_initialized():  # all ranks skip or stop together
                # directly, not strategy.reduce: that adds a barrier, which waits on the host
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            self._fused_optimizer().found_inf = 1.0 - finite  # the fused kernel skips the update at 1
            # backward still needs the buffers of this forward: restored after it (on_after_backward)
            self._buffers_before_step = (finite.bool(), buffers) if buffers is not None else None
            host = finite.to("cpu", non_blocking=True)  # from a GPU into pinned memory: nothing waits
            ready = None
            if finite.is_cuda:
                ready = torch.cuda.Event()
                ready.record()
        detached = {name: value.detach() for name, value in loss_dict.items()}
        if self.compile_setting == REDUCE_OVERHEAD and detached:  # read next step: copied out of CUDA graph memory
            detached = dict(zip(detached, torch.stack(list(detached.values())).unbind()))  # one copy
        self._pending = _PendingStep(
            host, ready, total.detach(), detached, batch_size, self.global_step, self.current_epoch, batch_idx
        )

    def on_after_backward(self) -> None:
        """Deferred check, skip mode: a non-finite step keeps the batch norm statistics of before it."""
        kept, self._buffers_before_step = self._buffers_before_step, None
        if kept is None:
            return
        finite, buffers = kept
        with torch.no_grad():
            for name, value in self.model.named_buffers():
                value.copy_(torch.where(finite, value, buffers[name]))

    def _settle_pending_step(self, where: str = "step") -> None:
        """Reads the previous step's finiteness (arrived long ago) and logs its loss, or its skip, or
        raises ``NonFiniteLossError`` for it. ``where``: "step" (start of the next step), "epoch" (end of
        the epoch: metrics on the epoch only), "validation" (before validating inside fit: only an error
        is settled, the rest waits for the epoch's end), "end" (end of training: no metric can be logged,
        a skip is only warned about)."""
        pending = self._pending
        if pending is None:
            return
        if pending.ready is not None:
            pending.ready.synchronize()
        finite = bool(pending.finite)
        if where == "validation" and (finite or self.on_nonfinite_loss == "skip"):
            return
        self._pending = None
        if finite:
            if where != "end":
                self._log_training_loss(pending.total, pending.loss_dict, pending.batch_size, on_step=where == "step")
            return
        message = self._nonfinite_message(
            pending.total, pending.loss_dict, pending.global_step, pending.epoch, pending.batch_idx
        )
        if self.on_nonfinite_loss == "raise":
            raise NonFiniteLossError(message)
        log.warning("%s; skipped the step", message)
        if where != "end":
            self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum", on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        self._settle_pending_step("epoch")

    def on_validation_start(self) -> None:
        if self._trainer is not None and self.trainer.training:  # validation inside fit
            self._settle_pending_step("validation")

    def on_train_end(self) -> None:  # stopped mid-epoch (max_steps): the last step
        self._settle_pending_step("end")

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
            from ddetr.training.evaluation import CocoEvaluator

            self.evaluator = CocoEvaluator(datamodule.val_coco, datamodule.label_to_category_id)

    def on_validation_epoch_start(self) -> None:
        if self.evaluator is not None:
            self.evaluator.reset()

    def validation_step(self, batch, batch_idx: int) -> dict[str, Any]:
        """Logs the validation loss and feeds the detections (original-image coordinates) to the
        evaluator; returns ``{"detections": list of {scores, labels, boxes}}`` for callbacks."""
        images, mask, targets = batch
        images, mask = bucket_batch(self.compile_setting, images, mask)  # reduce-overhead: few image shapes
        mark_step_begin(self.compile_setting)
        outputs = self.detector((images, mask))
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
        # every rank holds the gathered result, so no further reduction is needed; undefined metrics
        # (None: no ground truth of that size) are not logged, so no curve shows them as zeros
        defined = {f"val/{k}": float(v) for k, v in metrics.items() if v is not None}
        self.log_dict(defined, sync_dist=False, rank_zero_only=False)

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
            elif any(key in name for key in cfg.lr_linear_proj_names):
                groups["linear_proj"].append(param)
            else:
                groups["rest"].append(param)
        lrs = {
            "backbone": cfg.lr_backbone,
            "linear_proj": cfg.lr * cfg.lr_linear_proj_mult,
            "rest": cfg.lr,
        }
        return [{"params": params, "lr": lrs[name], "name": name} for name, params in groups.items() if params]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clips as Lightning does (``trainer.gradient_clip_val``, ``gradient_clip_algorithm``), also for the
        fused AdamW (``optim.fused``) under mixed precision, which Lightning refuses.

        A fused optimiser unscales the gradients inside its step (``_step_supports_amp_scaling``), so Lightning
        cannot clip them first. Without a gradient scaler (``bf16-mixed``, and ``16-mixed`` on the CPU) the
        gradients are not scaled at all and clip as they are; with one (``16-mixed`` on a GPU) they are
        unscaled here first, and ``GradScaler.step`` then hands the fused step unscaled gradients (and skips the
        step when they hold inf or NaN)."""
        if not gradient_clip_val:
            return
        precision = self.trainer.precision_plugin
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        scaler = getattr(precision, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if gradient_clip_algorithm == "value":
            precision.clip_grad_by_value(optimizer, gradient_clip_val)
        else:
            precision.clip_grad_by_norm(optimizer, gradient_clip_val)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        groups = scale_to_batch(self.param_groups(), cfg.reference_batch, cfg.lr_scaling, self._trainer)
        fused = {"fused": True} if cfg.fused else {}  # else PyTorch's default implementation
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        schedulers = lr_schedulers(optimizer, cfg, total_steps)
        if len(schedulers) == 1:  # the official recipe: {"optimizer", "lr_scheduler": StepLR per epoch}
            return {"optimizer": optimizer, "lr_scheduler": schedulers[0]}
        return [optimizer], schedulers
