"""How the tests run a documented ``python -m ddetr.X ...`` command small: the overrides appended per entry point
(``small_overrides``) and ``run_command``, which runs a Hydra entry point in this process through its own
``main()`` (exactly what the command line does) and a multirun or another module in a subprocess."""

from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path

from _runs import run_ok
from conftest import TINY_DATA_OVERRIDES

HYDRA_ENTRIES = {"ddetr.train", "ddetr.eval", "ddetr.predict", "ddetr.export", "ddetr.check_data"}
# what makes a run of an entry point on the files of `workspace` small: the tiny model, 64-pixel images, one epoch
SMALL_DATA = TINY_DATA_OVERRIDES
SMALL_SYNTHETIC = [
    "data.num_train=12",
    "data.num_val=6",
    "data.image_size=64",
    "data.num_workers=0",
    "data.val_transforms.size=64",
    "data.val_transforms.max_size=96",
]
SMALL_TRAINER = ["trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1"]


def small_overrides(module: str, args: list[str]) -> list[str]:
    """The overrides appended to ``python -m module *args`` so that it runs in seconds."""
    switched = any(arg.startswith("data=") for arg in args)
    if module == "ddetr.train":
        if not switched:
            return ["preset=debug"]
        return ["model=tiny", *SMALL_TRAINER, "callbacks.progress_bar.refresh_rate=0", *SMALL_DATA]
    if module == "ddetr.check_data":
        data = SMALL_DATA if switched else SMALL_SYNTHETIC
        return ["model=tiny", "num_pictures=2", "overfit_images=2", "overfit_steps=2", *data]
    if module == "ddetr.eval":
        data = SMALL_DATA if switched else SMALL_SYNTHETIC
        return ["trainer.accelerator=cpu", "+trainer.enable_progress_bar=false", *data]
    if module == "ddetr.predict":
        return ["size=64", "max_size=96", "progress_bar=false"]
    if module == "ddetr.export":
        return ["height=64", "width=64"]
    return []


def run_command(command: str, cwd: Path, substitutions: dict[str, str], log_dir: Path) -> None:
    """Runs one documented shell command in ``cwd`` with ``small_overrides`` appended: a Hydra entry point in
    this process through its ``main()`` (so exactly what the command line does), a multirun or another module
    in a subprocess. ``<date>``-style placeholders are replaced by ``substitutions``."""
    for placeholder, value in substitutions.items():
        command = command.replace(placeholder, value)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], f"not a `python -m` command: {command}"
    module, args = argv[2], argv[3:]
    extra = small_overrides(module, args) + ([f"paths.log_dir={log_dir}"] if module in HYDRA_ENTRIES else [])
    if module not in HYDRA_ENTRIES or "-m" in args:
        run_ok(module, args + extra, cwd, timeout=600)
        return
    from hydra.core.global_hydra import GlobalHydra

    from ddetr.app import run_dir

    run_dir.cache_clear()  # a new run directory for every command, as a new process gets
    GlobalHydra.instance().clear()
    entry = importlib.import_module(module)
    saved = sys.argv
    sys.argv = [module, *args, *extra]
    try:
        entry.main()
    except SystemExit as stop:
        assert stop.code in (0, None), f"{command}: exit {stop.code}"
    except Exception as error:  # name the documented command, not only the frame it failed in
        raise AssertionError(f"{command} (run as {sys.argv}): {type(error).__name__}: {error}") from error
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
