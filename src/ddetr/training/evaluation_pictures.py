"""The evaluation pictures of a run, ``pr_curves.png`` and ``confusion_matrix.png``: written beside
``metrics.json`` at the end of ``python -m ddetr.eval`` and of training (``write_evaluation_pictures``,
``write_final_pictures``),
and at every validation of a training run into ``<dirpath>/epoch_XXX/`` and to a TensorBoard or
Weights & Biases logger (``EvaluationPictures``)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

log = logging.getLogger(__name__)

PICTURE_FILES = {"pr_curves": "pr_curves.png", "confusion_matrix": "confusion_matrix.png"}


def evaluation_figures(evaluator, score_threshold: float | None = None, title: str = ""):
    """``(confusion, {"pr_curves": Figure, "confusion_matrix": Figure})`` of the evaluator's last
    ``compute()``: the curves from its ``COCOeval`` (all zeros when there was no detection at all), the
    ``training.confusion.ConfusionMatrix`` of its predictions at ``score_threshold``."""
    from ddetr.pictures.evaluation import draw_confusion_matrix, draw_pr_curves, missed_curves, precision_recall_curves

    confusion = evaluator.confusion_matrix(score_threshold)
    coco_eval = evaluator.last_eval
    if coco_eval is not None:
        categories = evaluator.coco_gt.loadCats(coco_eval.params.catIds)
        curves = precision_recall_curves(coco_eval, [str(c.get("name", c["id"])) for c in categories])
    else:  # no detection to evaluate: every class with ground truth has precision 0
        ground_truth = np.asarray(confusion.matrix)[:-1].sum(axis=1)  # (num_classes,) a real row sums to its boxes
        curves = missed_curves(confusion.labels[:-1], list(ground_truth > 0))
    figures = {"pr_curves": draw_pr_curves(curves, title), "confusion_matrix": draw_confusion_matrix(confusion, title)}
    return confusion, figures


def write_evaluation_pictures(
    evaluator, folder: str | Path, score_threshold: float | None = None, title: str = ""
) -> dict[str, Any]:
    """Writes ``pr_curves.png`` and ``confusion_matrix.png`` into ``folder`` and returns
    ``{"confusion_matrix": {"labels", "matrix", "iou", "score_threshold"}}`` for metrics.json; ``{}``
    (and no pictures) when there is no evaluator or it computed nothing yet."""
    if evaluator is None or not getattr(evaluator, "last_metrics", None):
        return {}
    from ddetr.pictures.evaluation import save_figure

    confusion, figures = evaluation_figures(evaluator, score_threshold, title)
    paths = [save_figure(figure, Path(folder) / PICTURE_FILES[name]) for name, figure in figures.items()]
    log.info("evaluation pictures: %s", ", ".join(str(path) for path in paths))
    return {"confusion_matrix": confusion.to_json()}


def write_final_pictures(
    trainer: L.Trainer, evaluator, folder: str | Path, score_threshold: float | None = None
) -> dict[str, Any]:
    """``write_evaluation_pictures`` at the end of training; when an ``EvaluationPictures`` callback of the
    trainer already drew the last validation (same global step and threshold), its files are copied
    instead of drawn again."""
    drawn = next(
        (
            callback.last
            for callback in trainer.callbacks
            if isinstance(callback, EvaluationPictures)
            and callback.last is not None
            and callback.last.step == trainer.global_step
            and callback.score_threshold == score_threshold
        ),
        None,
    )
    if drawn is None:
        return write_evaluation_pictures(evaluator, folder, score_threshold)
    for file_name in PICTURE_FILES.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(drawn.folder / file_name, Path(folder) / file_name)
    log.info("evaluation pictures: copied %s into %s", ", ".join(PICTURE_FILES.values()), folder)
    return {"confusion_matrix": drawn.confusion.to_json()}


@dataclass(frozen=True)
class DrawnPictures:
    """What ``EvaluationPictures`` drew last: at which global step, into which folder, and the matrix."""

    step: int
    folder: Path
    confusion: Any  # training.confusion.ConfusionMatrix


class EvaluationPictures(L.Callback):
    """At the end of every validation of a training run (not the sanity check), on rank zero, draws the
    precision-recall curves and the confusion matrix of the module's ``evaluator`` into
    ``<dirpath>/epoch_XXX/`` and sends them to a Weights & Biases or TensorBoard logger when one is
    attached (``val/pr_curves``, ``val/confusion_matrix``). ``last`` records the latest drawing."""

    def __init__(self, dirpath: str, score_threshold: float | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.score_threshold = score_threshold
        self.last: DrawnPictures | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluator = getattr(pl_module, "evaluator", None)
        if trainer.sanity_checking or not trainer.is_global_zero or not getattr(evaluator, "last_metrics", None):
            return
        from ddetr.pictures.evaluation import figure_pixels, save_figure

        title = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        confusion, figures = evaluation_figures(evaluator, self.score_threshold, title)
        folder = self.dirpath / f"epoch_{trainer.current_epoch:03d}"
        for name, figure in figures.items():
            save_figure(figure, folder / PICTURE_FILES[name])
            if trainer.loggers:
                log_picture(trainer, f"val/{name}", figure_pixels(figure))
        self.last = DrawnPictures(trainer.global_step, folder, confusion)


def log_picture(trainer: L.Trainer, key: str, pixels: np.ndarray) -> None:
    """Sends an (height, width, 3) uint8 picture to every W&B or TensorBoard logger of the trainer."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key, [pixels], step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
            logger.experiment.add_image(key, pixels, trainer.global_step, dataformats="HWC")
