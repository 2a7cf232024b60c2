"""Backbones side by side: ``python -m ddetr.benchmarks.backbones`` (the README's backbone table).

For each backbone (``--backbones``, comma list of ``model.backbone.name`` values) it builds the
detector of ``conf/model/small.yaml``'s sizes (hidden 64, 2 + 3 layers, 50 queries, 3 levels,
two-stage with box refinement; random weights, nothing downloaded) and prints its parameter count,
the backbone's, and the median CPU inference time of one ``--size`` x ``--size`` image (eval mode,
``torch.inference_mode``), all in one process, one backbone after the other (``--rounds`` rounds
interleaving them, so a busy neighbour on a shared machine slows every row alike).

``--channels-last`` instead times the backbone alone (official policy: frozen batch norm and stem),
forward and backward of a batch of two ``--size`` images, under each ``model.backbone.channels_last``
(``false``: NCHW; ``auto``: the input converted on the CPU, the default; ``true``: weights and input
converted), interleaved in one process, and prints the ratios to ``false`` per backbone.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from ddetr.models import DeformableDETRConfig, build_deformable_detr

DEFAULT_BACKBONES = "resnet18,resnet50,timm:convnext_atto,timm:efficientnet_b0"
NUM_CLASSES = 6  # the synthetic dataset's


def default_run_config(backbone: dict) -> DeformableDETRConfig:
    """The detector of ``conf/model/small.yaml`` (read from there) with ``backbone`` (``BackboneConfig``
    fields; the others at their defaults, the official policy) and ``NUM_CLASSES`` classes."""
    from omegaconf import OmegaConf

    from ddetr.app import compose

    model = OmegaConf.to_container(compose(["model=small"]).model, resolve=True)
    fields = {field.name for field in dataclasses.fields(DeformableDETRConfig)}
    architecture = {key: value for key, value in model.items() if key in fields}
    return DeformableDETRConfig.from_dict({**architecture, "num_classes": NUM_CLASSES, "backbone": backbone})


CHANNELS_LAST_MODES = (False, "auto", True)  # model.backbone.channels_last, NCHW first


def channels_last_ratios(names: list[str], size: int, rounds: int, repeat: int) -> None:
    """Backbone forward + backward under every ``CHANNELS_LAST_MODES``, interleaved; prints medians and
    the ratios to NCHW."""
    from ddetr.models.backbones import build_backbone

    images = torch.randn(2, 3, size, size)
    mask = torch.zeros(2, size, size, dtype=torch.bool)
    times: dict[tuple[str, bool | str], list[float]] = {}
    backbones = {}
    for name in names:
        for mode in CHANNELS_LAST_MODES:
            config = default_run_config({"name": name, "channels_last": mode})
            torch.manual_seed(0)
            backbones[name, mode] = build_backbone(config).train()
            times[name, mode] = []

    def step(backbone: torch.nn.Module) -> None:
        loss = sum(features.float().square().mean() for features, _ in backbone(images, mask))
        loss.backward()

    for backbone in backbones.values():  # warm-up
        step(backbone)
    for _ in range(rounds):
        for key, backbone in backbones.items():
            for _ in range(repeat):
                start = time.perf_counter()
                step(backbone)
                times[key].append(time.perf_counter() - start)
    print(f"backbone fwd+bwd, batch 2 x {size}x{size}, {torch.get_num_threads()} threads, median of {rounds * repeat}")
    print(f"{'backbone':<24} {'NCHW ms':>8} {'auto ms':>8} {'true ms':>8} {'auto/NCHW':>10} {'true/NCHW':>10}")
    for name in names:
        nchw, auto, last = (statistics.median(times[name, mode]) * 1e3 for mode in CHANNELS_LAST_MODES)
        print(f"{name:<24} {nchw:>8.0f} {auto:>8.0f} {last:>8.0f} {auto / nchw:>10.2f} {last / nchw:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=DEFAULT_BACKBONES)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="timed forwards per backbone and round")
    parser.add_argument(
        "--channels-last", action="store_true", help="backbone fwd+bwd, NCHW vs channels-last (auto and true)"
    )
    args = parser.parse_args(argv)
    if args.channels_last:
        channels_last_ratios(args.backbones.split(","), args.size, args.rounds, args.repeat)
        return 0
    torch.manual_seed(0)
    models = {}
    for name in args.backbones.split(","):
        models[name] = build_deformable_detr(default_run_config({"name": name})).eval()
    images = torch.randn(1, 3, args.size, args.size)
    mask = torch.zeros(1, args.size, args.size, dtype=torch.bool)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up (the attention op, allocator)
            model((images, mask))
        for _ in range(args.rounds):
            for name, model in models.items():
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    model((images, mask))
                    times[name].append(time.perf_counter() - start)
    print(f"{args.size}x{args.size}, batch 1, {torch.get_num_threads()} threads, median of {args.rounds * args.repeat}")
    print(f"{'backbone':<24} {'params (M)':>10} {'backbone (M)':>12} {'ms':>8}")
    for name, model in models.items():
        total = sum(p.numel() for p in model.parameters()) / 1e6
        backbone = sum(p.numel() for p in model.backbone.parameters()) / 1e6
        print(f"{name:<24} {total:>10.2f} {backbone:>12.2f} {statistics.median(times[name]) * 1e3:>8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
