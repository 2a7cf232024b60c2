"""The command line of ``python -m ddetr.convert {official,hf} IN OUT [key=value ...]``."""

from __future__ import annotations

import argparse
from typing import Any

from ddetr.convert import load_hf, load_official
from ddetr.models.config import OFFICIAL_OPTIONS
from ddetr.training.checkpoints import save_checkpoint


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
        help=f"official options as key=value, e.g. with_box_refine=true; keys: {sorted(OFFICIAL_OPTIONS)}",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    loader = load_official if args.kind == "official" else load_hf
    module = loader(args.input, **overrides)
    save_checkpoint(module, args.output, args.kind)
    print(f"wrote {args.output} ({module.hparams['num_classes']} classes, converted from {args.kind})")
    return 0
