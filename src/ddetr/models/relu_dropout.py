"""``dropout(relu(x))`` that keeps only its output for backward.

Autograd's composition keeps the ReLU output (for the ReLU's backward) and the dropout mask (for
the dropout's) besides the result, which the following linear layer keeps anyway. In a
feed-forward block the hidden width is 4 x hidden_dim, so these two are the largest activations of
an encoder layer: on a GPU (one-byte mask) about 5 of its ~18 hidden_dim-sized tensors. The result
alone suffices: ``y = dropout(relu(x))`` is positive exactly where ``x > 0`` and the element was
kept, so ``dx = dy * (y > 0) / (1 - p)``.

On the CPU path of ``ddetr.models.dropout`` (training, ``0 < p < 1``) it is one compiled pass each
way: ``ddetr::relu_dropout_forward`` (the ReLU inside the dropout kernel, with the mask that
``dropout`` draws for the same seed, and no mask written) and ``ddetr::relu_dropout_backward``
(the product above). In the R50 train step this replaces a ReLU pass, a mask and a scaling pass over
each (2, 3060, 1024) hidden activation. Elsewhere it is the two operators, with the product above as
the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddetr.models.dropout import compiled_path, dropout_seed


class _ReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        y = F.dropout(F.relu(x), p, training)
        # p = 1: y and dx are all zero
        ctx.scale = 1.0 / (1.0 - p) if training and 0.0 < p < 1.0 else 1.0
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (y,) = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, y, 0)  # grad where y > 0, else 0: one pass
        if ctx.scale != 1.0:
            grad.mul_(ctx.scale)
        return grad, None, None


def relu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``dropout(F.relu(x), p, training)`` (``ddetr.models.dropout``, the same mask for the same random
    state); under autograd it saves only its output for backward."""
    if training and 0.0 < p < 1.0 and compiled_path(x):
        return torch.ops.ddetr.relu_dropout_forward(x, p, dropout_seed())  # differentiable in x
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReluDropout.apply(x, p, training)
    return F.dropout(F.relu(x), p, training)
