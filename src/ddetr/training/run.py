"""Training and evaluation runs as plain functions of a composed config (``train(cfg)``,
``evaluate(cfg)``); the entry points ``python -m ddetr.train`` and ``python -m ddetr.eval`` call them."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddetr.models.backbones.weights import load_backbone_weights
from ddetr.models.ms_deform_attn import attention_backend, set_attention_backend
from ddetr.training.callbacks import Preempted, RunTimer, WeightEMA, early_stopping, slurm_job_id
from ddetr.checkpoints import (
    CheckpointError,
    check_resume_checkpoint,
    load_module,
    load_pretrained,
    trust_checkpoint,
)
from ddetr.training.compilation import compile_options
from ddetr.training.evaluation import METRIC_NAMES
from ddetr.training.evaluation_pictures import write_evaluation_pictures, write_final_pictures
from ddetr.training.run_directory import resumable_checkpoint

log = logging.getLogger(__name__)

FINAL_METRICS = ("val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl")


class RunConfigError(ValueError):
    """A combination of settings the run refuses before it starts; the message is one line saying what to change."""


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiates every entry of a config group that has a ``_target_`` (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_module(cfg: DictConfig, datamodule) -> L.LightningModule:
    """The LightningModule from ``cfg.model``, with the class count and category ids from the data,
    initialised from ``cfg.model.init_from`` when given (and not resuming from ``cfg.ckpt_path``, whose
    weights replace the initial ones: neither ``init_from`` nor ``model.backbone.weights`` is read then)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    try:
        compile_options(model_cfg.get("compile", False))
    except ValueError as error:  # one line naming the allowed settings
        raise RunConfigError(str(error)) from None
    init_from = model_cfg.pop("init_from", None)  # the start of training, not part of the model
    backbone = model_cfg.get("backbone") if isinstance(model_cfg.get("backbone"), dict) else {}
    if cfg.get("ckpt_path") and backbone:
        backbone["weights"] = None  # initial weights: a resumed run takes its weights from ckpt_path
    trusted_weights = trusted_weights_file(backbone, trust_checkpoint(cfg))
    try:
        module = instantiate(
            model_cfg,
            num_classes=model_cfg.get("num_classes") or datamodule.num_classes,
            label_to_category_id=list(datamodule.label_to_category_id),
            category_names=list(datamodule.category_names),
            _convert_="all",
        )
    except InstantiationException as error:  # a refused or unreadable weights file: its own one line
        cause = error.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, CheckpointError):
            raise cause from None
        raise
    if trusted_weights:
        network = module.model.backbone.body
        load_backbone_weights(network, trusted_weights, f"backbone {backbone.get('name')}", trust=True)
    if init_from and not cfg.get("ckpt_path"):  # a resumed run takes its weights from ckpt_path
        load_pretrained(module.model, init_from, trust=trust_checkpoint(cfg))
    return module


def trusted_weights_file(backbone: dict[str, Any], trust: bool) -> str | None:
    """With ``trust_checkpoint=true``, the local ``model.backbone.weights`` file, taken out of ``backbone`` (the
    model is built without it and ``build_module`` loads it, unpickled in full); else None, and the backbone
    reads its file itself, weights-only (a download name is not a file and stays)."""
    weights = backbone.get("weights")
    if not trust or not weights or not Path(weights).is_file():
        return None
    backbone["weights"] = None
    return str(weights)


def attention_backend_used(module: L.LightningModule) -> str:
    """Which implementation of the deformable attention op the module's forward uses, in words."""
    from ddetr.ops import compiled_op_available

    device = module.device.type
    if attention_backend(module.model) == "pytorch":
        return "the PyTorch path (model.attn_backend=pytorch)"
    if compiled_op_available(device):
        return f"the compiled {device} op"
    return "the PyTorch fallback (the compiled op is unavailable, see the warning above)"


UNDEFINED_NOTE = (
    "n/a: undefined, not zero - the data has no ground-truth box in that size range (pycocotools returns -1; "
    "s: area < 32x32 pixels, m: 32x32 to 96x96, l: > 96x96), so there is nothing to score"
)


def format_metrics(metrics: dict[str, float | None]) -> str:
    """An aligned two-column table of metric name and value; undefined metrics (None) read ``n/a``,
    explained once under the table."""
    width = max((len(name) for name in metrics), default=0)
    rows = [f"{name:<{width}}  {'n/a' if value is None else f'{value:.4f}':>10}" for name, value in metrics.items()]
    lines = ["-" * (width + 12), *rows, "-" * (width + 12)]
    if any(value is None for value in metrics.values()):
        lines.append(UNDEFINED_NOTE)
    return "\n".join(lines)


def format_per_class(per_class: dict[str, dict[str, float | int | None]]) -> str:
    """The per-class table: class name, AP, AP50 and the number of ground-truth boxes."""
    width = max([len(name) for name in per_class] + [5])

    def cell(value):
        return f"{'n/a' if value is None else f'{value:.4f}':>8}"

    lines = [f"{'class':<{width}}  {'AP':>8}  {'AP50':>8}  {'GT boxes':>8}", "-" * (width + 32)]
    lines += [
        f"{name:<{width}}  {cell(row['AP'])}  {cell(row['AP50'])}  {row['num_gt']:>8}"
        for name, row in per_class.items()
    ]
    return "\n".join(lines)


def with_undefined(metrics: dict[str, float], evaluator) -> dict[str, float | None]:
    """``metrics`` plus ``None`` for every ``val/`` metric the evaluator's last computation found undefined
    (those are not logged, so they are missing from Lightning's metrics)."""
    last = getattr(evaluator, "last_metrics", None) or {}
    return {**metrics, **{f"val/{name}": None for name, value in last.items() if value is None}}


def report_metrics(
    metrics: dict[str, float | None], evaluator, path: Path | None, title: str, extra: dict[str, Any]
) -> None:
    """Prints the metrics table and the per-class table and, given a ``path``, writes them there as JSON
    (undefined metrics as null, ``per_class`` keyed by class name, plus ``extra``)."""
    per_class = dict(getattr(evaluator, "per_class", None) or {})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**metrics, **extra, "per_class": per_class}, indent=2))
        title += f" (also in {path})"
    print(f"\n{title}:\n{format_metrics(metrics)}")
    if per_class:
        print(f"\nPer class (AP at IoU 0.50:0.95 and 0.50, all sizes):\n{format_per_class(per_class)}")


def resume_path(cfg: DictConfig) -> str | None:
    """``cfg.ckpt_path``, where ``auto`` (the default under SLURM, so a requeued job resumes by itself) is the
    newest of ``checkpoints/preempted.ckpt`` and ``checkpoints/last.ckpt`` in the run directory, or None.

    Outside SLURM the run directory of ``ckpt_path=auto`` is the newest unfinished run of the same overrides
    (``ddetr.app.run_dir``), so this finds that run's checkpoint; one line says which, or that none was found
    and the run starts fresh."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None and slurm_job_id() is not None:
        ckpt_path = "auto"
    if ckpt_path != "auto":
        return ckpt_path
    run_dir = Path(cfg.paths.output_dir)
    newest = resumable_checkpoint(run_dir)
    if newest is None:
        log.warning(
            "ckpt_path=auto: no unfinished run of these overrides with a checkpoint under %s: starting fresh in %s",
            run_dir.parent,
            run_dir,
        )
        return None
    log.warning("ckpt_path=auto: resuming from %s (the unfinished run %s, in its own directory)", newest, run_dir)
    return str(newest)


def run_end_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks of the top-level ``ema`` and ``early_stopping`` nodes that are on (``WeightEMA``,
    Lightning's ``EarlyStopping`` on val/AP)."""
    callbacks: list[L.Callback] = []
    ema, stopping = cfg.get("ema") or {}, cfg.get("early_stopping") or {}
    try:
        if ema.get("decay") is not None:
            callbacks.append(WeightEMA(ema.decay, ema.get("update_every_n_steps", 1), ema.get("warmup_steps", 0)))
        stopper = early_stopping(stopping.get("patience"), stopping.get("min_delta", 0.0))
    except ValueError as error:  # a setting out of range: one line naming it
        raise RunConfigError(str(error)) from None
    if stopper is not None:
        callbacks.append(stopper)
    return callbacks


def check_validation_setup(trainer: L.Trainer, datamodule, cfg: DictConfig) -> None:
    """Raises ``RunConfigError`` for settings that cannot work together, before anything starts: early stopping
    without validation; more ranks than validation images (a rank without images would skip the validation
    loop and leave its peers waiting in the gathering of the detections)."""
    validates = trainer.limit_val_batches != 0
    if (cfg.get("early_stopping") or {}).get("patience") is not None and not validates:
        raise RunConfigError("early_stopping.patience needs validation, but trainer.limit_val_batches=0")
    num_val = len(datamodule.val_dataset)
    if validates and trainer.world_size > num_val:
        raise RunConfigError(
            f"{num_val} validation image(s) for {trainer.world_size} ranks: every rank needs at least one; "
            f"use at most {num_val} devices (trainer.devices, trainer.num_nodes) or more validation images"
        )


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    """Trains (validating every ``trainer.check_val_every_n_epoch`` epochs and after the final step) as
    ``cfg`` says; returns the final validation metrics.

    However the fit ends (``max_epochs``, ``max_steps``, early stopping, the time limit ``max_time``), its final
    weights are validated inside the fit and saved as ``checkpoints/last.ckpt`` (``LastCheckpoint``).
    ``extra_callbacks`` run before the configured ones (notebooks, tests)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    trust = trust_checkpoint(cfg)
    cfg.ckpt_path = resume_path(cfg)
    if cfg.ckpt_path:
        check_resume_checkpoint(cfg.ckpt_path, trust=trust)  # one clear line instead of torch's zip error
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    timer = RunTimer()
    callbacks = [*extra_callbacks, *instantiate_group(cfg.get("callbacks")), *run_end_callbacks(cfg), timer]
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_validation_setup(trainer, datamodule, cfg)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        # weights_only=True: Lightning reads ckpt_path through AtomicCheckpointIO, weights-only unless trusted
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=not trust)
    except Preempted as stop:
        log.warning("%s", stop)
        print(f"\nTraining {stop}")
        return {}
    if timer.validated_at_step != trainer.global_step and trainer.limit_val_batches:
        # the fit trained no step (resumed from a run that had ended): the table is of the checkpoint's weights
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the timer counts it too
        timer.stop()

    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics = dict(sorted(with_undefined(logged, module.evaluator).items()))
    if trainer.is_global_zero:
        final = {name: metrics[name] for name in FINAL_METRICS if name in metrics}
        path = Path(cfg.paths.output_dir) / cfg.metrics_file if cfg.get("metrics_file") else None
        timing = {
            "wall_s": round(timer.total_s, 1),
            "validation_s": round(timer.validation_s, 1),
            "steps": trainer.global_step,
            "stopped": timer.stop_reason,
        }
        pictures = write_final_pictures(trainer, module.evaluator, cfg.paths.output_dir, cfg.get("confusion_threshold"))
        report_metrics(
            final or metrics,
            module.evaluator,
            path,
            "Final validation metrics",
            {"all": metrics, "epochs": trainer.current_epoch, **timing, **pictures},
        )
        print(f"{timer.summary()} Deformable attention: {attention_backend_used(module)}.")
    return metrics


def check_categories(module, datamodule, ckpt_path: str) -> None:
    """Raises ``ValueError`` when the checkpoint's heads do not match the data's categories."""
    model_classes = int(module.hparams.num_classes)
    if model_classes != datamodule.num_classes:
        raise ValueError(
            f"{ckpt_path}: the model has {model_classes} classes but the data has {datamodule.num_classes} "
            f"(category_mapping={datamodule.category_mapping!r}); COCO with official checkpoints needs "
            "data.category_mapping=coco91"
        )
    if list(module.label_to_category_id) != list(datamodule.label_to_category_id):
        log.warning(
            "%s: the checkpoint's category ids differ from the data's; evaluating with the data's mapping",
            ckpt_path,
        )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validates ``cfg.ckpt_path`` on ``cfg.data``; returns the COCO metrics (``val/AP`` ...)."""
    if cfg.get("model_file") is not None or cfg.get("ckpt_path") is None:  # an exported model instead
        from ddetr.inference.evaluate import evaluate_exported

        return evaluate_exported(cfg)
    datamodule = instantiate(cfg.data)
    module = load_module(cfg.ckpt_path, "cpu", trust=trust_checkpoint(cfg))
    if cfg.get("attn_backend"):
        set_attention_backend(module.model, cfg.attn_backend)
    check_categories(module, datamodule, cfg.ckpt_path)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    check_validation_setup(trainer, datamodule, cfg)
    trainer.validate(module, datamodule=datamodule)

    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    found = with_undefined(logged, module.evaluator)
    metrics = {name: found[name] for name in (f"val/{n}" for n in METRIC_NAMES) if name in found}
    if "val/loss" in trainer.callback_metrics:
        metrics["val/loss"] = float(trainer.callback_metrics["val/loss"])
    if trainer.is_global_zero:
        output = Path(cfg.paths.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        if module.evaluator is not None and cfg.get("results_file"):
            (output / cfg.results_file).write_text(json.dumps(module.evaluator.results_json()))
        path = output / cfg.metrics_file if cfg.get("metrics_file") else None
        pictures = write_evaluation_pictures(module.evaluator, output, cfg.get("confusion_threshold"))
        report_metrics(
            metrics,
            module.evaluator,
            path,
            f"COCO metrics of {cfg.ckpt_path}",
            {"checkpoint": str(cfg.ckpt_path), **pictures},
        )
    return metrics
