"""Every shell and Python block of README.md and docs/*.md is run here or says why it cannot be (a GPU, a cluster,
a dataset, a download): ``<!-- run -->`` or ``<!-- not-run: REASON -->`` right above its fence
(``tests/_doc_blocks.py``). The blocks marked ``run`` run in a temporary folder holding the files their commands
name (``my_set/``, ``my_yolo_set/``, ``VOCdevkit/VOC2012/``, ``photos/``, ``last.ckpt``, the run directory
``logs/train/runs/<date>``), with small overrides appended (``preset=debug`` or the tiny model, 64-pixel images,
one epoch): Hydra entry points in this process through their own ``main()``, a multirun and the other modules
as subprocesses."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from _doc_blocks import Block, blocks, checked, commands, documents
from _layout_writers import write_voc_year, write_yolo_roboflow
from _runs import run_ok
from conftest import TINY_DATA_OVERRIDES
from PIL import Image

DOCUMENTS = documents()
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


def _write_coco_set(root: Path, synthetic: Path) -> None:
    """``root/images`` and ``root/{train,val}.json``: the debug preset's synthetic images in one folder."""
    (root / "images").mkdir(parents=True)
    for split in ("train", "val"):
        coco = json.loads((synthetic / "annotations" / f"instances_{split}.json").read_text())
        for image in coco["images"]:
            name = f"{split}_{image['file_name']}"
            shutil.copy(synthetic / split / image["file_name"], root / "images" / name)
            image["file_name"] = name
        (root / f"{split}.json").write_text(json.dumps(coco))


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
    import importlib

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


@pytest.mark.parametrize("document", DOCUMENTS, ids=[path.name for path in DOCUMENTS])
def test_every_block_is_run_or_says_why_not(document):
    unmarked = [block.where for block in blocks(document) if checked(block) and block.marker is None]
    no_reason = [block.where for block in blocks(document) if block.marker == "not-run" and not block.reason]
    assert not unmarked and not no_reason, (
        f"shell or Python blocks without a marker {unmarked} or a not-run without its reason {no_reason}: put "
        "`<!-- run -->` on the line right above the fence (tests/test_doc_commands.py then runs it, small "
        "overrides appended; add what its commands need to the `workspace` fixture) or "
        "`<!-- not-run: REASON -->` (a GPU, a cluster, a dataset, a download; say which test covers it)"
    )


RUN_BLOCKS = [block for path in DOCUMENTS for block in blocks(path) if block.marker == "run"]


def test_the_readme_keeps_its_two_commands():
    readme = {block.marker: block for block in blocks(DOCUMENTS[0]) if block.marker}
    assert commands(readme["train-command"]) == ["pip install -e . && python -m ddetr.train"]
    assert commands(readme["test-command"])[0].startswith('pip install -e ".[test]" && python -m pytest')


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with the files the documented commands name, made by the README's train command itself
    (``python -m ddetr.train`` with ``preset=debug``): its run directory, ``last.ckpt`` copied out of it,
    ``my_set/`` (COCO files of its synthetic images), ``my_yolo_set/``, ``VOCdevkit/VOC2012/`` and
    ``photos/``. Returns the folder and the placeholders' values."""
    root = tmp_path_factory.mktemp("docs")
    monkey = pytest.MonkeyPatch()
    monkey.chdir(root)
    monkey.setenv("DDETR_ROOT", str(root))
    try:
        (train,) = [block for block in blocks(DOCUMENTS[0]) if block.marker == "train-command"]
        run_command(commands(train)[0].split("&&")[-1].strip(), root, {}, root / "logs")  # after its pip install
    finally:
        monkey.undo()
    (run,) = (root / "logs" / "train" / "runs").iterdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", root / "last.ckpt")
    _write_coco_set(root / "my_set", root / "data" / "synthetic")
    write_yolo_roboflow(root / "my_yolo_set")
    write_voc_year(root / "VOCdevkit" / "VOC2012")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(root / "photos" / f"{index}.png")
    return root, {"<date>": run.name, "<run>": run.name}


def _run_block(block: Block, workspace, monkeypatch, tmp_path) -> None:
    root, substitutions = workspace
    monkeypatch.chdir(root)
    monkeypatch.setenv("DDETR_ROOT", str(root))
    if block.language == "python":
        exec(compile(block.text, block.where, "exec"), {"__name__": "__doc_block__"})
        return
    for index, command in enumerate(commands(block)):
        run_command(command, root, substitutions, tmp_path / f"logs_{index}")


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[block.where for block in RUN_BLOCKS])
def test_run_block(block, workspace, monkeypatch, tmp_path):
    _run_block(block, workspace, monkeypatch, tmp_path)
