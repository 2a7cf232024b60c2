"""Command line of the op: ``python -m ddetr.ops build [--verbose] [--cpu-only]``.

Compiles the multi-scale deformable attention library ahead of time (otherwise it is built on
first use) and prints where it is.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr.ops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="compile the C++/CUDA kernels into the cache")
    build_parser.add_argument("--verbose", action="store_true", help="show compiler commands and output")
    build_parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA kernels")
    args = parser.parse_args(argv)

    from ddetr.ops import _build

    with_cuda = torch.cuda.is_available() and not args.cpu_only
    library = _build.build(with_cuda=with_cuda, verbose=args.verbose)
    kernels = "CPU + CUDA" if with_cuda else "CPU"
    print(f"built {library} ({kernels} kernels, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
