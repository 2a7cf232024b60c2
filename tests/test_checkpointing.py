"""Activation checkpointing (``model.checkpointing: none|encoder|all``): the same gradients, fewer saved activations."""

from __future__ import annotations

import pytest
import torch

from ddetr.app import compose
from ddetr.models import build_deformable_detr
from ddetr.models.build import build_criterion

NUM_CLASSES = 4
# the tiny model, frozen batch norm, deeper, with dropout (replayed by checkpointing) and every head
OVERRIDES = dict(backbone="resnet18", enc_layers=2, dec_layers=3, dropout=0.1, with_box_refine=True, two_stage=True)
TARGETS = [
    {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.5]])},
    {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.4]])},
]


def _gradients(options: dict, checkpointing: str, attn_backend: str) -> tuple[dict[str, torch.Tensor], int]:
    """Parameter gradients of one training step (dropout on) and the bytes autograd saved for backward."""
    torch.manual_seed(0)
    model = build_deformable_detr(
        NUM_CLASSES, checkpointing=checkpointing, attn_backend=attn_backend, **options
    ).train()
    criterion = build_criterion(NUM_CLASSES, **{k: v for k, v in options.items() if k != "dropout"})
    images = [
        torch.randn(3, 64, 80, generator=torch.Generator().manual_seed(1)),
        torch.randn(3, 48, 64, generator=torch.Generator().manual_seed(2)),
    ]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(123)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(images)
    losses = criterion(outputs, TARGETS)
    criterion.weighted_total(losses).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("attn_backend", ["pytorch", "auto"])
def test_gradients_are_identical_and_less_is_saved(attn_backend, micro_options):
    reference, saved_none = _gradients(micro_options(**OVERRIDES), "none", attn_backend)
    for mode in ("encoder", "all"):
        grads, saved = _gradients(micro_options(**OVERRIDES), mode, attn_backend)
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            assert torch.equal(grad, reference[name]), (
                f"{mode}: {name} differs by {(grad - reference[name]).abs().max()}"
            )
        if mode == "encoder":
            saved_encoder = saved
    # the outer graph keeps only the checkpointed layers' inputs: less is saved, and less again with the decoder
    assert saved_encoder < saved_none and saved < saved_encoder


def test_config_and_eval_mode(micro_options):
    cfg = compose(["model.checkpointing=all"])
    assert cfg.model.checkpointing == "all"
    model = build_deformable_detr(NUM_CLASSES, checkpointing="encoder", **micro_options(**OVERRIDES))
    assert model.transformer.encoder.checkpointing and not model.transformer.decoder.checkpointing
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        build_deformable_detr(NUM_CLASSES, checkpointing="decoder", **micro_options(**OVERRIDES))
