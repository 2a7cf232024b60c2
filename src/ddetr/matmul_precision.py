"""The float32 matrix-product precision of the process: one switch for matrix products and convolutions."""

from __future__ import annotations

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(precision: str) -> None:
    """``torch.set_float32_matmul_precision(precision)``, with cuDNN convolutions following it.

    ``high`` and ``medium`` let float32 matrix products and convolutions use TF32 on GPUs that have it
    (Ampere and later); ``highest`` keeps full float32; on the CPU ``high`` changes nothing.
    """
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"  # convolutions follow the same setting
