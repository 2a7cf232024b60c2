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


ATOL = 1e-4


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda message: f"{what}: {message}")


def assert_outputs_close(ours: dict, reference: dict, atol: float = ATOL) -> None:
    """Final, every auxiliary and (two-stage) the encoder outputs agree within ``atol``."""
    assert len(ours["aux_outputs"]) == len(reference["aux_outputs"])
    assert ("enc_outputs" in ours) == ("enc_outputs" in reference)
    pairs = [("final", ours, reference)]
    pairs += [
        (f"aux {layer}", mine, theirs)
        for layer, (mine, theirs) in enumerate(zip(ours["aux_outputs"], reference["aux_outputs"], strict=True))
    ]
    if "enc_outputs" in reference:
        pairs.append(("enc", ours["enc_outputs"], reference["enc_outputs"]))
    for what, mine, theirs in pairs:
        for key in ("pred_logits", "pred_boxes"):
            _assert_close(mine[key], theirs[key], atol, f"{what} {key}")


def official_names_from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official-format state dict built from transformers 5.x names, written independently of
    ddetr.convert from the name list in docs/semantics.md and src/ddetr/convert/official.py."""
    replacements = [
        ("model.backbone.model.", "backbone.0.body."),
        ("model.input_proj.", "input_proj."),
        ("model.level_embed", "transformer.level_embed"),
        ("model.reference_points.", "transformer.reference_points."),
        ("model.enc_output_norm.", "transformer.enc_output_norm."),
        ("model.enc_output.", "transformer.enc_output."),
        ("model.pos_trans_norm.", "transformer.pos_trans_norm."),
        ("model.pos_trans.", "transformer.pos_trans."),
        ("model.query_position_embeddings.", "query_embed."),
        ("model.encoder.", "transformer.encoder."),
        ("model.decoder.", "transformer.decoder."),
        (".mlp.fc1.", ".linear1."),
        (".mlp.fc2.", ".linear2."),
        (".encoder_attn.", ".cross_attn."),
        (".self_attn.o_proj.", ".self_attn.out_proj."),
    ]
    official = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for old, new in replacements:
            key = key.replace(old, new)
        if key.startswith("transformer.encoder."):
            key = key.replace(".self_attn_layer_norm.", ".norm1.").replace(".final_layer_norm.", ".norm2.")
        elif key.startswith("transformer.decoder."):
            key = key.replace(".encoder_attn_layer_norm.", ".norm1.")
            key = key.replace(".self_attn_layer_norm.", ".norm2.").replace(".final_layer_norm.", ".norm3.")
        for projection in ("q_proj", "k_proj", "v_proj"):
            if f".self_attn.{projection}." in key:
                prefix, kind = key.split(f".{projection}.")
                qkv.setdefault(f"{prefix}.in_proj_{kind}", {})[projection[0]] = value
                break
        else:
            official[key] = value
    for key, parts in qkv.items():
        official[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return official
