"""DINO's model (``model.variant=dino``) and its recipes (``experiment=dino``, ``experiment=dino_5scale``).

The conversion of DINO's own checkpoints, checked against DINO's code, is ``tests/test_convert_dino.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ddetr.app import compose
from ddetr.models.build import build_criterion, build_deformable_detr
from ddetr.models.config import DeformableDETRConfig
from ddetr.models.dino_decoder import anchor_sine_embedding
from ddetr.models.position_encoding import PositionEmbeddingSine


def dino_config(micro_options, **overrides) -> DeformableDETRConfig:
    options = {"variant": "dino", "two_stage": True, "with_box_refine": True, "query_selection": "mixed"}
    options.update(look_forward_twice=True, position_temperature=20.0)
    return DeformableDETRConfig.from_dict(num_classes=5, **micro_options(**{**options, **overrides}))


@pytest.mark.parametrize("name, levels, min_stride, batch", [("dino", 4, 8, 2), ("dino_5scale", 5, 4, 1)])
def test_dino_experiments_follow_dinos_configs(name, levels, min_stride, batch, tmp_path):
    """The values of IDEA-Research/DINO's config/DINO/DINO_{4,5}scale.py (commit faa8520), read by hand."""
    cfg = compose([f"experiment={name}", f"paths.output_dir={tmp_path}"])
    model = cfg.model
    assert (model.variant, model.num_feature_levels, model.backbone.min_stride) == ("dino", levels, min_stride)
    assert (model.backbone.name, model.hidden_dim, model.nheads, model.enc_layers, model.dec_layers) == (
        "resnet50",
        256,
        8,
        6,
        6,
    )
    assert (model.num_queries, model.dim_feedforward, model.dropout, model.position_temperature) == (900, 2048, 0.0, 20)
    assert (model.enc_n_points, model.dec_n_points) == (4, 4)
    assert model.two_stage and model.with_box_refine and model.look_forward_twice
    assert model.query_selection == "mixed"
    assert dict(model.denoising) == {
        "enabled": True,
        "num_queries": 100,
        "label_noise_ratio": 0.5,
        "box_noise_scale": 0.4,
    }
    loss = model.loss
    assert (loss.set_cost_class, loss.set_cost_bbox, loss.set_cost_giou, loss.focal_alpha) == (2.0, 5.0, 2.0, 0.25)
    assert (loss.cls_loss_coef, loss.bbox_loss_coef, loss.giou_loss_coef) == (1.0, 5.0, 2.0)
    optim = model.optim
    assert (optim.lr, optim.lr_backbone, optim.weight_decay, optim.lr_linear_proj_mult) == (1e-4, 1e-5, 1e-4, 0.1)
    assert (optim.schedule, optim.lr_drop, optim.reference_batch) == ("step", 11, 16)
    assert (cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val, cfg.data.batch_size) == (12, 0.1, batch)
    assert model.num_select == 300


def test_dino_position_encoding_is_dinos_sine_hw():
    """DINO's PositionEmbeddingSineHW: positions ``cumsum / (total + 1e-6) * 2 pi`` (no half-pixel offset),
    temperature 20, computed by hand for one pixel."""
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # valid width 3
    encoding = PositionEmbeddingSine(4, temperature=20.0, offset=0.0)(mask)  # (1, 8, 3, 4)
    y, x = 2 / (3 + 1e-6) * 2 * math.pi, 1 / (3 + 1e-6) * 2 * math.pi  # pixel (row 1, column 0)
    frequencies = [20.0 ** (2 * (i // 2) / 4) for i in range(4)]
    expected = [math.sin(y / frequencies[0]), math.cos(y / frequencies[1]), math.sin(y / frequencies[2])]
    expected += [math.cos(y / frequencies[3]), math.sin(x / frequencies[0]), math.cos(x / frequencies[1])]
    expected += [math.sin(x / frequencies[2]), math.cos(x / frequencies[3])]
    torch.testing.assert_close(encoding[0, :, 1, 0], torch.tensor(expected))


def test_anchor_sine_embedding_by_hand():
    """Per coordinate in DINO's order (y, x, w, h): sin and cos of ``coordinate * 2 pi / 10000 ** (2 (i // 2) / F)``."""
    box = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    embedding = anchor_sine_embedding(box, 4)  # (1, 1, 16)
    expected = []
    for value in (0.2, 0.1, 0.3, 0.4):
        angle = [value * 2 * math.pi / 10000.0 ** (2 * (i // 2) / 4) for i in range(4)]
        expected += [math.sin(angle[0]), math.cos(angle[1]), math.sin(angle[2]), math.cos(angle[3])]
    torch.testing.assert_close(embedding[0, 0], torch.tensor(expected))


def test_dino_model_parts_and_outputs(micro_options):
    """One shared class and box head, the decoder's ref_point_head and norm, no pos_trans; the selected
    proposals come out as interm_outputs and get their loss on the real labels; the official variant keeps
    its graph (enc_outputs, per-layer heads, pos_trans)."""
    torch.manual_seed(0)
    model = build_deformable_detr(dino_config(micro_options)).eval()
    names = set(model.state_dict())
    assert {"class_embed.0.weight", "bbox_embed.0.layers.0.weight", "transformer.tgt_embed.weight"} <= names
    assert {"transformer.decoder.ref_point_head.layers.1.weight", "transformer.decoder.norm.weight"} <= names
    assert not any(name.startswith(("class_embed.1", "bbox_embed.1", "transformer.pos_trans")) for name in names)
    with torch.no_grad():
        outputs = model([torch.randn(3, 64, 80), torch.randn(3, 48, 64)])
    assert outputs["pred_logits"].shape == (2, 10, 5) and "enc_outputs" not in outputs
    assert outputs["interm_outputs"]["pred_logits"].shape == (2, 10, 5)
    # the selected proposals are those with the best class logit, best first
    best = outputs["interm_outputs"]["pred_logits"].max(-1)[0]
    assert torch.all(best[:, :-1] >= best[:, 1:])
    criterion = build_criterion(dino_config(micro_options))
    assert "loss_ce_interm" in criterion.weight_dict and "loss_ce_enc" not in criterion.weight_dict
    official = build_deformable_detr(dino_config(micro_options, variant="deformable"))
    assert "transformer.pos_trans.weight" in official.state_dict()
    assert len(official.class_embed) == 2 and not hasattr(official.transformer.decoder, "ref_point_head")


def test_dino_boxes_look_forward_twice(micro_options):
    """Layer 1's boxes reach layer 0's box head through the refined anchor only with look-forward-twice."""
    images = [torch.randn(3, 64, 80)]
    grads = {}
    for switch in (True, False):
        torch.manual_seed(0)
        model = build_deformable_detr(dino_config(micro_options, look_forward_twice=switch, dropout=0.0)).train()
        outputs = model(images)
        outputs["pred_boxes"].sum().backward()  # the last (second) layer's boxes
        grads[switch] = model.bbox_embed[0].layers[2].weight.grad.clone()
    # the shared head gets the last layer's own gradient either way; with LFT also the refined anchor's
    assert not torch.allclose(grads[True], grads[False])


def test_dino_trains_with_denoising(micro_options):
    """A training step of the DINO variant with denoising: the denoising, interm and matching losses are
    finite and the label book gets a gradient."""
    from ddetr.training.module import DeformableDETRModule

    torch.manual_seed(0)
    config = dino_config(micro_options, denoising={"enabled": True, "num_queries": 4}, dropout=0.0)
    module = DeformableDETRModule(config).train()
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    outputs = module.model([torch.randn(3, 64, 80), torch.randn(3, 64, 80)], targets)
    losses = module.criterion(outputs, targets)
    for name in ("loss_ce", "loss_bbox_dn", "loss_giou_interm", "loss_ce_dn_0"):
        assert torch.isfinite(losses[name]), name
    module.criterion.weighted_total(losses).backward()
    assert module.model.denoising.label_embed.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_dino_debug_run_trains_evaluates_predicts_and_exports(tmp_path, debug_overrides):
    """experiment=dino at debug size (preset=debug's tiny model and synthetic data, one CPU epoch): training
    with denoising, validation, evaluation and prediction of the checkpoint, and an ONNX export with dynamic
    sizes that matches PyTorch."""
    from ddetr.checkpoints import load_module
    from ddetr.inference.export import ExportableDetector, example_inputs, export
    from ddetr.inference.predict import predict
    from ddetr.training.run import evaluate, train

    data_root = tmp_path / "synthetic"
    run = tmp_path / "run"
    tiny = [
        "model.num_queries=10",
        "model.denoising.num_queries=6",
        "model.num_select=20",
        "data=synthetic",
        "trainer=default",
    ]
    cfg = compose(["experiment=dino", *debug_overrides(run, data_root), *tiny])
    assert cfg.model.variant == "dino" and cfg.model.denoising.enabled and cfg.model.hidden_dim == 32
    metrics = train(cfg)
    assert 0.0 <= metrics["val/AP"] <= 1.0
    log = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_ce_dn" in log.split(",")
    checkpoint = run / "checkpoints" / "last.ckpt"

    evaluated = evaluate(
        compose(
            [
                f"ckpt_path={checkpoint}",
                f"data.root={data_root}",
                "data.num_train=12",
                "data.num_val=6",
                "data.image_size=64",
                "data.num_workers=0",
                "data.batch_size=4",
                "data.val_transforms.size=64",
                "data.val_transforms.max_size=96",
                "trainer.accelerator=cpu",
                "+trainer.enable_progress_bar=false",
                f"paths.output_dir={tmp_path / 'eval'}",
                f"paths.log_dir={tmp_path / 'eval' / 'logs'}",
            ],
            config_name="eval",
        )
    )
    assert evaluated["val/AP"] == pytest.approx(metrics["val/AP"], abs=1e-6)

    summary = predict(
        compose(
            [
                f"ckpt_path={checkpoint}",
                f"input={data_root / 'val'}",
                f"output={tmp_path / 'predict'}",
                "device=cpu",
                "progress_bar=false",
                "threshold=0.0",
                f"paths.log_dir={tmp_path / 'predict' / 'logs'}",
            ],
            config_name="predict",
        )
    )
    assert summary["num_images"] == 6 and not summary["skipped"]

    onnx_path = tmp_path / "dino.onnx"
    options = [
        f"ckpt_path={checkpoint}",
        f"output={onnx_path}",
        "batch_size=2",
        "height=128",
        "width=160",
        "with_mask=true",
    ]
    export(compose([*options, f"paths.log_dir={tmp_path}/logs"], config_name="export"))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    module = load_module(checkpoint)
    for batch_size, height, width in ((1, 96, 64), (3, 80, 128)):
        inputs = example_inputs(batch_size, height, width, with_mask=True, seed=7)
        feed = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs, strict=True)}
        onnx_logits, onnx_boxes = (torch.from_numpy(a) for a in session.run(["pred_logits", "pred_boxes"], feed))
        with torch.no_grad():
            logits, boxes = ExportableDetector(module.model, with_mask=True)(*inputs)
        assert (onnx_logits - logits).abs().max() < 1e-4 and (onnx_boxes - boxes).abs().max() < 1e-4
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert Path(checkpoint).is_file()


def test_stride_4_level_of_a_resnet_and_not_of_timm():
    """backbone.min_stride=4 adds ResNet's layer1 (stride 4) as the finest level; 5 levels are layer1..layer4
    and one strided convolution; timm backbones start at stride 8 and say so."""
    from ddetr.models.backbones.resnet import ResNetBackbone
    from ddetr.models.backbones.timm_models import TimmBackbone

    backbone = ResNetBackbone("resnet18", num_levels=4, min_stride=4, norm="batch")
    assert backbone.strides == [4, 8, 16, 32] and backbone.num_channels == [64, 128, 256, 512]
    maps = backbone.feature_maps(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    config = DeformableDETRConfig.from_dict(
        num_classes=3,
        num_feature_levels=5,
        backbone={"name": "resnet18", "norm": "batch", "min_stride": 4},
        hidden_dim=32,
        nheads=2,
        enc_layers=1,
        dec_layers=1,
        dim_feedforward=32,
        num_queries=5,
    )
    assert config.num_backbone_levels == 4
    assert build_deformable_detr(config).level_strides() == [4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="min_stride must be 4 or 8"):
        DeformableDETRConfig.from_dict(num_classes=3, backbone={"min_stride": 2})
    with pytest.raises(ValueError, match="min_stride=4 is not supported"):
        TimmBackbone("resnet18", num_levels=3, min_stride=4)
