"""Every shell and Python block of README.md and docs/*.md is run here or says why it cannot be (a GPU, a cluster,
a dataset, a download): ``<!-- run -->`` or ``<!-- not-run: REASON -->`` right above its fence
(``tests/_doc_blocks.py``). The blocks marked ``run`` run in a temporary folder holding the files their commands
name (``my_set/``, ``my_yolo_set/``, ``VOCdevkit/VOC2012/``, ``photos/``, ``last.ckpt``, the run directory
``logs/train/runs/<date>``), with small overrides appended (``preset=debug`` or the tiny model, 64-pixel images,
one epoch): Hydra entry points in this process through their own ``main()``, a multirun and the other modules
as subprocesses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _doc_blocks import Block, blocks, checked, commands, documents
from _entry_points import run_command
from _layout_writers import write_voc_year, write_yolo_roboflow
from PIL import Image

DOCUMENTS = documents()


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
def workspace(tmp_path_factory, debug_run):
    """A folder with the files the documented commands name: a copy of ``debug_run``'s folder (the README's
    train command run with ``preset=debug``: its data and run directory), ``last.ckpt`` copied out of the run,
    ``my_set/`` (COCO files of its synthetic images), ``my_yolo_set/`` and ``VOCdevkit/VOC2012/`` (the tiny
    dataset of ``tests/_layout_writers.py``) and ``photos/``. Returns the folder and the placeholders' values."""
    debug_root, debug_run_dir = debug_run
    root = tmp_path_factory.mktemp("docs") / "workspace"
    shutil.copytree(debug_root, root)
    run = root / debug_run_dir.relative_to(debug_root)
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
