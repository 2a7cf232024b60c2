"""Benchmarks: ``python -m ddetr.bench op [--device cpu|cuda] [--quick] ...`` (see ``ddetr.benchmarks.op``)."""

import sys

from ddetr.benchmarks.op import main

if __name__ == "__main__":
    sys.exit(main())
