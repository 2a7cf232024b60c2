"""Exceptions raised by the data pipeline."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset cannot be used as given: the message names the file and the offending ids."""


class ImageLoadError(OSError):
    """One image file cannot be decoded into a usable RGB array; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
