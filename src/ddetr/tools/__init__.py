"""Maintenance tools of the repository (``python -m ddetr.tools.<name>``), not needed to train or predict."""
