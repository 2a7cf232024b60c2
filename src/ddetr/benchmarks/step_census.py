"""Benchmarks: ``python -m ddetr.bench step`` counts what one training step asks of the device.

For ddetr and transformers' ``DeformableDetrForObjectDetection`` of the same configuration on the
same inputs (the setup of ``python -m ddetr.bench model``), one train step (forward, loss, backward,
AdamW) after a warm-up step is run under a dispatch-level recorder that counts

- **operators**: every ATen operator that reaches a kernel, split into forward + loss, backward and
  optimizer; view operators (``view``, ``transpose``, ``select``, ``expand``, ...) are left out, as
  they launch nothing. On a GPU, where an eager step is bound by its launches, this is about the
  number of kernels launched (a few operators launch more than one, factory operators none);
- **host reads**: operators in forward, loss and backward that bring a value from the device to
  Python (``.item()``, ``bool()``) or copy a tensor from the GPU to the CPU (on the CPU only the
  former are visible);
- **saved for backward**: the bytes of the distinct tensor storages that autograd keeps between
  forward and backward (activations; the parameters themselves are left out), which set the peak
  memory of training next to the weights and optimizer state;
- on a GPU (``--device cuda``) also the **CUDA kernels** of the step (with copies and fills), as
  ``torch.profiler`` records them.

The counts do not depend on timing, so they are comparable between runs and machines (on the
CPU they measure the eager program a GPU would run, up to the device-specific kernels).
``--precision bf16`` runs the step under bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import sys
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddetr.benchmarks.model import QUICK, VARIANTS, Setup, ddetr_steps, make_inputs, transformers_steps, with_images
from ddetr.benchmarks.table import text_table

# operators that only make a new view of existing memory (or compute dtypes): no kernel
VIEW_OPERATORS = frozenset(
    "alias as_strided chunk detach expand flatten lift_fresh narrow permute promote_types result_type "
    "select slice split split_with_sizes squeeze t transpose unbind unflatten unfold unsqueeze view "
    "_reshape_alias _unsafe_view reshape".split()
) | {"_record_function_enter", "_record_function_enter_new", "_record_function_exit"}  # profiler marks
PHASES = ("forward", "backward", "optimizer")


@dataclasses.dataclass
class Census:
    """What one train step dispatched: operators per phase, host reads, bytes saved for backward."""

    operators: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    host_reads: int = 0
    saved_bytes: int = 0
    cuda_kernels: int | None = None  # GPU activities (kernels, copies, fills) seen by torch.profiler; CUDA only
    by_name: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self.operators.values())


def _is_host_read(name: str, args: tuple, kwargs: dict) -> bool:
    """``.item()``-like reads, and copies from a non-CPU device to the CPU."""
    if name == "_local_scalar_dense":
        return True
    if name == "_to_copy" and isinstance(args[0], torch.Tensor):
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    if name == "copy_" and all(isinstance(a, torch.Tensor) for a in args[:2]):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class _Recorder(TorchDispatchMode):
    def __init__(self, census: Census) -> None:
        super().__init__()
        self.census = census
        self.in_optimizer = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name not in VIEW_OPERATORS:
            if self.in_optimizer:
                phase = "optimizer"
            elif torch._C._current_autograd_node() is not None:
                phase = "backward"
            else:
                phase = "forward"
            self.census.operators[phase] += 1
            self.census.by_name[(phase, name)] += 1
            # the optimizer reads its step counters, CPU tensors on every device
            self.census.host_reads += phase != "optimizer" and _is_host_read(name, args, kwargs)
        return func(*args, **kwargs)


def count_step(step: Callable[[], None], cuda: bool = False) -> Census:
    """Runs ``step`` once under the recorder and returns its census; with ``cuda`` also counts the GPU
    activities of the step with ``torch.profiler``."""
    census = Census()
    recorder = _Recorder(census)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.is_leaf and tensor.requires_grad):  # parameters are kept anyway: not activations
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def enter(*_):
        recorder.in_optimizer = True

    def leave(*_):
        recorder.in_optimizer = False

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    handles = [register_optimizer_step_pre_hook(enter), register_optimizer_step_post_hook(leave)]
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if cuda else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), recorder:
            with profiler if profiler is not None else contextlib.nullcontext():
                step()
                if cuda:
                    torch.cuda.synchronize()
    finally:
        for handle in handles:
            handle.remove()
    census.saved_bytes = sum(storages.values())
    if profiler is not None:
        census.cuda_kernels = sum(event.device_type == torch.autograd.DeviceType.CUDA for event in profiler.events())
    return census


def census_of(name: str, setup: Setup, variant: str, precision: str, device: torch.device, inputs) -> Census:
    """The census of ``name`` ("ddetr" or "transformers") after one warm-up step."""
    build = {"ddetr": ddetr_steps, "transformers": transformers_steps}[name]
    torch.manual_seed(0)
    train, _ = build(setup, variant, precision, device, inputs)
    train()  # warm-up: lazy initialisation, optimizer state, the op's first load
    return count_step(train, cuda=device.type == "cuda")


def format_census(rows: list[tuple[str, Census]]) -> str:
    header = ("model", "forward+loss", "backward", "optimizer", "total", "host reads", "saved MiB", "CUDA kernels")
    lines = [
        (
            name,
            *(str(c.operators[p]) for p in PHASES),
            str(c.total),
            str(c.host_reads),
            f"{c.saved_bytes / 2**20:.1f}",
            "-" if c.cuda_kernels is None else str(c.cuda_kernels),
        )
        for name, c in rows
    ]
    return text_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddetr.bench step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="multi_scale")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--quick", action="store_true", help="the tiny setup of bench model --quick")
    parser.add_argument("--images", default="128x160,128x192", help="comma list of HxW")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--top", type=int, default=0, help="also list ddetr's N most frequent operators")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else Setup()
    if args.images and not args.quick:
        setup = with_images(setup, args.images)
    device = torch.device(args.device)
    inputs = make_inputs(setup, device)
    names = ["ddetr"] + ([] if args.no_transformers else ["transformers"])
    print(
        f"ddetr bench step: {args.variant}, {setup.backbone}, {setup.enc_layers}+{setup.dec_layers} layers, "
        f"{setup.num_queries} queries, images {', '.join(f'{h}x{w}' for h, w in setup.images)}, {args.precision}, "
        f"device {device}, torch {torch.__version__}"
    )
    rows = []
    for name in names:
        try:
            rows.append(
                (f"{name} {args.precision}", census_of(name, setup, args.variant, args.precision, device, inputs))
            )
        except ImportError as error:
            print(f"[{name}] skipped: {error}", file=sys.stderr)
    print(format_census(rows))
    if args.top and rows:
        for (phase, name), count in rows[0][1].by_name.most_common(args.top):
            print(f"{count:6d}  {phase:9s} {name}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
