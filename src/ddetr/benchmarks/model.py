"""Benchmarks: ``python -m ddetr.bench model`` times the whole detector against transformers.

For ddetr in several modes and for transformers' ``DeformableDetrForObjectDetection`` built from the
same configuration (R50, multi-scale or two-stage with box refinement, 300 queries, 6 + 6 layers,
91 classes, random initialisation, nothing downloaded), on the same inputs, it measures

- the train step: forward, loss, backward and an AdamW step (each model with its own loss);
- inference: the forward pass in eval mode under ``torch.inference_mode``;
- peak memory of each (CUDA only: ``torch.cuda.max_memory_allocated``);

and prints one table with the speed-up over transformers in the same precision.

Modes (``--modes``, comma list): ``fp32`` (``set_float32_matmul_precision("highest")``, no TF32),
``tf32`` (``"high"``), ``bf16`` (``"high"`` + autocast bfloat16, as ``trainer.precision=bf16-mixed``),
``compiled`` (``"high"`` + ``torch.compile(dynamic=True)`` of the detector, as ``model.compile=true``),
``compiled-bf16`` (both), ``reduce-overhead`` (``"high"`` + the detector and the losses after the
matching through ``torch.compile(mode="reduce-overhead")``, CUDA graphs, as
``model.compile=reduce-overhead``) and ``reduce-overhead-bf16``. transformers runs in fp32, tf32 and bf16 alongside (``--no-transformers`` to skip it); a
compiled ddetr mode is compared with transformers in the same precision without compilation.

Every mode is guarded: one that fails prints its error and the others still run. ``--budget``
bounds the whole run (not counting a first build of the attention op): a mode that would start
after the budget is skipped and listed; a compiled mode starts only with 90 s of it left; a mode
running past ``--mode-timeout`` is stopped and reported as failed. Each row is also printed as soon
as its mode ends.

Inputs: on CUDA a batch of two images, 800x1066 and 800x1333 (padded to 800x1333 with a mask), with
8 random targets each; times are the median of ``--repeat`` steps measured with CUDA events after
``--warmup`` steps. ``--quick`` shrinks everything for CI (ResNet-18, 2 + 2 layers, 50 queries,
hidden 128, 64x80 and 64x96 images, 1 warm-up and 2 timed steps).

This module imports neither Hydra nor pycocotools: it runs where only torch, lightning, scipy and
transformers are installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext

import torch

from ddetr.benchmarks.table import text_table
from ddetr.matmul_precision import set_matmul_precision
from ddetr.models.backbones.resnet import BOTTLENECK_RESNETS, RESNET_DEPTHS
from ddetr.models.build import build_criterion, build_deformable_detr
from ddetr.models.config import BackboneConfig, DeformableDETRConfig
from ddetr.training.compilation import REDUCE_OVERHEAD, compile_step, mark_step_begin

MODES = ("fp32", "tf32", "bf16", "compiled", "compiled-bf16", "reduce-overhead", "reduce-overhead-bf16")
# the model.compile setting of each compiled mode's prefix; the rest of the name is the precision
COMPILE_PREFIXES = {"compiled": True, "reduce-overhead": REDUCE_OVERHEAD}
DEFAULT_MODES = ("fp32", "tf32", "bf16", "compiled-bf16")
VARIANTS = {"multi_scale": {}, "two_stage": {"with_box_refine": True, "two_stage": True}}
NUM_CLASSES = 91
NUM_TARGETS = 8
COMPILE_RESERVE_S = 90.0  # seconds of the budget a compiled mode needs left to start (compilation)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What is benchmarked: the architecture (the official defaults unless given) and the input images
    (height, width)."""

    backbone: str = BackboneConfig.name
    hidden_dim: int = DeformableDETRConfig.hidden_dim
    nheads: int = DeformableDETRConfig.nheads
    enc_layers: int = DeformableDETRConfig.enc_layers
    dec_layers: int = DeformableDETRConfig.dec_layers
    dim_feedforward: int = DeformableDETRConfig.dim_feedforward
    num_queries: int = DeformableDETRConfig.num_queries
    images: tuple[tuple[int, int], ...] = ((800, 1066), (800, 1333))


QUICK = Setup("resnet18", 128, 8, 2, 2, 256, 50, ((64, 80), (64, 96)))


@dataclasses.dataclass
class Result:
    """One row of the table; times in ms, memory in MiB; ``error`` set when the mode failed."""

    name: str
    precision: str
    train_ms: float | None = None
    infer_ms: float | None = None
    train_mib: float | None = None
    infer_mib: float | None = None
    error: str | None = None


def with_images(setup: Setup, images: str) -> Setup:
    """``setup`` with the images of a comma list of HxW, e.g. ``"800x1066,800x1333"``."""
    sizes = tuple(tuple(int(v) for v in size.split("x")) for size in images.split(","))
    return dataclasses.replace(setup, images=sizes)


def ddetr_config(setup: Setup, variant: str) -> DeformableDETRConfig:
    """ddetr's config of ``setup`` (its architecture fields share ddetr's names) and ``variant``."""
    sizes = {field.name: getattr(setup, field.name) for field in dataclasses.fields(setup)}
    del sizes["backbone"], sizes["images"]
    return DeformableDETRConfig(
        num_classes=NUM_CLASSES, backbone=BackboneConfig(name=setup.backbone), **sizes, **VARIANTS[variant]
    )


def transformers_model(setup: Setup, variant: str) -> torch.nn.Module:
    """transformers' detector of the same configuration, with its own (non-timm) ResNet, offline."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    bottleneck = setup.backbone in BOTTLENECK_RESNETS
    backbone = ResNetConfig(
        depths=list(RESNET_DEPTHS[setup.backbone]),
        hidden_sizes=[256, 512, 1024, 2048] if bottleneck else [64, 128, 256, 512],
        layer_type="bottleneck" if bottleneck else "basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    options = VARIANTS[variant]
    fields = dict(
        backbone_config=backbone,
        d_model=setup.hidden_dim,
        encoder_layers=setup.enc_layers,
        decoder_layers=setup.dec_layers,
        encoder_attention_heads=setup.nheads,
        decoder_attention_heads=setup.nheads,
        encoder_ffn_dim=setup.dim_feedforward,
        decoder_ffn_dim=setup.dim_feedforward,
        num_queries=setup.num_queries,
        two_stage_num_proposals=setup.num_queries,
        with_box_refine=options.get("with_box_refine", False),
        two_stage=options.get("two_stage", False),
        auxiliary_loss=True,
        num_labels=NUM_CLASSES,
    )
    try:  # transformers versions that still know timm backbones take these flags
        config = DeformableDetrConfig(**fields, use_timm_backbone=False, use_pretrained_backbone=False)
    except (TypeError, ValueError):
        config = DeformableDetrConfig(**fields)
    return DeformableDetrForObjectDetection(config)


def make_inputs(setup: Setup, device: torch.device, seed: int = 0):
    """A padded batch (images (B, 3, H, W), mask (B, H, W) True on padding) and random targets."""
    generator = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in setup.images)
    width = max(w for _, w in setup.images)
    images = torch.zeros(len(setup.images), 3, height, width)
    mask = torch.ones(len(setup.images), height, width, dtype=torch.bool)
    for index, (h, w) in enumerate(setup.images):
        images[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        mask[index, :h, :w] = False
    targets = []
    for _ in setup.images:
        centres = torch.rand(NUM_TARGETS, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(NUM_TARGETS, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, NUM_CLASSES, (NUM_TARGETS,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centres, sizes], 1).to(device)})
    return images.to(device), mask.to(device), targets


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> tuple[float, float | None]:
    """Median milliseconds of ``step`` after ``warmup`` calls, and peak MiB allocated (CUDA only)."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def split_mode(mode: str) -> tuple[bool | str, str]:
    """(``model.compile`` setting, precision) of a mode: ``"reduce-overhead-bf16"`` -> (``"reduce-overhead"``,
    ``"bf16"``); a compiled mode without a precision runs in tf32."""
    for prefix, setting in COMPILE_PREFIXES.items():
        if mode.startswith(prefix):
            return setting, mode.removeprefix(prefix).removeprefix("-") or "tf32"
    return False, mode


def set_precision(mode: str) -> None:
    set_matmul_precision("highest" if mode == "fp32" else "high")


def _autocast(mode: str, device: torch.device):
    if mode.endswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _step_closures(
    model: torch.nn.Module,
    loss: Callable[[], torch.Tensor],
    predict: Callable[[], object],
    mode: str,
    device: torch.device,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(train step, inference step) closures: ``loss()`` and ``predict()`` run ``model`` on the inputs; the
    train step adds backward and an AdamW step, both run under ``mode``'s autocast."""
    # foreach: the multi-tensor implementation, the default on GPUs, also on the CPU
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4, foreach=True)

    def train() -> None:
        model.train()
        with _autocast(mode, device):
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), _autocast(mode, device):
            predict()

    return train, infer


def ddetr_steps(setup: Setup, variant: str, mode: str, device: torch.device, inputs):
    """(train step, inference step) closures of ddetr in ``mode``."""
    config = ddetr_config(setup, variant)
    model = build_deformable_detr(config).to(device)
    criterion = build_criterion(config)
    setting = split_mode(mode)[0]
    detector = compile_step(model, criterion, setting) or model  # DeformableDETRModule's code path
    images, mask, targets = inputs

    def loss() -> torch.Tensor:
        mark_step_begin(setting)
        return criterion.weighted_total(criterion(detector((images, mask)), targets))

    def predict() -> object:
        mark_step_begin(setting)
        return detector((images, mask))

    return _step_closures(model, loss, predict, mode, device)


def transformers_steps(setup: Setup, variant: str, mode: str, device: torch.device, inputs):
    """(train step, inference step) closures of transformers' detector in ``mode``."""
    model = transformers_model(setup, variant).to(device)
    images, mask, targets = inputs
    pixel_mask = (~mask).long()  # transformers: 1 on pixels, 0 on padding
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    return _step_closures(
        model,
        lambda: model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss,
        lambda: model(pixel_values=images, pixel_mask=pixel_mask),
        mode,
        device,
    )


class ModeTimeout(Exception):
    """A mode ran past ``--mode-timeout``."""


def _alarm(seconds: float) -> None:
    """Raise ``ModeTimeout`` in the main thread after ``seconds`` (0 cancels; Unix main thread only)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        return
    if seconds > 0:

        def expire(signum, frame):
            raise ModeTimeout(f"ran past --mode-timeout={seconds:.0f} s")

        signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    else:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_mode(name: str, build, setup, variant, mode, device, inputs, warmup, repeat, timeout=0.0) -> Result:
    precision = split_mode(mode)[1]
    result = Result(name, precision)
    try:
        _alarm(timeout)
        set_precision(precision)
        train, infer = build(setup, variant, mode, device, inputs)
        result.train_ms, result.train_mib = measure(train, device, warmup, repeat)
        result.infer_ms, result.infer_mib = measure(infer, device, warmup, repeat)
    except Exception as error:  # one failing mode must not stop the others
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        print(f"[{name}] failed: {result.error}", file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
    finally:
        _alarm(0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: list[Result]) -> str:
    """The results with the speed-up over transformers in the same precision (x > 1: ddetr faster)."""
    reference = {r.precision: r for r in results if r.name.startswith("transformers") and r.error is None}
    header = ("model", "train ms", "infer ms", "train MiB", "infer MiB", "train x HF", "infer x HF")
    rows = []
    for r in results:
        base = reference.get(r.precision)
        ratios = ["-", "-"]
        if base is not None and r.error is None and not r.name.startswith("transformers"):
            ratios = [_fmt(base.train_ms / r.train_ms, 2), _fmt(base.infer_ms / r.infer_ms, 2)]
        if r.error is not None:
            rows.append((r.name, "failed", r.error[:60], "", "", "", ""))
        else:
            rows.append(
                (r.name, _fmt(r.train_ms), _fmt(r.infer_ms), _fmt(r.train_mib, 0), _fmt(r.infer_mib, 0), *ratios)
            )
    return text_table(header, rows)


def plan(modes: list[str], with_transformers: bool) -> list[tuple[str, str]]:
    """(model, mode) in run order: each transformers precision right after the first ddetr mode of it."""
    order, seen = [], set()
    for mode in modes:
        order.append(("ddetr", mode))
        setting, precision = split_mode(mode)
        if with_transformers and precision not in seen and not setting:
            order.append(("transformers", mode))
            seen.add(precision)
    return order


def bench_model(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device)
    setup = QUICK if args.quick else Setup()
    if args.images:
        setup = with_images(setup, args.images)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {MODES}")
    from ddetr.ops import compiled_op_available

    began = time.perf_counter()
    op = "compiled kernel" if compiled_op_available(device.type) else "PyTorch fallback (grid_sample)"
    ready = time.perf_counter() - began  # a first build of the op is not part of the budget
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    print(
        f"ddetr bench model: {args.variant}, {setup.backbone}, {setup.enc_layers}+{setup.dec_layers} layers, "
        f"{setup.num_queries} queries, images {', '.join(f'{h}x{w}' for h, w in setup.images)}; "
        f"device {gpu}; torch {torch.__version__}; transformers {hf_version}; attention op: {op} "
        f"(ready in {ready:.0f} s); median of {args.repeat} after {args.warmup} warm-up"
    )
    began = time.perf_counter()
    inputs = make_inputs(setup, device)
    results, skipped = [], []
    builders = {"ddetr": ddetr_steps, "transformers": transformers_steps}
    for model_name, mode in plan(modes, not args.no_transformers and hf_version != "not installed"):
        name = f"{model_name} {mode}"
        # a compiled mode spends its first steps compiling: start it only with time for that left
        reserve = COMPILE_RESERVE_S if split_mode(mode)[0] and not args.quick else 0.0
        if time.perf_counter() - began > args.budget - reserve:
            skipped.append(name)
            continue
        print(f"... {name}", file=sys.stderr, flush=True)
        result = run_mode(
            name,
            builders[model_name],
            setup,
            args.variant,
            mode,
            device,
            inputs,
            args.warmup,
            args.repeat,
            args.mode_timeout,
        )
        results.append(result)
        status = result.error or (
            f"train {_fmt(result.train_ms)} ms, infer {_fmt(result.infer_ms)} ms, peak {_fmt(result.train_mib, 0)} MiB"
        )
        print(f"[{time.perf_counter() - began:4.0f} s] {name}: {status}", flush=True)
    set_matmul_precision("highest")
    print(format_table(results))
    if skipped:
        print(f"skipped (budget of {args.budget:.0f} s spent): {', '.join(skipped)}")
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.json:
        with open(args.json, "w") as file:
            json.dump([dataclasses.asdict(r) for r in results], file, indent=2)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="multi_scale")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--no-transformers", action="store_true", help="time ddetr only")
    parser.add_argument("--quick", action="store_true", help="tiny model and images, 1 + 2 steps (CI)")
    parser.add_argument("--images", default=None, help="comma list of HxW, e.g. 800x1066,800x1333")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per measurement (default 3; quick 1)")
    parser.add_argument("--repeat", type=int, default=None, help="timed steps per measurement (default 8; quick 2)")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds; later modes are skipped")
    parser.add_argument("--mode-timeout", type=float, default=240.0, help="seconds per mode (0: none)")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddetr.bench model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeat is None:
        args.repeat = 2 if args.quick else 8
    results = bench_model(args)
    return 0 if any(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
