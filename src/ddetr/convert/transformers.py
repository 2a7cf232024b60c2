"""The transformers ``DeformableDetrForObjectDetection`` -> official name mapping.

transformers (4.x and 5.x names) -> official names, then as above: backbone
``model.backbone.model.*`` (5.x) or ``model.backbone.conv_encoder.model.*`` (4.x, timm ResNet only);
``model.level_embed``, ``model.reference_points``, ``model.enc_output(_norm)``,
``model.pos_trans(_norm)`` under ``transformer.``; ``model.query_position_embeddings`` ->
``query_embed``; encoder ``self_attn_layer_norm/final_layer_norm`` -> ``norm1/norm2``; decoder
``self_attn_layer_norm/encoder_attn_layer_norm/final_layer_norm`` -> ``norm2/norm1/norm3``,
``encoder_attn`` -> ``cross_attn``, ``q_proj/k_proj/v_proj`` packed into ``in_proj_weight/bias``,
``o_proj`` (``out_proj``) -> ``out_proj``; FFN ``mlp.fc1/mlp.fc2`` (``fc1/fc2``) -> ``linear1/linear2``;
``model.decoder.{bbox,class}_embed`` -> ``transformer.decoder.{bbox,class}_embed``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ddetr.convert.official import StateDict, official_defaults, official_to_ddetr

_HF_TOP = {
    "model.level_embed": "transformer.level_embed",
    "model.query_position_embeddings.weight": "query_embed.weight",
}
_HF_PREFIXES = (
    ("model.backbone.model.", "backbone.0.body."),
    ("model.backbone.conv_encoder.model.", "backbone.0.body."),
    ("model.input_proj.", "input_proj."),
    ("model.reference_points.", "transformer.reference_points."),
    ("model.enc_output.", "transformer.enc_output."),
    ("model.enc_output_norm.", "transformer.enc_output_norm."),
    ("model.pos_trans.", "transformer.pos_trans."),
    ("model.pos_trans_norm.", "transformer.pos_trans_norm."),
    ("model.decoder.bbox_embed.", "transformer.decoder.bbox_embed."),
    ("model.decoder.class_embed.", "transformer.decoder.class_embed."),
    ("class_embed.", "class_embed."),
    ("bbox_embed.", "bbox_embed."),
)
# official option -> transformers config key (the official defaults fill missing keys)
_HF_OPTIONS = {
    "num_feature_levels": "num_feature_levels",
    "hidden_dim": "d_model",
    "nheads": "encoder_attention_heads",
    "enc_layers": "encoder_layers",
    "dec_layers": "decoder_layers",
    "dim_feedforward": "encoder_ffn_dim",
    "dropout": "dropout",
    "enc_n_points": "encoder_n_points",
    "dec_n_points": "decoder_n_points",
}
_HF_ENCODER_LAYER = {
    "self_attn_layer_norm": "norm1",
    "final_layer_norm": "norm2",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "fc1": "linear1",
    "fc2": "linear2",
    "self_attn": "self_attn",
}
_HF_DECODER_LAYER = {
    "self_attn_layer_norm": "norm2",
    "encoder_attn_layer_norm": "norm1",
    "final_layer_norm": "norm3",
    "encoder_attn": "cross_attn",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "fc1": "linear1",
    "fc2": "linear2",
    "self_attn.o_proj": "self_attn.out_proj",
    "self_attn.out_proj": "self_attn.out_proj",
}


def _hf_layer_key(part: str, index: str, rest: str, packed: dict[str, dict[str, torch.Tensor]], value) -> str | None:
    """Official name of a key inside an HF encoder/decoder layer; q/k/v projections go to ``packed``."""
    if part == "decoder":
        match = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if match:
            packed.setdefault(f"transformer.decoder.layers.{index}.self_attn.in_proj_{match.group(2)}", {})[
                match.group(1)
            ] = value
            return None
    table = _HF_ENCODER_LAYER if part == "encoder" else _HF_DECODER_LAYER
    for hf_name in sorted(table, key=len, reverse=True):
        if rest.startswith(hf_name + "."):
            return f"transformer.{part}.layers.{index}.{table[hf_name]}{rest[len(hf_name) :]}"
    raise KeyError(f"unknown transformers key model.{part}.layers.{index}.{rest}")


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Maps a transformers ``DeformableDetrForObjectDetection`` state dict (timm ResNet backbone) to the
    official names. Heads that transformers stored only once because they were tied are restored from
    their twin (``bbox_embed.i`` <-> ``model.decoder.bbox_embed.i``)."""
    official: StateDict = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key in _HF_TOP:
            official[_HF_TOP[key]] = value
            continue
        match = re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
        if match:
            name = _hf_layer_key(*match.groups(), packed, value)
            if name is not None:
                official[name] = value
            continue
        for hf_prefix, official_prefix in _HF_PREFIXES:
            if key.startswith(hf_prefix):
                official[official_prefix + key[len(hf_prefix) :]] = value
                break
        else:
            if key.startswith("model.backbone."):
                raise KeyError(
                    f"unsupported transformers backbone key {key} (only timm ResNet backbones are supported)"
                )
            raise KeyError(f"unknown transformers key {key}")
    for name, parts in packed.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"incomplete q/k/v projections for {name}: have {sorted(parts)}")
        official[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    for top, inner in (
        ("bbox_embed.", "transformer.decoder.bbox_embed."),
        ("class_embed.", "transformer.decoder.class_embed."),
    ):
        for key in [k for k in official if k.startswith(inner)]:
            official.setdefault(top + key[len(inner) :], official[key])
    return official


def hf_config_to_flags(config: Mapping[str, Any]) -> dict[str, Any]:
    """Official-named options from a transformers ``DeformableDetrConfig`` dict (``config.json``)."""
    backbone_config = config.get("backbone_config") or {}
    if backbone_config and backbone_config.get("model_type") not in (None, "timm_backbone"):
        raise ValueError(
            f"only timm ResNet backbones are supported, got backbone_config {backbone_config.get('model_type')!r}"
        )
    if not backbone_config and config.get("use_timm_backbone") is False:
        raise ValueError("only timm ResNet backbones (use_timm_backbone=True) are supported")
    defaults = official_defaults()
    backbone = backbone_config.get("backbone") or config.get("backbone") or defaults["backbone"]
    for first, second in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if config.get(first, 0) != config.get(second, 0):
            raise ValueError(f"ddetr needs {first} == {second}, got {config.get(first)} and {config.get(second)}")
    two_stage = bool(config.get("two_stage", False))
    return {
        "backbone": backbone,
        "dilation": bool(config.get("dilation", False)),
        **{name: config.get(hf_name, defaults[name]) for name, hf_name in _HF_OPTIONS.items()},
        "num_queries": config.get("two_stage_num_proposals" if two_stage else "num_queries", defaults["num_queries"]),
        "with_box_refine": bool(config.get("with_box_refine", False)),
        "two_stage": two_stage,
    }


def hf_to_ddetr(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """Maps a transformers state dict to ``DeformableDETR``'s names, with the options of ``config``
    (a ``DeformableDetrConfig`` as a dict)."""
    return official_to_ddetr(hf_to_official(state_dict), **hf_config_to_flags(config))
