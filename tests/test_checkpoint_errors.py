"""A checkpoint that cannot be used stops with one line naming the file and the likely cause."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _runs import error_line, run_entry

from ddetr.checkpoints import (
    CheckpointError,
    check_resume_checkpoint,
    load_module,
    load_pretrained,
    save_checkpoint,
)
from ddetr.training.module import DeformableDETRModule


@pytest.fixture(scope="module")
def files(tmp_path_factory, micro_config_module) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    good = root / "converted.ckpt"
    save_checkpoint(micro_config_module, good, "test")
    data = good.read_bytes()
    paths = {"good": good}
    paths["truncated"] = root / "truncated.ckpt"
    paths["truncated"].write_bytes(data[: len(data) // 2])  # an interrupted copy
    paths["empty"] = root / "empty.ckpt"
    paths["empty"].write_bytes(b"")
    paths["text"] = root / "notes.ckpt"
    paths["text"].write_text("this is not a checkpoint\n")
    paths["official"] = root / "r50_deformable_detr-checkpoint.pth"
    torch.save({"model": {"transformer.level_embed": torch.zeros(4, 8)}, "args": None}, paths["official"])
    paths["hf"] = root / "deformable-detr"
    paths["hf"].mkdir()
    (paths["hf"] / "config.json").write_text("{}")
    paths["state_dict"] = root / "weights.pth"
    torch.save(micro_config_module.model.state_dict(), paths["state_dict"])
    return paths


@pytest.fixture(scope="module")
def micro_config_module(micro_options) -> DeformableDETRModule:
    return DeformableDETRModule(num_classes=3, **micro_options(dec_layers=1, num_queries=5))


CAUSES = {
    "truncated": "incomplete",
    "empty": "empty",
    "text": "not a PyTorch checkpoint",
    "official": "python -m ddetr.convert official",
    "hf": "python -m ddetr.convert hf",
}


@pytest.mark.parametrize("kind", sorted(CAUSES))
def test_every_reader_names_the_file_and_the_cause(files, micro_config_module, kind):
    path = files[kind]
    readers = {
        "ckpt_path": lambda: load_module(path),  # eval, predict and export
        "ckpt_path ": lambda: check_resume_checkpoint(path),  # train, before Lightning reads it
        "model.init_from": lambda: load_pretrained(micro_config_module.model, str(path)),
    }
    for what, read in readers.items():
        with pytest.raises(CheckpointError) as error:
            read()
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"{what.strip()}: ") and str(path) in message and CAUSES[kind] in message, message


def test_wrong_kind_of_checkpoint_says_what_to_use(files):
    with pytest.raises(CheckpointError, match="holds weights only .* model.init_from="):
        check_resume_checkpoint(files["good"])  # converted: no training state to resume
    with pytest.raises(CheckpointError, match="plain state dict of DeformableDETR.*model.init_from="):
        load_module(files["state_dict"])
    assert load_module(files["good"]).hparams.hidden_dim == 32  # a good one still loads


@pytest.mark.parametrize("entry", ["eval", "train", "export"])
def test_command_line_stops_with_one_line(tmp_path, files, entry):
    extra = {"train": ["preset=debug"], "export": [f"output={tmp_path}/m.onnx"], "eval": []}[entry]
    options = [f"ckpt_path={files['truncated']}", f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs"]
    last = error_line(run_entry(f"ddetr.{entry}", [*options, *extra], cwd=tmp_path))
    assert last.startswith("error: ckpt_path: cannot read") and str(files["truncated"]) in last and "incomplete" in last
