"""Benchmarks of the project's parts (``python -m ddetr.bench``)."""
