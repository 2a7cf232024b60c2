"""Loading official Deformable DETR and transformers checkpoints into ddetr.

``load_official(path, **flags)`` and ``load_hf(path, **flags)`` return a ``DeformableDETRModule`` in eval
mode; ``python -m ddetr.convert {official,hf} IN OUT [key=value ...]`` writes a Lightning-style
checkpoint that ``DeformableDETRModule.load_from_checkpoint`` (and training, evaluation and
prediction) accept.

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

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

OFFICIAL_DEFAULTS: dict[str, Any] = {
    "backbone": "resnet50",
    "dilation": False,
    "num_feature_levels": 4,
    "hidden_dim": 256,
    "nheads": 8,
    "enc_layers": 6,
    "dec_layers": 6,
    "dim_feedforward": 1024,
    "dropout": 0.1,
    "num_queries": 300,
    "enc_n_points": 4,
    "dec_n_points": 4,
    "with_box_refine": False,
    "two_stage": False,
}

_ENCODER_NORMS = {"norm1": "self_attn_norm", "norm2": "ffn_norm"}
_DECODER_NORMS = {"norm2": "self_attn_norm", "norm1": "cross_attn_norm", "norm3": "ffn_norm"}
_DROPPED_OFFICIAL = ("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")


# --------------------------------------------------------------------------- official -> ddetr
def _check_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(flags) - set(OFFICIAL_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; expected some of {sorted(OFFICIAL_DEFAULTS)}")
    return {**OFFICIAL_DEFAULTS, **flags}


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
        flags: official option names (see ``OFFICIAL_DEFAULTS``); only ``dec_layers``,
            ``with_box_refine`` and ``two_stage`` affect the mapping.

    Returns:
        A state dict for ``build_deformable_detr(...)`` with the same options. See the module
        docstring for the renamed and dropped keys.
    """
    flags = _check_flags(flags)
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
    depth = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}
    if blocks and (len(blocks), bottleneck) in depth:
        flags["backbone"] = depth[(len(blocks), bottleneck)]
    return flags


def _verify_flags(flags: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    inferred = infer_official_flags(state_dict)
    conflicts = {name: (flags[name], value) for name, value in inferred.items() if flags[name] != value}
    if conflicts:
        details = ", ".join(
            f"{name}={given!r} but the weights imply {value!r}" for name, (given, value) in conflicts.items()
        )
        raise ValueError(f"{source}: options do not fit the checkpoint: {details}")


# --------------------------------------------------------------------------- transformers -> official
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
    backbone = backbone_config.get("backbone") or config.get("backbone") or "resnet50"
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
        "num_feature_levels": config.get("num_feature_levels", 4),
        "hidden_dim": config.get("d_model", 256),
        "nheads": config.get("encoder_attention_heads", 8),
        "enc_layers": config.get("encoder_layers", 6),
        "dec_layers": config.get("decoder_layers", 6),
        "dim_feedforward": config.get("encoder_ffn_dim", 1024),
        "dropout": config.get("dropout", 0.1),
        "num_queries": config.get("two_stage_num_proposals", 300) if two_stage else config.get("num_queries", 300),
        "enc_n_points": config.get("encoder_n_points", 4),
        "dec_n_points": config.get("decoder_n_points", 4),
        "with_box_refine": bool(config.get("with_box_refine", False)),
        "two_stage": two_stage,
    }


def hf_to_ddetr(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """Maps a transformers state dict to ``DeformableDETR``'s names, with the options of ``config``
    (a ``DeformableDetrConfig`` as a dict)."""
    return official_to_ddetr(hf_to_official(state_dict), **hf_config_to_flags(config))


# --------------------------------------------------------------------------- loading
def num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of classes: the rows of ``class_embed.0.weight``."""
    if "class_embed.0.weight" not in state_dict:
        raise KeyError("the checkpoint has no class_embed.0.weight")
    return int(state_dict["class_embed.0.weight"].shape[0])


def module_hyper_parameters(num_classes: int, flags: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``DeformableDETRModule`` for official-named ``flags``."""
    flags = _check_flags(flags)
    options = {name: value for name, value in flags.items() if name not in ("backbone", "dilation")}
    return {
        "num_classes": num_classes,
        "backbone": {"name": flags["backbone"], "dilation": flags["dilation"], "weights": None},
        **options,
        "aux_loss": True,
        "attn_backend": "auto",
    }


def _build_module(state_dict: StateDict, hyper_parameters: dict[str, Any], source: str):
    from ddetr.module import DeformableDETRModule

    module = DeformableDETRModule(**hyper_parameters)
    missing, unexpected = module.model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: converted weights do not fit the model (check the options): missing {missing[:10]} "
            f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})"
        )
    return module.eval()


def _official_state(path: str | Path) -> tuple[StateDict, dict[str, Any]]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: not an official Deformable DETR checkpoint (no 'model' entry)")
    args = checkpoint.get("args")
    args = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
    return checkpoint["model"], {name: args[name] for name in OFFICIAL_DEFAULTS if name in args}


def _resolve_official(path: str | Path, flags: Mapping[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    """Weights and options of an official checkpoint: explicit ``flags`` over the checkpoint's saved
    ``args`` over the official defaults, checked against the weights."""
    state_dict, saved = _official_state(path)
    resolved = _check_flags({**saved, **flags})
    _verify_flags(resolved, state_dict, str(path))
    return state_dict, resolved


def load_official(path: str | Path, **flags: Any):
    """Loads an official Deformable DETR checkpoint as a ``DeformableDETRModule`` in eval mode.

    Args:
        path: a ``.pth`` file whose ``model`` entry is the state dict.
        flags: official option names (``OFFICIAL_DEFAULTS``), e.g. ``with_box_refine=True``. Options
            not given come from the checkpoint's saved ``args`` when present, else the official
            defaults. ``num_classes`` comes from the weights. Options that contradict the weights
            (levels, layers, sizes, refinement, two-stage, ResNet depth) raise ``ValueError``.
    """
    state_dict, resolved = _resolve_official(path, flags)
    hyper_parameters = module_hyper_parameters(num_classes_of(state_dict), resolved)
    return _build_module(official_to_ddetr(state_dict, **resolved), hyper_parameters, str(path))


def _read_hf_weights(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:  # pragma: no cover - safetensors comes with transformers
            raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from error
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _resolve_hf(path: str | Path, flags: Mapping[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a saved DeformableDetrForObjectDetection)")
        config = json.loads(config_file.read_text())
        weights = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        if not weights:
            raise FileNotFoundError(
                f"{path}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not supported)"
            )
        resolved = _check_flags({**hf_config_to_flags(config), **flags})
        state_dict = _read_hf_weights(weights[0])
    elif path.is_file():
        resolved = _check_flags(flags)
        state_dict = _read_hf_weights(path)
    else:
        raise FileNotFoundError(f"no transformers checkpoint at {path}")
    return hf_to_official(state_dict), resolved


def load_hf(path: str | Path, **flags: Any):
    """Loads a transformers Deformable DETR as a ``DeformableDETRModule`` in eval mode.

    Args:
        path: a directory written by ``DeformableDetrForObjectDetection.save_pretrained`` (``config.json``
            + ``model.safetensors`` or ``pytorch_model.bin``; transformers itself is not needed), or a
            state-dict file (``.safetensors`` or a torch file), whose options then come from ``flags``.
        flags: official option names overriding the config (or the official defaults for a file).
    """
    official, resolved = _resolve_hf(path, flags)
    _verify_flags(resolved, official, str(path))
    hyper_parameters = module_hyper_parameters(num_classes_of(official), resolved)
    return _build_module(official_to_ddetr(official, **resolved), hyper_parameters, str(path))


def save_checkpoint(module, path: str | Path, converted_from: str) -> None:
    """Writes ``module`` as a Lightning checkpoint that ``DeformableDETRModule.load_from_checkpoint`` reads."""
    import lightning

    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "ddetr_converted_from": converted_from,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["with_box_refine=true", "num_queries=100"]`` -> ``{"with_box_refine": True, "num_queries": 100}``."""
    overrides = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name:
            raise ValueError(f"expected key=value, got {item!r}")
        overrides[name] = _parse_value(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddetr.convert",
        description="Convert an official Deformable DETR or a transformers checkpoint to a ddetr checkpoint.",
    )
    parser.add_argument("kind", choices=("official", "hf"), help="format of IN")
    parser.add_argument("input", help="official .pth file, or transformers directory / state-dict file")
    parser.add_argument("output", help="ddetr checkpoint to write (.ckpt)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help=f"official options as key=value, e.g. with_box_refine=true; keys: {sorted(OFFICIAL_DEFAULTS)}",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    loader = load_official if args.kind == "official" else load_hf
    module = loader(args.input, **overrides)
    save_checkpoint(module, args.output, args.kind)
    print(f"wrote {args.output} ({module.hparams['num_classes']} classes, converted from {args.kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
