"""Training: the LightningModule, callbacks, COCO evaluation and the run functions."""
