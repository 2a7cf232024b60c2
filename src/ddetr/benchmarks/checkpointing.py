"""Peak memory of one training step with and without activation checkpointing.

``python -m ddetr.benchmarks.checkpointing [--size 512] [--batch 2] [--device cpu|cuda]`` runs one
forward + backward of the official multi-scale R-50 model (6+6 layers, 300 queries, random weights)
for each ``model.checkpointing`` mode, each in a fresh process, and prints the peak memory:
on the CPU the process's peak resident set (``ru_maxrss``, with glibc returning every tensor's memory
on free) minus its size before the step, on a GPU
``torch.cuda.max_memory_allocated`` minus the memory held before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

MODES = ("none", "encoder", "all")


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(mode: str, size: int, batch: int, device: str, attn_backend: str = "auto") -> dict[str, float]:
    """Peak memory (MiB) and time (s) of one training step in this process."""
    from ddetr.models import build_deformable_detr
    from ddetr.models.build import build_criterion

    torch.manual_seed(0)
    model = build_deformable_detr(91, checkpointing=mode, attn_backend=attn_backend).to(device).train()
    criterion = build_criterion(91)
    images = [torch.randn(3, size, size, device=device) for _ in range(batch)]
    targets = [
        {
            "labels": torch.tensor([1, 5], device=device),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]], device=device),
        }
        for _ in range(batch)
    ]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _current_rss_bytes()
    start = time.perf_counter()
    criterion.weighted_total(criterion(model(images), targets)).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"mode": mode, "peak_mib": peak / 2**20, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn-backend", default="auto", help="auto | pytorch | cpu | cuda")
    parser.add_argument("--mode", choices=MODES, help="measure one mode in this process (used internally)")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.mode, args.size, args.batch, args.device, args.attn_backend)))
        return 0
    rows = []
    for mode in MODES:  # a fresh process each: the peak resident set only grows
        command = [
            sys.executable,
            "-m",
            "ddetr.benchmarks.checkpointing",
            "--mode",
            mode,
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--device",
            args.device,
            "--attn-backend",
            args.attn_backend,
        ]
        # glibc: every block over 64 KiB is its own mapping, returned on free, so the peak resident set
        # follows the live tensors instead of what the allocator keeps cached
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    base = rows[0]["peak_mib"]
    print(
        f"official multi-scale R-50, batch {args.batch} at {args.size}x{args.size}, {args.device}, "
        f"attention {args.attn_backend}, one training step"
    )
    print("| model.checkpointing | peak MiB | saving | step s |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['peak_mib']:.0f} | {1 - row['peak_mib'] / base:.0%} | {row['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
