"""Parity with transformers' DeformableDetrForObjectDetection (the oracle) on the five official variants.

Tiny random models, weights converted with ddetr.convert; two images of different sizes in one padded
batch; final, auxiliary and (two-stage) encoder outputs compared.
"""

from __future__ import annotations

import pytest
import torch
from _hf_oracle import NUM_CLASSES, VARIANTS, _assert_close, assert_outputs_close
from _hf_oracle import ddetr_flags, hf_model, hf_outputs, official_names_from_hf, padded_batch

from ddetr.convert import hf_to_ddetr, official_to_ddetr
from ddetr.models import build_deformable_detr


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request):
    """(variant, transformers model, its outputs on the padded batch, images, padded, mask)."""
    variant = request.param
    model = hf_model(variant)
    images, padded, mask = padded_batch()
    return variant, model, hf_outputs(model, padded, mask), images, padded, mask


def _ours(variant: str, state_dict: dict[str, torch.Tensor]):
    model = build_deformable_detr(NUM_CLASSES, dropout=0.0, **ddetr_flags(variant)).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def test_oracle_is_not_degenerate(case):
    _, _, reference, _, _, _ = case
    assert reference["pred_boxes"].std(dim=1).min() > 1e-3  # boxes differ between queries
    assert reference["pred_logits"].std() > 0.1
    assert not torch.allclose(reference["pred_boxes"][0], reference["pred_boxes"][1], atol=1e-3)


def test_parity_with_transformers_from_hf_weights(case):
    variant, model, reference, images, padded, mask = case
    ours = _ours(variant, hf_to_ddetr(model.state_dict(), model.config.to_dict()))
    with torch.no_grad():
        from_list = ours(images)
        from_batch = ours((padded, mask))
    assert_outputs_close(from_list, reference)
    assert_outputs_close(from_batch, from_list, atol=0)


def test_parity_with_transformers_from_official_names(case):
    variant, model, reference, images, _, _ = case
    official = official_names_from_hf(model.state_dict())
    flags = ddetr_flags(variant)
    num_pred = flags["dec_layers"] + int(flags.get("two_stage", False))
    assert {f"class_embed.{index}.weight" for index in range(num_pred)} <= set(official)
    if flags.get("with_box_refine"):
        assert "transformer.decoder.bbox_embed.0.layers.0.weight" in official
    ours = _ours(variant, official_to_ddetr(official, **flags))
    with torch.no_grad():
        assert_outputs_close(ours(images), reference)


def _targets(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for num_targets in (3, 2):
        centres = torch.rand(num_targets, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(num_targets, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, NUM_CLASSES, (num_targets,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], dim=1)})
    return targets


def test_loss_terms_match_transformers(case):
    """The unweighted per-layer terms (focal, L1, GIoU) of the whole model equal transformers' own loss
    with the official matcher costs (semantics.md: its other differences are weights and the missing
    two-stage encoder loss, which are not compared)."""
    from ddetr.models.build import build_criterion

    variant, model, _, images, padded, mask = case
    flags = ddetr_flags(variant)
    ours = _ours(variant, hf_to_ddetr(model.state_dict(), model.config.to_dict()))
    criterion = build_criterion(NUM_CLASSES, dec_layers=flags["dec_layers"], two_stage=flags.get("two_stage", False))
    targets = _targets()
    model.config.auxiliary_loss = True
    model.config.class_cost, model.config.bbox_cost, model.config.giou_cost = 2, 5, 2
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    with torch.no_grad():
        theirs = model(pixel_values=padded, pixel_mask=(~mask).long(), labels=hf_labels).loss_dict
        mine = criterion(ours((padded, mask)), targets)
    compared = [key for key in theirs if key.startswith(("loss_ce", "loss_bbox", "loss_giou"))]
    expected_keys = {
        f"{name}{suffix}"
        for name in ("loss_ce", "loss_bbox", "loss_giou")
        for suffix in ["", *(f"_{layer}" for layer in range(flags["dec_layers"] - 1))]
    }
    assert expected_keys <= set(compared)
    for key in compared:
        _assert_close(mine[key], theirs[key].to(mine[key].dtype), 1e-4, key)
