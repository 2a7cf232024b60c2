"""The official Deformable DETR -> ddetr name mapping.

Name mapping, official -> ddetr (everything not listed keeps its name):

- ``backbone.0.body.*`` -> ``backbone.body.*``
- encoder layers: ``norm1`` -> ``self_attn_norm``, ``norm2`` -> ``ffn_norm``
- decoder layers: ``norm2`` -> ``self_attn_norm``, ``norm1`` -> ``cross_attn_norm``, ``norm3`` -> ``ffn_norm``
- heads: without box refinement the official holds one copy of the shared head per layer
  (``class_embed.{i}``, ``bbox_embed.{i}``, all equal): they collapse into ``class_embed.0`` /
  ``bbox_embed.0``. With two-stage the extra last heads ``class_embed.{dec_layers}`` /
  ``bbox_embed.{dec_layers}`` become ``enc_class_embed`` / ``enc_bbox_embed``.

Official keys that are dropped (and only these): ``transformer.decoder.bbox_embed.*`` and
``transformer.decoder.class_embed.*`` (aliases of the top-level heads, stored twice by the official),
and ``*.num_batches_tracked`` (absent from frozen batch norm). Any other key that does not fit the
model is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ddetr.models.backbones.resnet import RESNET_LAYOUTS
from ddetr.models.config import OFFICIAL_OPTIONS, DeformableDETRConfig

StateDict = dict[str, torch.Tensor]


def official_defaults() -> dict[str, Any]:
    """The official options with their default values (from ``DeformableDETRConfig``)."""
    return DeformableDETRConfig().official_options()


def check_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """``flags`` over the official defaults; unknown names raise ``TypeError``."""
    unknown = sorted(set(flags) - set(OFFICIAL_OPTIONS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; expected some of {sorted(OFFICIAL_OPTIONS)}")
    return {**official_defaults(), **flags}


_ENCODER_NORMS = {"norm1": "self_attn_norm", "norm2": "ffn_norm"}
_DECODER_NORMS = {"norm2": "self_attn_norm", "norm1": "cross_attn_norm", "norm3": "ffn_norm"}
_DROPPED_OFFICIAL = ("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")


def _rename_layer_key(key: str) -> str:
    """Renames the norms inside official encoder and decoder layers."""
    match = re.match(r"(transformer\.(encoder|decoder)\.layers\.\d+\.)(norm\d)(\..*)", key)
    if match is None:
        return key
    prefix, part, norm, rest = match.groups()
    table = _ENCODER_NORMS if part == "encoder" else _DECODER_NORMS
    return prefix + table[norm] + rest


def _head_indices(state_dict: Mapping[str, torch.Tensor], name: str) -> dict[int, dict[str, torch.Tensor]]:
    """``{index: {suffix: tensor}}`` for the keys ``{name}.{index}.{suffix}``."""
    heads: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(rf"{name}\.(\d+)\.(.+)", key)
        if match:
            heads.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return heads


def _convert_heads(state_dict: Mapping[str, torch.Tensor], flags: Mapping[str, Any]) -> StateDict:
    dec_layers, refine, two_stage = flags["dec_layers"], flags["with_box_refine"], flags["two_stage"]
    num_pred = dec_layers + 1 if two_stage else dec_layers
    converted: StateDict = {}
    for name, enc_name in (("class_embed", "enc_class_embed"), ("bbox_embed", "enc_bbox_embed")):
        heads = _head_indices(state_dict, name)
        if refine and sorted(heads) != list(range(num_pred)):
            raise ValueError(
                f"with_box_refine={refine}, two_stage={two_stage}, dec_layers={dec_layers} expect "
                f"{name}.0..{num_pred - 1}, the checkpoint has indices {sorted(heads)}; check these options"
            )
        if not heads or 0 not in heads:
            raise ValueError(f"the checkpoint has no {name}.0")
        if not refine:
            if two_stage:
                raise ValueError("the official two-stage model needs with_box_refine=True")
            if max(heads) >= num_pred:
                raise ValueError(
                    f"the checkpoint has {max(heads) + 1} {name} heads, dec_layers={dec_layers} without two-stage "
                    f"expects {num_pred}; is it a two-stage checkpoint (two_stage=True, with_box_refine=True)?"
                )
            for index, head in heads.items():
                if any(not torch.equal(head[suffix], heads[0][suffix]) for suffix in heads[0]):
                    raise ValueError(
                        f"{name}.{index} differs from {name}.0, but without box refinement all layers share one head; "
                        "is it a box-refinement checkpoint (with_box_refine=True)?"
                    )
            heads = {0: heads[0]}
        for index, head in heads.items():
            target = enc_name if two_stage and index == dec_layers else f"{name}.{index}"
            converted.update({f"{target}.{suffix}": value for suffix, value in head.items()})
    return converted


def official_to_ddetr(state_dict: Mapping[str, torch.Tensor], **flags: Any) -> StateDict:
    """Maps an official Deformable DETR state dict (``checkpoint["model"]``) to ``DeformableDETR``'s names.

    Args:
        state_dict: the official model's state dict.
        flags: official option names (see ``OFFICIAL_OPTIONS``); only ``dec_layers``,
            ``with_box_refine`` and ``two_stage`` affect the mapping.

    Returns:
        A state dict for ``build_deformable_detr(...)`` with the same options. See the module
        docstring for the renamed and dropped keys.
    """
    flags = check_flags(flags)
    converted: StateDict = {}
    heads: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith(_DROPPED_OFFICIAL) or key.endswith("num_batches_tracked"):
            continue
        if key.startswith(("class_embed.", "bbox_embed.")):
            heads[key] = value
        elif key.startswith("backbone.0.body."):
            converted["backbone.body." + key.removeprefix("backbone.0.body.")] = value
        else:
            converted[_rename_layer_key(key)] = value
    converted.update(_convert_heads(heads, flags))
    return converted


def infer_official_flags(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The options that an official state dict's names and shapes determine.

    Returns a subset of ``backbone`` (ResNet depth), ``num_feature_levels``, ``hidden_dim``,
    ``enc_layers``, ``dec_layers``, ``dim_feedforward``, ``two_stage``, ``with_box_refine`` and
    ``num_queries`` (not for two-stage); ``nheads``, the point counts and ``dilation`` are not
    recoverable from the weights.
    """
    flags: dict[str, Any] = {}
    if "transformer.level_embed" in state_dict:
        flags["num_feature_levels"], flags["hidden_dim"] = state_dict["transformer.level_embed"].shape
    for part in ("encoder", "decoder"):
        layers = {int(m.group(1)) for k in state_dict if (m := re.match(rf"transformer\.{part}\.layers\.(\d+)\.", k))}
        if layers:
            flags["enc_layers" if part == "encoder" else "dec_layers"] = max(layers) + 1
    if "transformer.encoder.layers.0.linear1.weight" in state_dict:
        flags["dim_feedforward"] = state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0]
    flags["two_stage"] = "transformer.enc_output.weight" in state_dict
    if "dec_layers" in flags:
        num_pred = flags["dec_layers"] + int(flags["two_stage"])
        heads = _head_indices(state_dict, "class_embed")
        distinct = any(
            not torch.equal(heads[index]["weight"], heads[0]["weight"])
            for index in heads
            if index < num_pred and 0 in heads
        )
        flags["with_box_refine"] = "transformer.decoder.bbox_embed.0.layers.0.weight" in state_dict or distinct
    if "query_embed.weight" in state_dict:
        flags["num_queries"] = state_dict["query_embed.weight"].shape[0]
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.0\.body\.layer3\.(\d+)\.", k))}
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
    depth = {layout: name for name, layout in RESNET_LAYOUTS.items()}
    if blocks and (len(blocks), bottleneck) in depth:
        flags["backbone"] = depth[(len(blocks), bottleneck)]
    return flags


def verify_flags(flags: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    inferred = infer_official_flags(state_dict)
    conflicts = {name: (flags[name], value) for name, value in inferred.items() if flags[name] != value}
    if conflicts:
        details = ", ".join(
            f"{name}={given!r} but the weights imply {value!r}" for name, (given, value) in conflicts.items()
        )
        raise ValueError(f"{source}: options do not fit the checkpoint: {details}")
