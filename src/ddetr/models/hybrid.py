"""Hybrid matching (H-DETR, Jia et al. 2023): a one-to-many branch of extra queries, used only in training.

The branch's queries decode beside the model's own (``num_queries`` one-to-one queries) in the same decoder,
blind to them in self-attention (``ddetr.models.denoising.self_attention_mask``), and are matched by the
same Hungarian matcher to the ground truth repeated ``k`` times, so that up to ``k`` of them learn each
object. Inference and export decode the one-to-one queries alone, as a model without the branch.
"""

from __future__ import annotations

import torch

Targets = list[dict[str, torch.Tensor]]


def repeat_targets(targets: Targets, k: int) -> Targets:
    """Every image's ``labels`` and ``boxes`` repeated ``k`` times (``[a, b] -> [a, b, a, b, ...]``); the
    other keys are kept as they are."""
    return [
        {**target, "labels": target["labels"].repeat(k), "boxes": target["boxes"].repeat(k, 1)} for target in targets
    ]


def split_queries(
    layer_outputs: list[dict[str, torch.Tensor]], sizes: tuple[int, ...]
) -> list[list[dict[str, torch.Tensor]]]:
    """Per decoder layer outputs over consecutive query sets, split into one list of layer outputs per set.

    Args:
        layer_outputs: per layer, ``pred_logits`` (batch_size, sum(sizes), num_classes) and ``pred_boxes``
            (batch_size, sum(sizes), 4).
        sizes: the query count of every set, in order (e.g. denoising, one-to-one, one-to-many).

    Returns:
        Per set, per layer, ``pred_logits`` (batch_size, size, num_classes) and ``pred_boxes``
        (batch_size, size, 4).
    """
    parts: list[list[dict[str, torch.Tensor]]] = [[] for _ in sizes]
    for layer in layer_outputs:
        split = {key: value.split(list(sizes), dim=1) for key, value in layer.items()}
        for index, part in enumerate(parts):
            part.append({key: values[index] for key, values in split.items()})
    return parts
