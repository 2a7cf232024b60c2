"""IDEA-Research/DINO checkpoints (``checkpoint0011_4scale.pth``-style) -> ddetr's ``variant=dino`` model.

A DINO checkpoint is ``{"model": state_dict, "args": argparse.Namespace, ...}``; ``args`` holds DINO's
config (``config/DINO/DINO_4scale.py`` and its command line). ``dino_options`` turns it into
``DeformableDETRConfig`` fields, ``dino_to_ddetr`` renames the weights. Checked against DINO's own code
(commit faa8520) by ``tests/test_convert_dino.py``; docs/dino.md lists what is supported.

Name mapping, DINO -> ddetr (everything not listed keeps its name):

- ``backbone.0.body.*`` -> ``backbone.body.*`` (DINO's Joiner, as the official Deformable DETR);
- encoder layers ``norm1``/``norm2`` and decoder layers ``norm1``/``norm2``/``norm3`` as for the official
  checkpoints (``ddetr.convert.official``); ``transformer.decoder.norm``, ``transformer.decoder.ref_point_head``,
  ``transformer.tgt_embed``, ``transformer.enc_output(_norm)`` and ``transformer.level_embed`` keep their names;
- ``transformer.enc_out_class_embed`` / ``transformer.enc_out_bbox_embed`` -> ``enc_class_embed`` / ``enc_bbox_embed``;
- ``class_embed.{i}`` / ``bbox_embed.{i}`` (one shared head stored once per decoder layer, all equal) ->
  ``class_embed.0`` / ``bbox_embed.0``;
- ``label_enc.weight`` (DINO's denoising label book, ``dn_labelbook_size + 1`` rows) -> its first
  ``num_classes`` rows as ``denoising.label_embed.weight`` when denoising is on (``use_dn``), else dropped.

Dropped (and only these): ``transformer.decoder.class_embed.*`` and ``transformer.decoder.bbox_embed.*``
(aliases of the heads) and ``*.num_batches_tracked``. Any other key that does not fit is an error.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddetr.convert.official import StateDict, _rename_layer_key
from ddetr.models.backbones.resnet import BOTTLENECK_RESNETS
from ddetr.models.config import DeformableDETRConfig, LossConfig

DINO_COMMIT = "faa8520"  # the IDEA-Research/DINO commit the conversion is checked against

# DINO args -> the value ddetr's model has (anything else is an architecture ddetr does not build)
_REQUIRED = {
    "modelname": "dino",
    "query_dim": 4,
    "two_stage_type": "standard",
    "position_embedding": "sine",
    "transformer_activation": "relu",
    "decoder_sa_type": "sa",
    "decoder_module_seq": ["sa", "ca", "ffn"],
    "pre_norm": False,
    "num_patterns": 0,
    "two_stage_pat_embed": 0,
    "two_stage_add_query_num": 0,
    "two_stage_learn_wh": False,
    "two_stage_keep_all_tokens": False,
    "dec_layer_number": None,
    "add_channel_attention": False,
    "use_deformable_box_attn": False,
    "embed_init_tgt": True,
    "dec_pred_class_embed_share": True,
    "dec_pred_bbox_embed_share": True,
    "masks": False,
    "unic_layers": 0,
}
# DINO-4scale's values (config/DINO/DINO_4scale.py) of the options read here: the defaults for a file without args
DINO_4SCALE = {
    "backbone": "resnet50",
    "num_feature_levels": 4,
    "return_interm_indices": [1, 2, 3],
    "hidden_dim": 256,
    "nheads": 8,
    "enc_layers": 6,
    "dec_layers": 6,
    "dim_feedforward": 2048,
    "dropout": 0.0,
    "num_queries": 900,
    "enc_n_points": 4,
    "dec_n_points": 4,
    "pe_temperatureH": 20,
    "pe_temperatureW": 20,
    "use_dn": True,
    "dn_number": 100,
    "dn_label_noise_ratio": 0.5,
    "dn_box_noise_scale": 0.4,
    "num_select": 300,
}
_SAME_NAME = (
    "num_feature_levels",
    "hidden_dim",
    "nheads",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "dropout",
    "num_queries",
    "enc_n_points",
    "dec_n_points",
)
_OTHER_OPTIONS = ("dilation", "use_detached_boxes_dec_out", "decoder_layer_noise", "dn_labelbook_size")
_LOSS_NAMES = (
    "set_cost_class",
    "set_cost_bbox",
    "set_cost_giou",
    "cls_loss_coef",
    "bbox_loss_coef",
    "giou_loss_coef",
    "focal_alpha",
)
_LEVELS = {(1, 2, 3): 8, (0, 1, 2, 3): 4}  # DINO's return_interm_indices -> backbone.min_stride
_DROPPED = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")
_RENAMED = {
    "backbone.0.body.": "backbone.body.",
    "transformer.enc_out_class_embed.": "enc_class_embed.",
    "transformer.enc_out_bbox_embed.": "enc_bbox_embed.",
}


def dino_options(args: Mapping[str, Any], source: str = "DINO args") -> dict[str, Any]:
    """``DeformableDETRConfig`` fields (without ``num_classes``) from DINO's saved ``args`` (a dict).

    Raises:
        ValueError: naming every DINO option whose value ddetr does not build.
    """
    unsupported = [
        f"{name}={args[name]!r} (ddetr builds {value!r})"
        for name, value in _REQUIRED.items()
        if name in args and args[name] != value and not (name == "position_embedding" and args[name] == "v2")
    ]
    if args.get("decoder_layer_noise"):
        unsupported.append("decoder_layer_noise=True (ddetr builds False)")
    if args.get("pe_temperatureH", 20) != args.get("pe_temperatureW", 20):
        unsupported.append(f"pe_temperatureH={args['pe_temperatureH']} != pe_temperatureW={args['pe_temperatureW']}")
    levels = tuple(args.get("return_interm_indices", (1, 2, 3)))
    if levels not in _LEVELS:
        unsupported.append(f"return_interm_indices={list(levels)} (ddetr builds [1, 2, 3] or [0, 1, 2, 3])")
    backbone = args.get("backbone", "resnet50")
    if backbone not in BOTTLENECK_RESNETS:
        unsupported.append(f"backbone={backbone!r} (ddetr converts {list(BOTTLENECK_RESNETS)})")
    if unsupported:
        raise ValueError(f"{source}: DINO options ddetr does not build: {'; '.join(unsupported)}")
    options = {name: args[name] for name in _SAME_NAME if name in args}
    return {
        **options,
        "backbone": {"name": backbone, "dilation": bool(args.get("dilation", False)), "min_stride": _LEVELS[levels]},
        "variant": "dino",
        "position_temperature": float(args.get("pe_temperatureH", 20)),
        "two_stage": True,
        "with_box_refine": True,
        "query_selection": "mixed",
        # DINO's decoder returns the undetached anchors unless use_detached_boxes_dec_out
        "look_forward_twice": not args.get("use_detached_boxes_dec_out", False),
        "denoising": {
            "enabled": bool(args.get("use_dn", True)),
            "num_queries": int(args.get("dn_number", 100)),
            "label_noise_ratio": float(args.get("dn_label_noise_ratio", 0.5)),
            "box_noise_scale": float(args.get("dn_box_noise_scale", 0.4)),
        },
    }


def dino_loss(args: Mapping[str, Any]) -> LossConfig:
    """The matcher costs, loss weights and focal alpha of DINO's ``args`` (ours where absent)."""
    return LossConfig.from_dict({name: args[name] for name in _LOSS_NAMES if name in args})


def _shared_head(state_dict: Mapping[str, torch.Tensor], name: str, dec_layers: int) -> StateDict:
    """``{name}.0.*`` of DINO's per-layer copies ``{name}.{i}.*`` of one shared head, checked equal."""
    heads: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(rf"{name}\.(\d+)\.(.+)", key)
        if match:
            heads.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if sorted(heads) != list(range(dec_layers)):
        raise ValueError(
            f"expected {name}.0..{dec_layers - 1} (dec_layers={dec_layers}), found indices {sorted(heads)}"
        )
    for index, head in heads.items():
        if head.keys() != heads[0].keys() or any(not torch.equal(head[k], heads[0][k]) for k in head):
            raise ValueError(f"{name}.{index} differs from {name}.0: ddetr converts DINO's shared heads only")
    return {f"{name}.0.{suffix}": value for suffix, value in heads[0].items()}


def dino_to_ddetr(
    state_dict: Mapping[str, torch.Tensor], num_classes: int, dec_layers: int, denoising: bool
) -> StateDict:
    """Renames a DINO state dict to ``DeformableDETR``'s (``variant=dino``) names (module docstring)."""
    converted: StateDict = {}
    for name in ("class_embed", "bbox_embed"):
        converted.update(_shared_head(state_dict, name, dec_layers))
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith(_DROPPED) or re.match(r"(class|bbox)_embed\.\d", key):
            continue
        if key == "label_enc.weight":
            if value.shape[0] < num_classes:
                raise ValueError(f"label_enc has {value.shape[0]} rows, fewer than the {num_classes} classes")
            if denoising:
                converted["denoising.label_embed.weight"] = value[:num_classes]
            continue
        for prefix, ours in _RENAMED.items():
            if key.startswith(prefix):
                key = ours + key[len(prefix) :]
                break
        converted[_rename_layer_key(key)] = value
    return converted


def read_dino(path: str | Path, trust: bool = False) -> tuple[StateDict, dict[str, Any]]:
    """The weights and the saved ``args`` (a dict) of a DINO checkpoint, read weights-only: ``args`` is an
    ``argparse.Namespace`` of plain values, the one class allowed besides torch's (``trust``: in full)."""
    from ddetr.checkpoints import CheckpointError, load_file

    checkpoint = load_file(path, "DINO checkpoint", trust=trust, safe_classes=(argparse.Namespace,))
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"DINO checkpoint: {path} is not a DINO checkpoint (no 'model' entry)")
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else (args or {})
    if not isinstance(args, dict):
        raise CheckpointError(f"DINO checkpoint: {path}: 'args' is a {type(args).__name__}, not DINO's options")
    return checkpoint["model"], args


def load_dino(path: str | Path, trust_checkpoint: bool = False, num_select: int | None = None, **overrides: Any):
    """Loads a DINO checkpoint as a ``DeformableDETRModule`` (``variant=dino``) in eval mode.

    Args:
        path: a DINO ``.pth`` (``{"model": ..., "args": ...}``), read weights-only (tensors, plain values
            and the ``argparse.Namespace`` of ``args``); ``CheckpointRefusedError`` for other classes.
        trust_checkpoint: unpickle the file in full instead; it can run any code it holds.
        num_select: detections kept per image (default: DINO's ``num_select`` from ``args``, else 300).
        overrides: DINO option names over the saved ``args`` (for a file without ``args``, e.g.
            ``num_feature_levels=5 return_interm_indices=[0,1,2,3]``); defaults: DINO-4scale's.
    """
    from ddetr.convert import _build_module  # the package imports this module first

    known = {*_REQUIRED, *_SAME_NAME, *DINO_4SCALE, *_LOSS_NAMES, *_OTHER_OPTIONS}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown DINO options {unknown}; expected some of {sorted(known)}")
    state_dict, saved = read_dino(path, trust_checkpoint)
    args = {**DINO_4SCALE, **saved, **overrides}
    if "class_embed.0.weight" not in state_dict:
        raise KeyError(f"{path}: the checkpoint has no class_embed.0.weight")
    num_classes = int(state_dict["class_embed.0.weight"].shape[0])
    options = dino_options(args, str(path))
    config = DeformableDETRConfig.from_dict(options, num_classes=num_classes)
    converted = dino_to_ddetr(state_dict, num_classes, config.dec_layers, config.denoising.enabled)
    select = num_select if num_select is not None else int(args["num_select"])
    return _build_module(converted, config, str(path), loss=dino_loss(args), num_select=select)
