"""``RNGStateCallback``: the random states in every checkpoint, so a resumed run draws the same numbers."""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


class RNGStateCallback(L.Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) random states in every checkpoint and restores
    them on resume, so a resumed run draws the same random numbers as an uninterrupted one.

    The states are stored as tensors and plain Python values, so checkpoints stay loadable with
    ``torch.load(..., weights_only=True)``."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        checkpoint["rng_states"] = {
            "python": random.getstate(),
            "numpy": [
                kind,
                torch.from_numpy(keys.astype(np.int64)),
                int(position),
                int(has_gauss),
                float(cached_gaussian),
            ],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            log.warning("the checkpoint holds no random states; the resumed run will draw other random numbers")
            return
        random.setstate(states["python"])
        kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        torch.set_rng_state(states["torch"])
        if torch.cuda.is_available() and states["cuda"]:
            torch.cuda.set_rng_state_all(states["cuda"])
