"""Training: the LightningModule, callbacks, COCO evaluation, checkpoint I/O and the run functions."""
