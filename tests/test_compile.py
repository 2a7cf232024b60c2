"""torch.compile: the detector traces as one graph (no graph break, the attention op inside) with
dynamic image sizes, and gives the eager outputs; ``compile=True`` in the module uses it."""

from __future__ import annotations

import pytest
import torch

from ddetr.models.build import build_criterion, build_deformable_detr
from ddetr.models.config import DeformableDETRConfig


@pytest.fixture(scope="module")
def tiny(tiny_options):
    """``tiny(two_stage) -> DeformableDETRConfig``: the tiny model with frozen batch norm, no dropout,
    3 classes; with two-stage also box refinement."""

    def config(two_stage: bool) -> DeformableDETRConfig:
        options = tiny_options(
            backbone={"name": "resnet18"}, dropout=0.0, with_box_refine=two_stage, two_stage=two_stage
        )
        return DeformableDETRConfig.from_dict(num_classes=3, **options)

    return config


def batch(height: int, width: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, height, width, generator=generator)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, height // 2 :, :] = True
    return images, mask


@pytest.mark.parametrize("two_stage", [False, True], ids=["multi_scale", "two_stage"])
def test_detector_has_no_graph_break(two_stage, tiny):
    model = build_deformable_detr(tiny(two_stage)).eval()
    explanation = torch._dynamo.explain(model)(batch(64, 80, 0))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


@pytest.mark.slow
def test_fullgraph_dynamic_compile_matches_eager_forward_and_backward(tiny):
    torch.manual_seed(0)
    config = tiny(True)
    model = build_deformable_detr(config)
    criterion = build_criterion(config)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])}] * 2
    for size, seed in (((64, 80), 1), ((80, 96), 2)):  # a second size must not need a new graph
        inputs = batch(*size, seed)
        losses = []
        for detector in (model, compiled):
            model.zero_grad()
            loss = criterion.weighted_total(criterion(detector(inputs), targets))
            loss.backward()
            losses.append((loss.detach(), model.transformer.level_embed.grad.clone()))
        torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-4, atol=1e-5)


def test_module_compile_option_keeps_state_dict_names(tiny):
    from ddetr.training.module import DeformableDETRModule

    module = DeformableDETRModule(config=tiny(False), compile=True)
    assert module.detector is not module.model
    assert all(not name.startswith("detector") and "_orig_mod" not in name for name in module.state_dict())
    assert "compile" not in module.hparams
