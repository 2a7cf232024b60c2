"""``SkipReportCallback``: the images the data module skipped, reported at the end of every epoch."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class SkipReportCallback(L.Callback):
    """At the end of each train and val epoch, log the datamodule's skip report.

    Logs one warning line per rank that skipped images and the metric `{stage}/skipped_images`
    (summed over ranks). Needs a datamodule with `pop_skip_report()` (`DetectionDataModule`).
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    @staticmethod
    def _report(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "pop_skip_report"):
            return
        report = datamodule.pop_skip_report(stage)
        if len(report):
            log.warning(
                "rank %d, %s epoch %d: %s",
                trainer.global_rank,
                stage,
                trainer.current_epoch,
                report.summary(),
            )
        if not trainer.sanity_checking:
            pl_module.log(
                f"{stage}/skipped_images",
                float(len(report)),
                reduce_fx="sum",
                sync_dist=True,
            )
