"""Run directories: runs started in the same second each get their own; one process resolves its run
directory once (Lightning's DDP launcher resolves the config again to start the other ranks)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from ddetr.app import CONFIG_DIR, claim_run_dir, register_resolvers, run_dir

SAME_SECOND = "2026-12-01_10-00-00"


def _claim(parent: str, barrier, out) -> None:
    barrier.wait()  # all processes ask for the same name at once
    out.put(claim_run_dir(parent, SAME_SECOND).name)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_claim, args=(str(tmp_path), barrier, out)) for _ in range(4)]
    for process in processes:
        process.start()
    names = sorted(out.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert names == sorted([SAME_SECOND, f"{SAME_SECOND}_2", f"{SAME_SECOND}_3", f"{SAME_SECOND}_4"])
    assert sorted(path.name for path in tmp_path.iterdir()) == names


def test_the_run_directory_is_resolved_once_per_process(tmp_path):
    from hydra import compose, initialize_config_dir

    register_resolvers()
    run_dir.cache_clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.log_dir={tmp_path}"], return_hydra_config=True)
    first = Path(cfg.hydra.run.dir)
    assert first.parent == tmp_path / "train" / "runs" and first.is_dir()
    assert Path(cfg.hydra.run.dir) == first  # resolved again in the same process: the same directory
    run_dir.cache_clear()  # as in another process started in the same second (or later)
    second = Path(cfg.hydra.run.dir)
    assert second != first and second.is_dir()
    run_dir.cache_clear()
