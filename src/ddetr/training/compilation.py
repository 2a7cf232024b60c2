"""What ``model.compile`` means: which parts of a step run through ``torch.compile``, and how.

| setting | the detector's forward | the losses after the matching | ``torch.compile`` options |
|---|---|---|---|
| ``false`` | eager | eager | - |
| ``true`` | compiled | eager | ``dynamic=True`` |
| ``"reduce-overhead"`` | compiled | compiled | ``dynamic=True, mode="reduce-overhead"`` |

The Hungarian matcher always runs eagerly between the two (scipy on the host). With
``"reduce-overhead"`` inductor replays each compiled graph as a CUDA graph on a GPU (one recorded
per distinct input shape: per padded image size for the forward, per number of matched pairs for
the losses); on the CPU it runs the same compiled code without graphs. So that a run records few
graphs, ``"reduce-overhead"`` bounds both: the batch is padded to an image-size bucket
(``shape_buckets.pad_to_bucket``, in ``DeformableDETRModule``) and the matched pairs to a fixed maximum
with a mask (``SetCriterion.compile_losses(pad_pairs=True)``); docs/speed.md, "CUDA graph keys". A run-time choice: nothing
of it is saved with the model, and the compiled callables are functions, not modules, so state
dict names and checkpoints are those of the eager model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ddetr.models.criterion import SetCriterion
from ddetr.training.shape_buckets import pad_to_bucket

REDUCE_OVERHEAD = "reduce-overhead"
COMPILE_SETTINGS = (False, True, REDUCE_OVERHEAD)


def compile_options(setting: bool | str) -> dict[str, Any] | None:
    """``torch.compile``'s keyword arguments for a ``model.compile`` setting; None for eager.

    Raises:
        ValueError: ``setting`` is not one of ``COMPILE_SETTINGS`` (one line naming them).
    """
    if setting is False:
        return None
    if setting is True:
        return {"dynamic": True}
    if setting == REDUCE_OVERHEAD:
        return {"dynamic": True, "mode": REDUCE_OVERHEAD}
    raise ValueError(f"model.compile must be false, true or {REDUCE_OVERHEAD!r}, got {setting!r}")


def compile_step(model: nn.Module, criterion: SetCriterion, setting: bool | str) -> Callable[..., Any] | None:
    """The compiled forward a step calls instead of ``model`` (None: eager, call ``model``); with
    ``"reduce-overhead"`` the criterion's losses after the matching are compiled too (in place,
    ``SetCriterion.compile_losses``). ``model`` itself stays eager: export, hooks and pictures see
    the plain module."""
    options = compile_options(setting)
    if options is None:
        return None
    if setting == REDUCE_OVERHEAD:
        criterion.compile_losses(pad_pairs=True, **options)
    return torch.compile(model.forward, **options)


def mark_step_begin(setting: bool | str) -> None:
    """With ``"reduce-overhead"``: a new step begins, so CUDA graphs may reuse the memory of the
    previous step's outputs (whatever must outlive a step is copied out before; see
    ``DeformableDETRModule``). Nothing otherwise."""
    if setting == REDUCE_OVERHEAD:
        torch.compiler.cudagraph_mark_step_begin()


def bucket_batch(setting: bool | str, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """With ``"reduce-overhead"``: ``images`` (B, 3, H, W) and ``mask`` (B, H, W) padded to their
    image-size bucket (``shape_buckets.pad_to_bucket``), so few CUDA graphs are recorded. Otherwise
    the batch as it is."""
    if setting == REDUCE_OVERHEAD:
        return pad_to_bucket(images, mask)
    return images, mask
