"""Mixed precision end to end: every model config trains, validates, evaluates, predicts and exports under
bf16-mixed; float16 autocast with a gradient scaler (16-mixed as on a GPU) on the fused AdamW step, which clips
as the unfused one; detections are float32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _batches import random_targets
from _runs import quiet_trainer
from lightning.pytorch.plugins.precision import MixedPrecision

from ddetr.app import CONFIG_DIR, compose
from ddetr.inference.export import export
from ddetr.inference.predict import predict
from ddetr.models.postprocess import PostProcess
from ddetr.training.evaluation import CocoEvaluator
from ddetr.training.module import DeformableDETRModule
from ddetr.training.run import evaluate, train

MODEL_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))
# each config keeps its own options (norm, levels, refinement, two-stage, dropout, fused AdamW), at the tiny sizes
TINY = [
    "model.backbone.name=resnet18",
    "model.hidden_dim=32",
    "model.nheads=2",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.dim_feedforward=32",
    "model.num_queries=10",
]
# trainer.precision=16-mixed on the CPU is run by Lightning as bf16-mixed (it warns "AMP with fp16 is not
# supported on CPU"): float16 is tested below with an explicit MixedPrecision("16-mixed", "cpu") plugin
PRECISIONS = ["bf16-mixed"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def test_every_model_config_is_covered():
    assert {"deformable_detr", "small", "tiny"} <= set(MODEL_CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_mixed_precision_trains_validates_evaluates_predicts_and_exports(
    model, precision, tmp_path, data_root, debug_overrides, eval_overrides
):
    run = tmp_path / "run"
    overrides = debug_overrides(run, data_root) + [
        f"model={model}",
        *TINY,
        f"trainer.precision={precision}",
        "trainer.limit_train_batches=2",
        "callbacks.validation_images.num_images=2",
    ]
    metrics = train(compose(overrides))
    assert all(value is None or math.isfinite(value) for value in metrics.values())
    assert list((run / "val_images").glob("epoch_*/*.png")), "detections drawn from mixed-precision scores"
    last = run / "checkpoints" / "last.ckpt"
    assert all(
        value.dtype != torch.bfloat16 and value.dtype != torch.float16
        for value in torch.load(last, map_location="cpu", weights_only=True)["state_dict"].values()
    )

    # ddetr.eval of last.ckpt at the same precision reproduces training's final validation
    on_eval_data = eval_overrides(last, data_root, tmp_path / "eval", tmp_path / "logs")
    evaluated = evaluate(compose([*on_eval_data, f"trainer.precision={precision}"], config_name="eval"))
    for name in ("val/AP", "val/AP50", "val/AR100"):
        assert evaluated[name] == pytest.approx(metrics[name], abs=1e-9), name

    summary = predict(
        compose(
            [
                f"ckpt_path={last}",
                f"input={data_root / 'val'}",
                f"output={tmp_path / 'predict'}",
                "threshold=0.0",
                "device=cpu",
                "progress_bar=false",
                f"paths.log_dir={tmp_path}/logs",
            ],
            config_name="predict",
        )
    )
    assert summary["num_images"] == 6 and summary["num_detections"] > 0
    detections = json.loads((tmp_path / "predict" / "detections.json").read_text())
    assert all(math.isfinite(d["score"]) and all(map(math.isfinite, d["bbox"])) for d in detections)
    exported = export(
        compose(
            [
                f"ckpt_path={last}",
                f"output={tmp_path / 'model.pt2'}",
                "format=torch_export",
                "attn_backend=pytorch",
                "height=64",
                "width=96",
                f"paths.log_dir={tmp_path}/logs",
            ],
            config_name="export",
        )
    )
    assert exported["max_abs_diff"] < 1e-4


# ------------------------------------------------------------------ the fused AdamW and gradient clipping
def tiny_batches(num_batches: int = 3) -> list:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_batches):
        images = torch.randn(2, 3, 64, 80, generator=generator)
        targets = random_targets(generator, (2, 2))
        batches.append((images, torch.zeros(2, 64, 80, dtype=torch.bool), targets))
    return batches


def fit_weights(micro_options, fused: bool, clip: float | None, plugins: list) -> torch.Tensor:
    torch.manual_seed(0)
    module = DeformableDETRModule(
        num_classes=3, **micro_options(backbone={"name": "resnet18", "norm": "frozen"}), optim={"fused": fused}
    )
    trainer = quiet_trainer(max_steps=2, gradient_clip_val=clip, plugins=plugins)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(tiny_batches(), batch_size=None))
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def scaled_float16() -> list:
    """16-mixed with a gradient scaler, as on a GPU (the scale makes unscaled clipping visibly wrong)."""
    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))]


@pytest.mark.slow  # over 10 s of CPU on 2 cores (the conftest check, 2026-12-08)
@pytest.mark.parametrize(
    "plugins", [scaled_float16, lambda: [MixedPrecision("bf16-mixed", "cpu")]], ids=["16-scaler", "bf16"]
)
def test_fused_adamw_clips_under_mixed_precision_as_the_unfused_one(plugins, micro_options):
    """Lightning refuses to clip for an optimiser that unscales inside its step; the module clips the unscaled
    gradients itself. Reference: PyTorch's default (for-each) AdamW, which Lightning unscales and clips."""
    fused = fit_weights(micro_options, True, 0.1, plugins())
    reference = fit_weights(micro_options, False, 0.1, plugins())
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-6)
    unclipped = fit_weights(micro_options, False, None, plugins())
    assert (unclipped - reference).abs().max() > 1e-4, "clipping changes the weights (it is exercised)"


# ------------------------------------------------------------------ detections in float32
def test_postprocess_gives_float32_for_low_precision_outputs():
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 10, 4, generator=generator),
        "pred_boxes": torch.rand(2, 10, 4, generator=generator),
    }
    sizes = torch.tensor([[480, 640], [300, 200]])
    for dtype in (torch.bfloat16, torch.float16):
        low = {name: value.to(dtype) for name, value in outputs.items()}
        upcast = {name: value.float() for name, value in low.items()}
        for got, expected in zip(PostProcess(num_select=5)(low, sizes), PostProcess(num_select=5)(upcast, sizes)):
            assert got["scores"].dtype == got["boxes"].dtype == torch.float32
            for key in ("scores", "labels", "boxes"):
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_evaluator_takes_bfloat16_detections():
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 16, 16], "area": 256, "iscrowd": 0}],
    }
    coco.createIndex()
    evaluator = CocoEvaluator(coco, [1])
    box = torch.tensor([[8.0, 8.0, 24.0, 24.0]], dtype=torch.bfloat16)  # exact in bfloat16
    evaluator.update(
        {1: {"scores": torch.tensor([0.75], dtype=torch.bfloat16), "labels": torch.tensor([0]), "boxes": box}}
    )
    assert evaluator.compute()["AP"] == pytest.approx(1.0)
    assert evaluator.predictions[1]["scores"].tolist() == [0.75]
