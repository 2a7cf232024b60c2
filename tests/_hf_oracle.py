"""transformers' DeformableDetrForObjectDetection as an executable oracle: tiny random models of the five
official variants, and a padded batch of two images of different sizes."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

NUM_CLASSES = 5
NUM_QUERIES = 12

# the five variants of the paper: our options (official names) for a tiny model
VARIANTS = {
    "single_scale": dict(num_feature_levels=1),
    "single_scale_dc5": dict(num_feature_levels=1, dilation=True, backbone="resnet50"),
    "multi_scale": dict(num_feature_levels=4),
    "box_refine": dict(num_feature_levels=4, with_box_refine=True),
    "two_stage": dict(num_feature_levels=4, with_box_refine=True, two_stage=True),
}

TINY = dict(
    backbone="resnet18",
    hidden_dim=32,
    nheads=2,
    enc_layers=2,
    dec_layers=3,
    dim_feedforward=64,
    num_queries=NUM_QUERIES,
)


def ddetr_flags(variant: str) -> dict:
    """Official-named options of a tiny variant."""
    return {**TINY, **VARIANTS[variant]}


def hf_config(variant: str):
    """A transformers config equal to ``ddetr_flags(variant)``, dropout off, nothing downloaded."""
    flags = ddetr_flags(variant)
    return transformers.DeformableDetrConfig(
        backbone=flags["backbone"],
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        dilation=flags.get("dilation", False),
        num_feature_levels=flags["num_feature_levels"],
        d_model=flags["hidden_dim"],
        encoder_layers=flags["enc_layers"],
        decoder_layers=flags["dec_layers"],
        encoder_attention_heads=flags["nheads"],
        decoder_attention_heads=flags["nheads"],
        encoder_ffn_dim=flags["dim_feedforward"],
        decoder_ffn_dim=flags["dim_feedforward"],
        num_queries=flags["num_queries"],
        two_stage_num_proposals=flags["num_queries"],
        with_box_refine=flags.get("with_box_refine", False),
        two_stage=flags.get("two_stage", False),
        num_labels=NUM_CLASSES,
        dropout=0.0,
        # tied heads are right only when every layer shares one head (no refinement)
        tie_word_embeddings=not flags.get("with_box_refine", False),
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Moves every weight away from its structured initialisation (zeros, ones, identical heads), so
    that a wrong mapping or a wrong formula cannot hide behind it. Frozen batch norm statistics stay
    valid (positive variances)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif "backbone" in name and tensor.dim() == 4:
            continue  # keep the kaiming-initialised convolutions
        elif "backbone" in name:
            tensor.copy_(0.2 * noise + (1.0 if name.endswith(".weight") else 0.0))
        elif "sampling_offsets" in name:
            tensor.add_(0.3 * noise)
        else:
            tensor.add_(0.1 * noise)


def hf_model(variant: str, seed: int = 0):
    """A random transformers model of ``variant`` in eval mode; heads stored twice (the decoder's copy
    for refinement / two-stage) hold the same values, as in the official model."""
    torch.manual_seed(seed)
    model = transformers.DeformableDetrForObjectDetection(hf_config(variant)).eval()
    randomize_(model, seed)
    decoder = model.model.decoder
    if getattr(decoder, "bbox_embed", None) is not None:
        decoder.bbox_embed.load_state_dict(model.bbox_embed.state_dict())
    if getattr(decoder, "class_embed", None) is not None:
        decoder.class_embed.load_state_dict(model.class_embed.state_dict())
    return model


def padded_batch(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Two images of different sizes; returns (images, padded (2,3,H,W), mask (2,H,W) True on padding)."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 96, 128, generator=generator), torch.randn(3, 72, 100, generator=generator)]
    padded = torch.zeros(2, 3, 96, 128)
    mask = torch.ones(2, 96, 128, dtype=torch.bool)
    for index, image in enumerate(images):
        padded[index, :, : image.shape[1], : image.shape[2]] = image
        mask[index, : image.shape[1], : image.shape[2]] = False
    return images, padded, mask


def hf_outputs(model, padded: torch.Tensor, mask: torch.Tensor) -> dict:
    """The oracle's outputs in ddetr's format (all decoder layers, and the proposals for two-stage)."""
    with torch.no_grad():
        output = model(pixel_values=padded, pixel_mask=(~mask).long(), output_hidden_states=False)
    # per-layer predictions, recomputed like the oracle's own head loop
    hidden = output.intermediate_hidden_states  # (B, num_layers, Q, D)
    references = [output.init_reference_points] + [
        output.intermediate_reference_points[:, layer] for layer in range(hidden.shape[1] - 1)
    ]
    from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

    layers = []
    with torch.no_grad():
        for layer in range(hidden.shape[1]):
            delta = model.bbox_embed[layer](hidden[:, layer])
            reference = inverse_sigmoid(references[layer])
            if reference.shape[-1] == 4:
                logits_box = delta + reference
            else:
                logits_box = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            layers.append(
                {"pred_logits": model.class_embed[layer](hidden[:, layer]), "pred_boxes": logits_box.sigmoid()}
            )
    assert torch.equal(layers[-1]["pred_logits"], output.logits)
    assert torch.equal(layers[-1]["pred_boxes"], output.pred_boxes)
    result = {**layers[-1], "aux_outputs": layers[:-1]}
    if output.enc_outputs_class is not None:
        result["enc_outputs"] = {
            "pred_logits": output.enc_outputs_class,
            "pred_boxes": output.enc_outputs_coord_logits.sigmoid(),
        }
    return result
