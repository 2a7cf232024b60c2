"""The command line of ``python -m ddetr.convert {official,hf,dino} IN OUT [key=value ...]``.

``dino`` converts an IDEA-Research/DINO checkpoint (``checkpoint0011_4scale.pth``-style); its ``key=value``
items are DINO option names over the file's saved ``args`` (``ddetr.convert.dino``, docs/dino.md).

``IN`` is read weights-only; ``trust_checkpoint=true`` among the ``key=value`` items unpickles it in full
(only for a file you trust: it can run any code it holds). ``OUT`` is written atomically."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ddetr.checkpoints import CheckpointError, save_checkpoint
from ddetr.convert import load_hf, load_official
from ddetr.convert.dino import load_dino
from ddetr.models.config import OFFICIAL_OPTIONS


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if text.startswith("["):  # a list, e.g. DINO's return_interm_indices=[0,1,2,3]
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"expected a JSON list, got {text!r} ({error})") from None
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
        description="Convert an official Deformable DETR, a transformers or a DINO checkpoint to a ddetr checkpoint.",
    )
    parser.add_argument("kind", choices=("official", "hf", "dino"), help="format of IN")
    parser.add_argument(
        "input", help="official .pth file, transformers directory / state-dict file, or IDEA-Research/DINO .pth file"
    )
    parser.add_argument("output", help="ddetr checkpoint to write (.ckpt)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help=f"official options as key=value, e.g. with_box_refine=true; keys: {sorted(OFFICIAL_OPTIONS)} "
        "(dino: DINO's option names, e.g. num_select=100); "
        "and trust_checkpoint=true: unpickle IN in full (it can run any code it holds; only for a file you trust)",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    trust = overrides.pop("trust_checkpoint", False)
    if not isinstance(trust, bool):
        raise SystemExit(f"error: trust_checkpoint must be true or false, got {trust!r}")
    loader = {"official": load_official, "hf": load_hf, "dino": load_dino}[args.kind]
    try:
        module = loader(args.input, trust_checkpoint=trust, **overrides)
        save_checkpoint(module, args.output, args.kind)
    except CheckpointError as error:  # one line naming the file and the cause, no traceback
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.output} ({module.hparams['num_classes']} classes, converted from {args.kind})")
    return 0
