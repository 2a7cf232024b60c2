"""Benchmarks: ``python -m ddetr.bench op`` times multi-scale deformable attention.

For every available backend (the PyTorch path and the compiled kernel of each device) it measures
forward and forward+backward at the shapes of Deformable DETR R50 (4 levels at strides 8/16/32/64,
hidden 256, 8 heads, head_dim 32, 4 points): the encoder (num_queries = num_values) and the decoder
(300 queries), for 512x512 and 800x1333 images at batch 1 and 2. It prints the best time, the
speed-up over the PyTorch path measured in the same run, achieved GFLOP/s and peak memory. Times
are the best of ``--repeat`` rounds in which the backends alternate (robust on a shared machine).

FLOPs: forward = 10 * batch_size * num_queries * num_heads * num_levels * num_points * head_dim
(per sampled point and channel: 4 bilinear multiply-adds and 1 weighted accumulation);
forward+backward is counted as 3x forward.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the call; on the CPU the
high-water mark of the resident set size (VmHWM, reset through /proc/self/clear_refs) in a fresh
subprocess per case during a second call, minus the resident size right before it (inputs are in
that baseline; glibc's mmap threshold is fixed so freed blocks leave the resident set).

Sampling locations are realistic: the pixel centre of every query (encoder) or a random reference
point (decoder) plus offsets of a few pixels, as a trained model produces.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

STRIDES = (8, 16, 32, 64)
NUM_HEADS = 8
HEAD_DIM = 32
NUM_POINTS = 4
DECODER_QUERIES = 300
IMAGE_SIZES = {"512": (512, 512), "800": (800, 1333)}


@dataclass(frozen=True)
class Case:
    """One benchmark shape."""

    image: str  # key of IMAGE_SIZES
    batch_size: int
    part: str  # "encoder" or "decoder"

    @property
    def name(self) -> str:
        height, width = IMAGE_SIZES[self.image]
        return f"{self.part} {height}x{width} b{self.batch_size}"


def level_shapes(image_height: int, image_width: int) -> list[tuple[int, int]]:
    """(height, width) of the feature maps at strides 8..64 (ResNet rounding: ceil at every stride 2)."""
    shapes = []
    height, width = image_height, image_width
    for stride in (2, 4, 8, 16, 32, 64):
        height, width = math.ceil(height / 2), math.ceil(width / 2)
        if stride in STRIDES:
            shapes.append((height, width))
    return shapes


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random value, shapes and realistic sampling locations / softmaxed attention weights for a case.

    ``dtype`` is value's; a float16/bfloat16 value comes with float32 locations and weights, as under
    autocast. The shapes stay on the CPU, as the model passes them (the CUDA op then needs no copy).
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = level_shapes(*IMAGE_SIZES[case.image])
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_values, num_levels = int(sizes.sum()), len(shapes)
    batch_size = case.batch_size
    if case.part == "encoder":
        # every position of every level is a query; reference = its pixel centre
        references = []
        for height, width in shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
            )
            references.append(torch.stack([xs, ys], -1).reshape(-1, 2))  # (H*W, 2) as (x, y)
        reference = torch.cat(references).expand(batch_size, -1, -1)  # (B, S, 2)
    else:
        reference = torch.rand(batch_size, DECODER_QUERIES, 2, generator=generator)  # (B, 300, 2)
    num_queries = reference.shape[1]
    # offsets of a few pixels of each level
    offsets = torch.randn(batch_size, num_queries, NUM_HEADS, num_levels, NUM_POINTS, 2, generator=generator) * 2
    normaliser = spatial_shapes.flip(1).to(torch.float32)  # (L, 2) as (W, H)
    sampling_locations = reference[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
    attention_weights = torch.randn(batch_size, num_queries, NUM_HEADS, num_levels * NUM_POINTS, generator=generator)
    attention_weights = attention_weights.softmax(-1).view(batch_size, num_queries, NUM_HEADS, num_levels, NUM_POINTS)
    value = torch.randn(batch_size, num_values, NUM_HEADS, HEAD_DIM, generator=generator)
    location_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    value = value.to(device=device, dtype=dtype)
    sampling_locations, attention_weights = (
        t.to(device=device, dtype=location_dtype) for t in (sampling_locations, attention_weights)
    )
    return value, spatial_shapes, level_start_index, sampling_locations, attention_weights


def forward_flops(case: Case) -> float:
    """FLOPs of one forward (see the module docstring)."""
    num_values = sum(h * w for h, w in level_shapes(*IMAGE_SIZES[case.image]))
    num_queries = num_values if case.part == "encoder" else DECODER_QUERIES
    return 10.0 * case.batch_size * num_queries * NUM_HEADS * len(STRIDES) * NUM_POINTS * HEAD_DIM


def run_once(inputs, backend: str, mode: str) -> None:
    """One forward (mode "fwd", no autograd) or forward+backward (mode "fwd+bwd")."""
    from ddetr.ops import ms_deform_attn

    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    if mode == "fwd":
        with torch.no_grad():
            ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend)
        return
    leaves = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_weights)]
    output = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], backend)
    output.backward(torch.ones_like(output))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backends(
    inputs, backends: list[str], mode: str, device: torch.device, repeat: int, budget_s: float
) -> dict[str, float]:
    """Seconds per backend over ``repeat`` rounds after one warm-up: the best on the CPU, the median
    of CUDA-event times on a GPU.

    Backends alternate within every round, so a busy machine slows them alike and the ratios stay
    meaningful; rounds stop early once ``budget_s`` is spent.
    """
    for backend in backends:
        run_once(inputs, backend, mode)  # warm-up (and build/load)
    _synchronize(device)
    times: dict[str, list[float]] = {backend: [] for backend in backends}
    started = time.perf_counter()
    for _ in range(repeat):
        for backend in backends:
            if device.type == "cuda":
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
                run_once(inputs, backend, mode)
                end_event.record()
                end_event.synchronize()
                times[backend].append(start_event.elapsed_time(end_event) / 1e3)
            else:
                start = time.perf_counter()
                run_once(inputs, backend, mode)
                times[backend].append(time.perf_counter() - start)
        if time.perf_counter() - started > budget_s:
            break
    if device.type == "cuda":
        return {backend: sorted(values)[len(values) // 2] for backend, values in times.items()}
    return {backend: min(values) for backend, values in times.items()}


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def _reset_peak_resident() -> bool:
    """Resets the resident high-water mark (VmHWM) of this process (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_memory_child(case: Case, backend: str, mode: str, dtype: torch.dtype = torch.float32) -> int:
    """Runs in a fresh process: extra resident memory (bytes) at the peak of one call."""
    inputs = make_inputs(case, torch.device("cpu"), dtype)
    if backend != "pytorch":
        from ddetr.ops import compiled_op_available

        compiled_op_available("cpu")  # load the library before the baseline
    run_once(inputs, backend, mode)  # warm-up: allocator pools, thread pool, lazy initialisation
    if not _reset_peak_resident():
        raise RuntimeError("cannot reset the peak resident size (/proc/self/clear_refs)")
    before = _status_bytes("VmRSS")
    run_once(inputs, backend, mode)
    return max(0, _status_bytes("VmHWM") - before)


def peak_memory(
    case: Case, backend: str, mode: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> float | None:
    """Peak extra memory of one call in bytes (None when it cannot be measured)."""
    if device.type == "cuda":
        inputs = make_inputs(case, device, dtype)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run_once(inputs, backend, mode)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    if not sys.platform.startswith("linux"):
        return None
    spec = json.dumps(
        {
            "image": case.image,
            "batch_size": case.batch_size,
            "part": case.part,
            "backend": backend,
            "mode": mode,
            "dtype": str(dtype).removeprefix("torch."),
        }
    )
    # a fixed mmap threshold makes glibc return every large block to the OS when it is freed, so
    # the resident size follows the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run(
        [sys.executable, "-m", "ddetr.bench", "_memory", spec], capture_output=True, text=True, check=False, env=env
    )
    if result.returncode != 0:
        return None
    return float(result.stdout.strip().splitlines()[-1])


def available_backends(device: torch.device) -> list[str]:
    """The PyTorch path plus the compiled kernel of ``device`` when it builds."""
    from ddetr.ops import compiled_op_available

    backends = ["pytorch"]
    if compiled_op_available(device.type):
        backends.append(device.type)
    return backends


def bench_op(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory subprocesses
    images = args.images.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    parts = args.parts.split(",")
    modes = ["fwd", "fwd+bwd"]
    cases = [Case(image, batch, part) for part in parts for image in images for batch in batches]
    backends = [b for b in available_backends(device) if args.backends is None or b in args.backends.split(",")]
    threads = torch.get_num_threads() if device.type == "cpu" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    dtypes = [getattr(torch, name) for name in (args.dtypes or "float32").split(",")]
    statistic = f"median of {args.repeat} CUDA-event timings" if device.type == "cuda" else f"best of {args.repeat}"
    print(
        f"# ms_deform_attn on {name}, torch {torch.__version__}, {statistic}; a float16/bfloat16 value comes "
        "with float32 locations and weights (autocast); speed-up: against the PyTorch path on float32 inputs"
    )
    print(
        "| case | backend | dtype | fwd ms | fwd speed-up | fwd GFLOP/s | fwd+bwd ms | fwd+bwd speed-up "
        "| fwd+bwd GFLOP/s | peak MiB fwd+bwd |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    digits = 3 if device.type == "cuda" else 1
    for case in cases:
        flops = forward_flops(case)
        reference = None
        for dtype in dtypes:
            inputs = make_inputs(case, device, dtype)
            dtype_backends = backends if dtype == torch.float32 or device.type == "cpu" else backends[-1:]
            timings = {
                mode: time_backends(inputs, dtype_backends, mode, device, args.repeat, args.budget) for mode in modes
            }
            results = {backend: {mode: timings[mode][backend] for mode in modes} for backend in dtype_backends}
            if reference is None:
                reference = results.get("pytorch", results[dtype_backends[0]])
            for backend in dtype_backends:
                memory = None if args.no_memory else peak_memory(case, backend, "fwd+bwd", device, dtype)
                row = [case.name, backend, str(dtype).removeprefix("torch.")]
                for mode, multiplier in (("fwd", 1), ("fwd+bwd", 3)):
                    seconds = results[backend][mode]
                    row += [
                        f"{seconds * 1e3:.{digits}f}",
                        f"{reference[mode] / seconds:.1f}x",
                        f"{multiplier * flops / seconds / 1e9:.1f}",
                    ]
                row.append("n/a" if memory is None else f"{memory / 2**20:.0f}")
                print("| " + " | ".join(row) + " |", flush=True)
            del inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddetr.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    op = commands.add_parser("op", help="multi-scale deformable attention kernels vs the PyTorch path")
    op.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    op.add_argument("--images", default="512,800", help="comma list of: 512 (512x512), 800 (800x1333)")
    op.add_argument("--batch", default="1,2", help="comma list of batch sizes")
    op.add_argument("--parts", default="encoder,decoder", help="comma list of: encoder, decoder")
    op.add_argument("--backends", default=None, help="comma list (default: all available)")
    op.add_argument("--repeat", type=int, default=5, help="timed rounds per case (best is reported)")
    op.add_argument("--budget", type=float, default=5.0, help="stop repeating a case after this many seconds")
    op.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    op.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    op.add_argument(
        "--dtypes",
        default=None,
        help="comma list of value dtypes: float32, bfloat16, float16, float64 (default: float32)",
    )
    op.add_argument("--quick", action="store_true", help="512x512, batch 1, 3 repeats")
    memory = commands.add_parser("_memory", help=argparse.SUPPRESS)
    memory.add_argument("spec")
    args = parser.parse_args(argv)
    if args.command == "_memory":
        spec = json.loads(args.spec)
        case = Case(spec["image"], spec["batch_size"], spec["part"])
        print(peak_memory_child(case, spec["backend"], spec["mode"], getattr(torch, spec.get("dtype", "float32"))))
        return 0
    if args.quick:
        args.images, args.batch, args.repeat = "512", "1", 3
    bench_op(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
