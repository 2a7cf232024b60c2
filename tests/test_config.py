"""The real Hydra configs compose, and every group instantiates, with tiny overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from ddetr.app import CONFIG_DIR, compose
from ddetr.training.run import instantiate_group

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
OFFICIAL = {
    "single_scale": dict(num_feature_levels=1, dilation=False, with_box_refine=False, two_stage=False),
    "single_scale_dc5": dict(num_feature_levels=1, dilation=True, with_box_refine=False, two_stage=False),
    "multi_scale": dict(num_feature_levels=4, dilation=False, with_box_refine=False, two_stage=False),
    "box_refine": dict(num_feature_levels=4, dilation=False, with_box_refine=True, two_stage=False),
    "two_stage": dict(num_feature_levels=4, dilation=False, with_box_refine=True, two_stage=True),
}


def test_every_official_recipe_has_an_experiment():
    assert set(OFFICIAL) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_experiment_hyperparameters(name, tmp_path):
    cfg = compose([f"experiment={name}", f"paths.output_dir={tmp_path}"])
    model = cfg.model
    expected = OFFICIAL[name]
    assert model.num_feature_levels == expected["num_feature_levels"]
    assert model.backbone.dilation == expected["dilation"]
    assert model.with_box_refine == expected["with_box_refine"]
    assert model.two_stage == expected["two_stage"]
    # the official recipe (semantics.md): R-50, 6+6 layers, 256 hidden, 8 heads, 4 points, 300 queries
    assert (model.backbone.name, model.enc_layers, model.dec_layers, model.hidden_dim) == ("resnet50", 6, 6, 256)
    assert (model.nheads, model.enc_n_points, model.dec_n_points, model.num_queries) == (8, 4, 4, 300)
    assert (model.dim_feedforward, model.dropout) == (1024, 0.1)
    assert (model.optim.lr, model.optim.lr_backbone, model.optim.weight_decay) == (2e-4, 2e-5, 1e-4)
    assert (model.optim.lr_drop, model.optim.lr_linear_proj_mult) == (40, 0.1)
    assert cfg.trainer.max_epochs == 50 and cfg.trainer.gradient_clip_val == 0.1
    assert (model.loss.cls_loss_coef, model.loss.bbox_loss_coef, model.loss.giou_loss_coef) == (2, 5, 2)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_experiment_builds_the_variant(name, tmp_path):
    """The composed config instantiates the right model (small sizes so the test stays fast)."""
    backbone = "resnet50" if OFFICIAL[name]["dilation"] else "resnet18"  # DC5 needs bottleneck blocks
    tiny = [
        f"model.backbone.name={backbone}",
        "model.hidden_dim=32",
        "model.enc_layers=1",
        "model.dec_layers=2",
        "model.dim_feedforward=32",
        "model.num_queries=5",
        "model.nheads=2",
    ]
    cfg = compose([f"experiment={name}", f"paths.output_dir={tmp_path}", *tiny])
    module = instantiate(cfg.model, num_classes=3, _convert_="all")
    outputs = module.model.eval()([__import__("torch").randn(3, 64, 80), __import__("torch").randn(3, 48, 64)])
    assert outputs["pred_logits"].shape == (2, 5, 3)
    assert len(outputs["aux_outputs"]) == 1
    assert ("enc_outputs" in outputs) == OFFICIAL[name]["two_stage"]


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "many"])
def test_trainer_callbacks_and_loggers_instantiate(logger, tmp_path):
    cfg = compose([f"logger={logger}", f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu"])
    callbacks = instantiate_group(cfg.callbacks)
    loggers = instantiate_group(cfg.logger)
    assert loggers and callbacks
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    if logger == "wandb":
        assert cfg.logger.wandb.offline is True  # no credentials in tests


def test_model_keys_are_plain_overrides(tmp_path):
    cfg = compose(["model.enc_n_points=2", "model.nheads=2", f"paths.output_dir={tmp_path}"])
    assert cfg.model.enc_n_points == 2 and cfg.model.nheads == 2
    assert Path(CONFIG_DIR, "train.yaml").is_file()
