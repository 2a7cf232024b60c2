"""Every trainable parameter receives a gradient from one backward pass of the full loss, in every
variant (so DDP needs no find_unused_parameters), and exactly the official parts are frozen."""

from __future__ import annotations

import pytest
import torch

from ddetr.models import build_deformable_detr
from ddetr.models.build import build_criterion

NUM_CLASSES = 4
# the tiny model with frozen batch norm (as the official backbone) and a deeper stack for the gradient paths
GRAD_OVERRIDES = dict(backbone="resnet18", enc_layers=2, dec_layers=3)

GRAD_VARIANTS = {
    "single_scale": dict(num_feature_levels=1),
    "two_levels": dict(num_feature_levels=2),
    "multi_scale": dict(num_feature_levels=4),
    "five_levels": dict(num_feature_levels=5),
    "box_refine": dict(with_box_refine=True),
    "two_stage": dict(with_box_refine=True, two_stage=True),
    "two_stage_no_refine": dict(two_stage=True),
    "single_scale_two_stage": dict(num_feature_levels=1, with_box_refine=True, two_stage=True),
}


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.5]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.4]])},
    ]


@pytest.mark.parametrize("variant", list(GRAD_VARIANTS))
def test_every_trainable_parameter_gets_a_gradient(variant, micro_options):
    torch.manual_seed(0)
    options = micro_options(**GRAD_OVERRIDES, **GRAD_VARIANTS[variant])
    model = build_deformable_detr(NUM_CLASSES, **options).train()
    with torch.no_grad():  # leave the official init, whose zeros hide some parameters from the loss
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    criterion = build_criterion(
        NUM_CLASSES, dec_layers=options["dec_layers"], two_stage=options.get("two_stage", False)
    )
    images = [torch.randn(3, 96, 128), torch.randn(3, 80, 96)]
    outputs = model(images)
    losses = criterion(outputs, _targets())
    total = criterion.weighted_total(losses)
    assert torch.isfinite(total)
    total.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    without = sorted(name for name, p in trainable.items() if p.grad is None)
    assert not without, f"no gradient for {without}"
    non_finite = sorted(name for name, p in trainable.items() if not torch.isfinite(p.grad).all())
    assert not non_finite, f"non-finite gradient for {non_finite}"
    # away from the zero-initialised heads every parameter tensor receives some signal
    zero = sorted(name for name, p in trainable.items() if p.grad.abs().sum() == 0)
    assert not zero, f"all-zero gradient for {zero}"


@pytest.mark.parametrize("train_backbone", [True, False])
def test_frozen_parameters_follow_the_official(train_backbone, micro_options):
    model = build_deformable_detr(NUM_CLASSES, **micro_options(**GRAD_OVERRIDES, train_backbone=train_backbone))
    for name, parameter in model.backbone.named_parameters():
        trains = train_backbone and name.startswith(("body.layer2", "body.layer3", "body.layer4"))
        assert parameter.requires_grad == trains, name
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("backbone."))
    # frozen batch norm holds buffers, never parameters
    assert not any("bn" in name or "downsample.1" in name for name, _ in model.backbone.named_parameters())
