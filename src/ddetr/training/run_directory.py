"""Which directory a run writes into, where that takes more than a fresh name (``ddetr.app.run_dir`` decides):

- ``ckpt_path=auto``: the newest unfinished run of the same task, experiment and overrides (``ckpt_path`` aside)
  under the runs folder, to resume in its own directory (``find_unfinished_run``); a run is unfinished while its
  ``metrics.json`` has no ``stopped`` entry (written when a fit ends; a preempted, killed or crashed run has none)
  and resumable when it has a checkpoint (``resumable_checkpoint``);
- torchrun: one name that every rank derives alike before the process group exists (``torchrun_run_name``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import yaml

CHECKPOINTS = ("preempted.ckpt", "last.ckpt")  # under <run>/checkpoints: what a run resumes from
METRICS_FILE = "metrics.json"  # train.yaml's metrics_file
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"  # what Hydra writes into every run directory
IGNORED_OVERRIDES = ("ckpt_path",)  # overrides that do not make another run


def resumable_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest of ``checkpoints/preempted.ckpt`` and ``checkpoints/last.ckpt`` in ``run_dir``, or None."""
    found = [path for path in (Path(run_dir) / "checkpoints" / name for name in CHECKPOINTS) if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether the run's ``metrics.json`` has a ``stopped`` entry (why its fit ended); an unreadable file counts
    as unfinished, like a missing one."""
    try:
        metrics = json.loads((Path(run_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and metrics.get("stopped") is not None


def run_settings(overrides: Sequence[str]) -> list[str]:
    """The command-line overrides that make a run what it is: ``ckpt_path=...`` left out, sorted."""
    return sorted(str(o) for o in overrides if str(o).split("=", 1)[0].lstrip("+~") not in IGNORED_OVERRIDES)


def _saved_overrides(run_dir: Path) -> list[str] | None:
    try:
        overrides = yaml.safe_load((run_dir / OVERRIDES_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return overrides if isinstance(overrides, list) else None


def find_unfinished_run(parent: str | os.PathLike, overrides: Sequence[str]) -> Path | None:
    """The directory under ``parent`` of the newest (by its newest checkpoint) unfinished run with a checkpoint
    whose overrides are ``overrides`` (``run_settings``: ``ckpt_path`` aside, in any order); None when there is
    none."""
    parent, wanted = Path(parent), run_settings(overrides)
    if not parent.is_dir():
        return None
    candidates = []
    for run_dir in parent.iterdir():
        saved = _saved_overrides(run_dir) if run_dir.is_dir() else None
        if saved is None or run_settings(saved) != wanted or is_finished(run_dir):
            continue
        checkpoint = resumable_checkpoint(run_dir)
        if checkpoint is not None:
            candidates.append((checkpoint.stat().st_mtime, run_dir))
    return max(candidates)[1] if candidates else None


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from ``/proc`` (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat, starttime: clock ticks after boot (fields[0] is field 3)
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:5] == "btime")
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def torchrun_run_name() -> str | None:
    """The run directory's name under torchrun, the same in every rank; None outside torchrun.

    The ranks cannot talk before the process group exists, so the name comes from what they share: torchrun's
    run id (``TORCHELASTIC_RUN_ID``: a fresh id for ``--standalone``, else ``--rdzv-id``) and the launch time
    of the torchrun agent whose children they are (on one node), ``<launch time>_torchrun_<run id's first 8
    characters>``. A restart by the agent (``--max-restarts``) gets the same name, so it finds its checkpoints.
    On several nodes the agents start at different times: ``torchrun_<run id>``, unique as the ``--rdzv-id``."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    launched = _process_start_time(os.getppid())
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 or launched is None:
        return f"torchrun_{safe_id}"
    return f"{datetime.fromtimestamp(int(launched)):%Y-%m-%d_%H-%M-%S}_torchrun_{safe_id[:8]}"
