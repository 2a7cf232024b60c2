"""``ValidationImages``: the predicted boxes of the first validation images, drawn at every validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from ddetr.image_list import valid_extent
from ddetr.pictures.drawing import denormalize, draw_detections


class ValidationImages(L.Callback):
    """Draws the predicted boxes of the first ``num_images`` validation images at every validation and
    saves them as PNG under ``<dirpath>/epoch_XXX/``; also sends them to a Weights & Biases or
    TensorBoard logger when one is attached."""

    def __init__(self, dirpath: str, num_images: int = 4, score_threshold: float = 0.3) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.score_threshold = score_threshold

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero or not outputs:
            return
        images, mask, targets = batch
        heights, widths = valid_extent(mask)
        pictures = []
        for image, valid_height, valid_width, target, detection in list(
            zip(images, heights.tolist(), widths.tolist(), targets, outputs["detections"])
        )[: self.num_images]:
            pixels = denormalize(image[:, :valid_height, :valid_width])
            keep = detection["scores"] >= self.score_threshold
            # detections are in original-image coordinates; draw them on the resized image
            orig_height, orig_width = (int(v) for v in target["orig_size"])
            scale = torch.tensor([valid_width / orig_width, valid_height / orig_height] * 2)
            boxes = detection["boxes"][keep].cpu() * scale
            pictures.append(
                draw_detections(
                    pixels,
                    boxes,
                    detection["labels"][keep].tolist(),
                    detection["scores"][keep].tolist(),
                    pl_module.category_names,
                )
            )
        folder = self.dirpath / f"epoch_{trainer.current_epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for target, picture in zip(targets, pictures):
            picture.save(folder / f"{int(target['image_id'])}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image("val/predictions", [np.asarray(p) for p in pictures], step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
                for index, picture in enumerate(pictures):
                    logger.experiment.add_image(
                        f"val/predictions_{index}", np.asarray(picture), trainer.global_step, dataformats="HWC"
                    )
