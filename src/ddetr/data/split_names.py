"""Split names: the names a split's folder, file or YAML key goes by in exported datasets.

A dataset tool names the validation split `val` (Ultralytics, COCO, VOC), `valid` (Roboflow) or
`validation`; `resolve_split` finds which of these a dataset uses, so `train_split=train`,
`val_split=val`, `test_split=test` fit every layout.
"""

from __future__ import annotations

from collections.abc import Callable

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "valid", "validation"),
    "test": ("test",),
}


def split_candidates(name: str) -> tuple[str, ...]:
    """The names `name` may go by: its aliases for a standard split name, else `name` alone."""
    return SPLIT_ALIASES.get(name, (name,))


def resolve_split(name: str, exists: Callable[[str], bool]) -> str:
    """The first of `split_candidates(name)` for which `exists` holds; `name` itself when none does (the
    caller's error then names what it looked for)."""
    for candidate in split_candidates(name):
        if exists(candidate):
            return candidate
    return name
