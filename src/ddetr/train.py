"""Training entry point: ``python -m ddetr.train [experiment=...] [key=value ...]``.

With no arguments it trains the small model on the built-in synthetic dataset (generated once and
cached under ``data/``), evaluates with pycocotools every epoch, and ends with a table of the final
COCO metrics, also written to ``metrics.json`` in the run directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddetr.callbacks import Preempted
from ddetr.config import CONFIG_DIR, register_resolvers

log = logging.getLogger(__name__)

FINAL_METRICS = ("val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl")


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiates every entry of a config group that has a ``_target_`` (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_module(cfg: DictConfig, datamodule) -> L.LightningModule:
    """The LightningModule from ``cfg.model``, with the class count and category ids from the data."""
    num_classes = cfg.model.get("num_classes") or datamodule.num_classes
    return instantiate(
        cfg.model,
        num_classes=num_classes,
        label_to_category_id=list(datamodule.label_to_category_id),
        category_names=list(datamodule.category_names),
        _convert_="all",
    )


def format_metrics(metrics: dict[str, float]) -> str:
    """An aligned two-column table of metric name and value."""
    width = max((len(name) for name in metrics), default=0)
    lines = ["-" * (width + 12)] + [f"{name:<{width}}  {value:10.4f}" for name, value in metrics.items()]
    return "\n".join(lines + ["-" * (width + 12)])


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    """Trains (and validates every epoch) as ``cfg`` says; returns the final validation metrics.

    ``extra_callbacks`` run before the configured ones (notebooks, tests)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    callbacks = [*extra_callbacks, *instantiate_group(cfg.get("callbacks"))]
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except Preempted as stop:
        log.warning("%s", stop)
        print(f"\nTraining {stop}")
        return {}

    metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
    if trainer.is_global_zero and cfg.get("metrics_file"):
        final = {name: metrics[name] for name in FINAL_METRICS if name in metrics}
        path = Path(cfg.paths.output_dir) / cfg.metrics_file
        path.write_text(json.dumps({**final, "all": metrics, "epochs": trainer.current_epoch}, indent=2))
        print(f"\nFinal validation metrics (also in {path}):\n{format_metrics(final or metrics)}")
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/AP")  # what a Hydra sweeper optimises


register_resolvers()

if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
