"""Attention pictures: the captured cross-attention of the last decoder layer, its coordinates, the PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import _micro_options
from PIL import Image

from ddetr.pictures.attention import (
    DecoderAttention,
    DecoderAttentionRecorder,
    attention_in_pixels,
    attention_pictures,
    level_strides,
    select_queries,
)
from ddetr.training.module import DeformableDETRModule


def tiny_model(with_box_refine: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    module = DeformableDETRModule(
        num_classes=3, **_micro_options(with_box_refine=with_box_refine, attn_backend="pytorch")
    )
    return module.model.eval()


def images_of_two_sizes() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(3, 64, 96, generator=generator), torch.randn(3, 48, 64, generator=generator)]


def record(model, images):
    """Runs the model with the recorder and, independently, hooks the transformer for the decoder's own
    per-layer references and the level masks."""
    seen = {}

    def keep_transformer_io(module, args, output):
        seen["masks"] = args[1]
        seen["references"] = output["references"]

    handle = model.transformer.register_forward_hook(keep_transformer_io)
    with torch.no_grad(), DecoderAttentionRecorder(model) as recorder:
        outputs = model(images)
    handle.remove()
    return outputs, recorder.attention, seen


@pytest.mark.parametrize("with_box_refine", [False, True])
def test_recorder_keeps_outputs_and_captures_the_last_layer(with_box_refine):
    model = tiny_model(with_box_refine)
    images = images_of_two_sizes()
    with torch.no_grad():
        plain = model(images)
    outputs, attention, seen = record(model, images)
    assert torch.equal(outputs["pred_logits"], plain["pred_logits"])
    assert torch.equal(outputs["pred_boxes"], plain["pred_boxes"])

    batch_size, num_queries, num_levels = 2, 10, 4
    assert attention.sampling_locations.shape == (batch_size, num_queries, 2, num_levels, 4, 2)
    assert attention.attention_weights.shape == (batch_size, num_queries, 2, num_levels, 4)
    # the weights are a softmax over levels * points for every head
    sums = attention.attention_weights.sum((-1, -2))  # (B, Q, M)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    # the captured reference is the last layer's reference, scaled into every level by its valid ratio
    last_reference = seen["references"][-1]  # (B, Q, 2 or 4)
    assert attention.reference_points.shape[-1] == (4 if with_box_refine else 2)
    for level, level_mask in enumerate(seen["masks"]):
        valid_width = (~level_mask[:, 0, :]).sum(-1).float() / level_mask.shape[2]  # (B,)
        valid_height = (~level_mask[:, :, 0]).sum(-1).float() / level_mask.shape[1]  # (B,)
        ratio = torch.stack([valid_width, valid_height], -1)[:, None]  # (B, 1, 2)
        torch.testing.assert_close(attention.reference_points[:, :, level, :2], last_reference[..., :2] * ratio)
    assert (seen["masks"][0][1].any()) and not seen["masks"][0][0].any(), "the second image is padded"


def test_locations_at_initialisation_follow_the_official_grid():
    """Fresh weights: offsets are (p + 1) * direction(head) pixels of each level, weights uniform.
    Head 0 looks along +x, so its point p on level l sits (p + 1) / width_l to the right of the reference."""
    model = tiny_model()
    _, attention, _ = record(model, [torch.randn(3, 64, 96)])
    widths = attention.spatial_shapes[:, 1].float()  # (L,)
    reference = attention.reference_points[0, :, :, :2]  # (Q, L, 2)
    head0 = attention.sampling_locations[0, :, 0]  # (Q, L, P, 2)
    expected_x = reference[:, :, None, 0] + torch.arange(1, 5).float()[None, None, :] / widths[None, :, None]
    torch.testing.assert_close(head0[..., 0], expected_x)
    torch.testing.assert_close(head0[..., 1], reference[:, :, None, 1].expand(-1, -1, 4))
    torch.testing.assert_close(attention.attention_weights, torch.full_like(attention.attention_weights, 1 / 16))


def test_pixel_coordinates_by_hand():
    attention = DecoderAttention(
        reference_points=torch.tensor([0.25, 0.5]).view(1, 1, 1, 2).repeat(1, 1, 2, 1),  # (1, 1, 2, 2)
        sampling_locations=torch.tensor([[0.5, 0.25], [0.5, 0.25]]).view(1, 1, 1, 2, 1, 2),  # (1, 1, 1, 2, 1, 2)
        attention_weights=torch.tensor([0.75, 0.25]).view(1, 1, 1, 2, 1),
        spatial_shapes=torch.tensor([[8, 12], [4, 6]]),
    )
    reference, locations, weights = attention_in_pixels(attention, [8, 16], 0, 0)
    torch.testing.assert_close(reference, torch.tensor([0.25 * 96, 0.5 * 64]))
    torch.testing.assert_close(locations[0, 0, 0], torch.tensor([48.0, 16.0]))  # level 0: 12*8 x 8*8 pixels
    torch.testing.assert_close(locations[0, 1, 0], torch.tensor([48.0, 16.0]))  # level 1: 6*16 x 4*16 pixels
    assert weights.shape == (1, 2, 1)
    assert level_strides(tiny_model()) == [8, 16, 32, 64]


def test_select_queries_by_best_class_score():
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, 2, 1] = 2.0  # best
    logits[0, 0, 2] = 0.0  # second, score 0.5
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 4, 4)}
    (selected,) = select_queries(outputs, top_k=3, threshold=0.4)
    assert [(d["query"], d["label"]) for d in selected] == [(2, 1), (0, 2)]
    assert selected[0]["score"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())


def test_attention_pictures_are_written(tmp_path):
    model = tiny_model()
    images = images_of_two_sizes()
    originals = [np.full((128, 192, 3), 128, np.uint8), np.full((96, 128, 3), 64, np.uint8)]
    pictures = attention_pictures(model, images, originals, top_k=2, class_names=["a", "b", "c"])
    assert [len(p) for p in pictures] == [2, 2]
    path = tmp_path / "attention.png"
    pictures[0][0][1].save(path)
    with Image.open(path) as written:
        pixels = np.asarray(written.convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, "the picture shows points, a colour bar and text"


def test_set_attention_backend_is_what_the_layers_report(micro_config):
    from ddetr.models.build import build_deformable_detr
    from ddetr.models.ms_deform_attn import attention_backend, set_attention_backend

    model = build_deformable_detr(micro_config)
    assert attention_backend(model) == micro_config.attn_backend == "auto"
    set_attention_backend(model, "pytorch")
    assert attention_backend(model) == "pytorch"
    assert {layer.backend for layer in model.modules() if hasattr(layer, "sampling_offsets")} == {"pytorch"}
