"""Random detection targets for the hand-made training batches of the step-level tests."""

from __future__ import annotations

import torch


def random_targets(generator: torch.Generator, counts=(2, 3), num_classes: int = 3) -> list[dict[str, torch.Tensor]]:
    """One target per entry of ``counts``: that many labels in ``[0, num_classes)`` and boxes (cx, cy, w, h)
    in [0.3, 0.6), drawn from ``generator`` in that order."""
    return [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=generator),
            "boxes": torch.rand(n, 4, generator=generator) * 0.3 + 0.3,
        }
        for n in counts
    ]
