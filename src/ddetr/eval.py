"""Evaluation entry point: ``python -m ddetr.eval ckpt_path=CKPT [data=coco data.data_dir=DIR]``.

Runs Lightning's ``trainer.validate`` with the checkpoint's module on the data module's val split,
prints the COCO metrics table and writes into the run directory ``results.json`` (the detections in
the COCO results format, ``CocoEvaluator.results_json()``) and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from ddetr.config import CONFIG_DIR, register_resolvers
from ddetr.evaluation import METRIC_NAMES
from ddetr.models.ms_deform_attn import set_attention_backend
from ddetr.predict import load_module
from ddetr.train import format_metrics

log = logging.getLogger(__name__)


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
    datamodule = instantiate(cfg.data)
    module = load_module(cfg.ckpt_path, "cpu")
    if cfg.get("attn_backend"):
        set_attention_backend(module.model, cfg.attn_backend)
    check_categories(module, datamodule, cfg.ckpt_path)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.validate(module, datamodule=datamodule)

    metrics = {
        f"val/{name}": float(trainer.callback_metrics[f"val/{name}"])
        for name in METRIC_NAMES
        if f"val/{name}" in trainer.callback_metrics
    }
    if "val/loss" in trainer.callback_metrics:
        metrics["val/loss"] = float(trainer.callback_metrics["val/loss"])
    if trainer.is_global_zero:
        output = Path(cfg.paths.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        if module.evaluator is not None and cfg.get("results_file"):
            (output / cfg.results_file).write_text(json.dumps(module.evaluator.results_json()))
        if cfg.get("metrics_file"):
            (output / cfg.metrics_file).write_text(json.dumps({**metrics, "checkpoint": str(cfg.ckpt_path)}, indent=2))
        print(f"\nCOCO metrics of {cfg.ckpt_path} (written to {output}):\n{format_metrics(metrics)}")
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg).get("val/AP")


register_resolvers()

if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
