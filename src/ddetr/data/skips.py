"""Counting images skipped while loading, across DataLoader worker processes.

Workers have their own memory, so a skip cannot be counted in a shared object. Instead a dataset
that replaces a bad sample attaches the skips to the replacement's target under the key
`"skipped"` (a list of `SkipRecord`). The records travel with the batch to the main process,
where `pop_batch_skips(batch)` removes the key (so the model sees the plain target contract) and
returns them; `SkipReport` accumulates them and `summary()` makes the end-of-epoch log line.
`DetectionDataModule.on_before_batch_transfer` does this for every batch automatically.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

SKIPPED_KEY = "skipped"


class SkipRecord(NamedTuple):
    """One image that could not be used: its id, file and why."""

    image_id: int
    file: str
    reason: str


class SkipReport:
    """Accumulates `SkipRecord`s (one per skip event; an image skipped every epoch counts each time)."""

    def __init__(self, records: Iterable[SkipRecord] = ()):
        self.records: list[SkipRecord] = list(records)

    def add(self, records: Iterable[SkipRecord]) -> None:
        self.records.extend(SkipRecord(*r) for r in records)

    def __len__(self) -> int:
        return len(self.records)

    def counts_by_reason(self) -> dict[str, int]:
        """Number of skips per reason kind (the text before the first ':')."""
        return dict(Counter(r.reason.split(":")[0] for r in self.records))

    def summary(self, max_files: int = 5) -> str:
        """One line: total, per reason, and the first few files."""
        if not self.records:
            return "no images skipped"
        reasons = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts_by_reason().items()))
        unique = list(dict.fromkeys((r.file, r.image_id) for r in self.records))
        files = ", ".join(f"{f} (id {i})" for f, i in unique[:max_files])
        more = f" and {len(unique) - max_files} more" if len(unique) > max_files else ""
        return f"skipped {len(self.records)} images ({reasons}): {files}{more}"


def pop_batch_skips(batch) -> list[SkipRecord]:
    """Remove and return the skip records carried by a collated batch `(images, mask, targets)`."""
    targets = batch[-1]
    records: list[SkipRecord] = []
    for target in targets:
        records.extend(SkipRecord(*r) for r in target.pop(SKIPPED_KEY, ()))
    return records
