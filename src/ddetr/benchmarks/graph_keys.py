"""``python -m ddetr.bench keys``: how many CUDA graphs ``model.compile=reduce-overhead`` would record.

Under ``reduce-overhead`` a GPU records one CUDA graph per distinct input shape of each compiled
function: the detector's forward per padded image shape, the losses after the matching per
(logits shape, number of matched pairs). The CPU records no graph, but the shapes are decided on
the host, so they can be counted here: a COCO-like training pipeline (images with COCO-like sizes,
long side 640, short side 300..640, 70% landscape; per image a COCO-like number of boxes, geometric
with mean 7.3, at most 93, 1% without a box) through the official training augmentation and
``collate_detection`` (batch 2), then the real criterion (6 decoder layers, 300 queries, 91
classes, the Hungarian matching of random predictions), for ``--steps`` steps. Counted with the data
config's default ``pad_to_multiple=1`` and no pair padding (today's keys), and with the bounds
``reduce-overhead`` applies (``shape_buckets.pad_to_bucket``, ``SetCriterion.compile_losses(pad_pairs=True)``).

Numbers printed, nothing asserted; no model, no timing.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ddetr.models.criterion import Matched, SetCriterion
from ddetr.models.matcher import HungarianMatcher

COCO_MEAN_BOXES, COCO_MAX_BOXES, COCO_EMPTY_SHARE = 7.3, 93, 0.01


class RecordingCriterion(SetCriterion):
    """A ``SetCriterion`` that records the number of pairs (and logits shape) its losses receive."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[tuple[int, ...], int]] = []

    def matched_losses(self, matched: Matched, num_boxes: torch.Tensor, log: bool) -> dict[str, torch.Tensor]:
        self.seen.append((tuple(matched.logits.shape), int(matched.layer.shape[0])))
        return super().matched_losses(matched, num_boxes, log)


def coco_like_samples(num_images: int, seed: int, num_classes: int = 91) -> list[tuple[torch.Tensor, dict]]:
    """``num_images`` samples of the official training augmentation (uint8 images, cxcywh targets)."""
    from ddetr.benchmarks.data import coco_like_size
    from ddetr.data import make_train_transforms

    rng = np.random.default_rng(seed)
    transform = make_train_transforms(normalize=False)
    samples = []
    for index in range(num_images):
        height, width = coco_like_size(rng)
        count = 0 if rng.uniform() < COCO_EMPTY_SHARE else min(int(rng.geometric(1 / COCO_MEAN_BOXES)), COCO_MAX_BOXES)
        corners = rng.uniform(0, 1, (count, 2)) * [width * 0.8, height * 0.8]  # (count, 2) x0, y0
        sizes = rng.uniform(0.05, 0.2, (count, 2)) * [width, height] + 4  # (count, 2) w, h
        boxes = np.concatenate([corners, np.minimum(corners + sizes, [width, height])], 1)  # (count, 4) xyxy
        image = np.zeros((height, width, 3), dtype=np.uint8)
        out, out_boxes, labels = transform(image, boxes, rng.integers(0, num_classes, count), seed=index)
        out_h, out_w = out.shape[-2:]
        scale = torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32)
        xyxy = out_boxes / scale  # (kept, 4) normalised
        cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)  # (kept, 4)
        samples.append((out, {"labels": labels, "boxes": cxcywh}))
    return samples


def count_keys(
    steps: int = 200,
    batch_size: int = 2,
    num_layers: int = 6,
    num_queries: int = 300,
    num_classes: int = 91,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Distinct forward shapes, loss pair counts and (padded shape, pairs) keys over ``steps`` batches,
    today (``pad_to_multiple=1``, no pair padding) and bounded (buckets + pair padding); with the share
    of batch pixels that is padding and the mean number of pairs the losses compute."""
    from ddetr.data.datamodule import collate_detection
    from ddetr.training.shape_buckets import pad_to_bucket

    samples = coco_like_samples(steps * batch_size, seed, num_classes)
    generator = torch.Generator().manual_seed(seed)
    criteria = {name: RecordingCriterion(num_classes, HungarianMatcher(), {}) for name in ("today", "bounded")}
    criteria["bounded"].pad_pairs = True
    shapes: dict[str, list[tuple[int, ...]]] = {"today": [], "bounded": []}
    content, pixels = 0, {"today": 0, "bounded": 0}
    for step in range(steps):
        batch = samples[step * batch_size : (step + 1) * batch_size]
        images, mask, targets = collate_detection(batch, pad_to_multiple=1)
        content += int((~mask).sum())
        padded_images, _ = pad_to_bucket(images, mask)
        logits = torch.randn(num_layers, batch_size, num_queries, num_classes, generator=generator)
        boxes = torch.rand(num_layers, batch_size, num_queries, 4, generator=generator) * 0.5 + 0.25
        outputs = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])],
        }
        for name, batch_images in (("today", images), ("bounded", padded_images)):
            shapes[name].append(tuple(batch_images.shape))
            pixels[name] += batch_images.shape[0] * batch_images.shape[-2] * batch_images.shape[-1]
            criteria[name](outputs, targets, sync_num_boxes=False)
    result = {}
    for name, criterion in criteria.items():
        pairs = [count for _, count in criterion.seen]
        result[name] = {
            "forward_shapes": len(set(shapes[name])),
            "loss_shapes": len(set(criterion.seen)),
            "keys": len(set(zip(shapes[name], criterion.seen))),
            "padding_share": 1 - content / pixels[name],
            "mean_pairs": float(np.mean(pairs)),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr.bench keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = count_keys(steps=args.steps, seed=args.seed)
    for name, info in result.items():
        print(
            f"{name:>7}: {info['keys']:>4} distinct (padded shape, pairs) keys over {args.steps} steps "
            f"(forward: {info['forward_shapes']} image shapes; losses: {info['loss_shapes']} pair counts, "
            f"{info['mean_pairs']:.0f} pairs on average); padding {100 * info['padding_share']:.1f}% of batch pixels"
        )
    sys.stdout.flush()
    return 0
