"""Checkpoint safety (issue 19).

A checkpoint is a pickle, and unpickling runs what the file names. Every read in ddetr is weights-only:
a file that asks for any other class is refused through every entry point and API, runs nothing, and
the error names the option, the file and the class. ``trust_checkpoint=true`` is the only way to
unpickle it in full. What real checkpoints hold still loads: a training run's and the official repo's
``.pth`` (``args`` an ``argparse.Namespace``). Initial backbone weights are not re-read by a checkpoint,
checkpoint writes are atomic, and ``ddetr.predict`` reads a run's config only for that run's checkpoint.

The hostile files hold a ``WritesMarker``: unpickling it creates a marker file (instead of harm), so
"refused" is checked as "no marker", and the trusted load that does create it shows the payload is live.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from _runs import error_line, run_entry
from conftest import _debug_overrides, _micro_options

from ddetr.app import compose
from ddetr.checkpoints import (
    AtomicCheckpointIO,
    CheckpointRefusedError,
    check_resume_checkpoint,
    load_file,
    load_module,
    load_pretrained,
    read_checkpoint,
    save_checkpoint,
)
from ddetr.convert import load_hf, load_official
from ddetr.convert.cli import main as convert_main
from ddetr.inference.export import export
from ddetr.inference.predict import predict, resolve_resize
from ddetr.training.module import DeformableDETRModule
from ddetr.training.run import evaluate, train

PAYLOAD = f"{open.__module__}.{open.__qualname__}"  # what WritesMarker asks to import: the class the error must name


class WritesMarker:
    """Unpickling this calls ``open(path, "w")``: the marker file appears."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def micro_module() -> DeformableDETRModule:
    torch.manual_seed(0)
    return DeformableDETRModule(num_classes=3, **_micro_options(dec_layers=1, num_queries=5))


SHAPES = ("whole", "lightning", "official", "raw_pickle")


def write_hostile(path: Path, shape: str, marker: Path) -> Path:
    """A checkpoint file of ``shape`` whose unpickling writes ``marker``: the whole file, hidden in the
    hyper-parameters of a real Lightning checkpoint, as an official checkpoint's ``args``, or a plain
    ``pickle.dump`` (protocol 4) instead of ``torch.save``."""
    payload = WritesMarker(marker)
    if shape == "whole":
        torch.save(payload, path)
    elif shape == "lightning":
        module = micro_module()
        torch.save(
            {
                "state_dict": module.state_dict(),
                "hyper_parameters": {**module.hparams, "extra": payload},
                "optimizer_states": [],
                "loops": {},
                "pytorch-lightning_version": "2.6.0",
            },
            path,
        )
    elif shape == "official":
        torch.save({"model": {"class_embed.0.weight": torch.zeros(3, 32)}, "epoch": 1, "args": payload}, path)
    else:
        with open(path, "wb") as file:
            pickle.dump({"state_dict": {}, "x": payload}, file, protocol=4)
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def entry_point_readers(tmp_path: Path, data_root: Path, debug_overrides) -> dict:
    """Every way ddetr reads a checkpoint: name -> (the option the error must name, read(path))."""
    out = tmp_path / "out"
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    debug = debug_overrides(out, data_root)

    def config(name: str, path: Path, *extra: str):
        common = [f"ckpt_path={path}", f"paths.output_dir={out}", f"paths.log_dir={out}/logs"]
        return compose([*common, *extra], config_name=name)

    def lightning_resume(path: Path):  # Lightning's own read of ckpt_path, without our check before it
        from hydra.utils import instantiate

        cfg = compose(debug)
        datamodule = instantiate(cfg.data)
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        trainer.fit(micro_module(), datamodule=datamodule, ckpt_path=str(path))

    return {
        "ddetr.eval": ("ckpt_path", lambda p: evaluate(config("eval", p, f"data.root={data_root}"))),
        "ddetr.predict": ("ckpt_path", lambda p: predict(config("predict", p, f"input={images}", f"output={out}"))),
        "ddetr.export": ("ckpt_path", lambda p: export(config("export", p, f"output={out}/m.onnx"))),
        "ddetr.train ckpt_path=": ("ckpt_path", lambda p: train(compose([*debug, f"ckpt_path={p}"]))),
        "ddetr.train model.init_from=": ("model.init_from", lambda p: train(compose([*debug, f"model.init_from={p}"]))),
        "ddetr.train model.backbone.weights=": (
            "model.backbone.weights",
            lambda p: train(compose([*debug, f"model.backbone.weights={p}"])),
        ),
        "ddetr.convert official": ("official checkpoint", lambda p: convert_main(["official", str(p), f"{out}.ckpt"])),
        "load_official": ("official checkpoint", lambda p: load_official(p)),
        "load_hf (a torch file)": ("transformers weights", lambda p: load_hf(p)),
        "load_module": ("ckpt_path", lambda p: load_module(p)),
        "load_pretrained": ("model.init_from", lambda p: load_pretrained(micro_module().model, str(p))),
        "check_resume_checkpoint": ("ckpt_path", lambda p: check_resume_checkpoint(p)),
        "read_checkpoint": ("checkpoint", lambda p: read_checkpoint(p)),
        "AtomicCheckpointIO.load_checkpoint": ("ckpt_path", lambda p: AtomicCheckpointIO().load_checkpoint(p)),
        "Trainer.fit(ckpt_path=)": ("ckpt_path", lightning_resume),
    }


ENTRY_POINTS = (
    "ddetr.eval",
    "ddetr.predict",
    "ddetr.export",
    "ddetr.train ckpt_path=",
    "ddetr.train model.init_from=",
    "ddetr.train model.backbone.weights=",
    "ddetr.convert official",
    "load_official",
    "load_hf (a torch file)",
    "load_module",
    "load_pretrained",
    "check_resume_checkpoint",
    "read_checkpoint",
    "AtomicCheckpointIO.load_checkpoint",
    "Trainer.fit(ckpt_path=)",
)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_hostile_checkpoint_is_refused_everywhere_and_runs_nothing(tmp_path, data_root, debug_overrides, entry, shape):
    marker = tmp_path / "MARKER"
    path = write_hostile(tmp_path / f"{shape}.ckpt", shape, marker)
    what, read = entry_point_readers(tmp_path, data_root, debug_overrides)[entry]
    with pytest.raises((CheckpointRefusedError, SystemExit)) as error:
        read(path)
    assert not marker.exists(), f"{entry} ran the code in a {shape} checkpoint"
    message = str(error.value).removeprefix("error: ")
    assert "\n" not in message
    assert message.startswith(f"{what}: refused {path}: "), message
    assert PAYLOAD in message and "trust_checkpoint=true" in message, message


def test_the_payload_is_live_and_trust_checkpoint_is_the_only_way_to_run_it(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    path = write_hostile(tmp_path / "lightning.ckpt", "lightning", marker)
    # torch's own switch to full unpickling by default does not reach ddetr's reads
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointRefusedError):
        load_module(path)
    assert not marker.exists()
    read_checkpoint(path, trust=True)  # the user's explicit choice: the file's code runs
    assert marker.exists()


def test_a_trusted_file_with_a_foreign_class_loads_only_with_trust_checkpoint(tmp_path):
    from fractions import Fraction

    module = micro_module()
    path = tmp_path / "with_a_class.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.6.0",
            "note": Fraction(1, 3),
        },
        path,
    )
    with pytest.raises(CheckpointRefusedError, match="fractions.Fraction"):
        load_module(path)
    loaded = load_module(path, trust=True)
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 30)).save(tmp_path / "photo.png")
    options = [
        f"ckpt_path={path}",
        f"input={tmp_path / 'photo.png'}",
        f"output={tmp_path}/out",
        "device=cpu",
        "progress_bar=false",
        f"paths.log_dir={tmp_path}/logs",
    ]
    with pytest.raises(CheckpointRefusedError, match="fractions.Fraction"):
        predict(compose(options, config_name="predict"))
    assert predict(compose([*options, "trust_checkpoint=true"], config_name="predict"))["num_images"] == 1
    with pytest.raises(ValueError, match="trust_checkpoint must be true or false"):
        predict(compose([*options, "trust_checkpoint=yes"], config_name="predict"))


def test_a_backbone_weights_file_with_a_foreign_class_loads_only_with_trust_checkpoint(tmp_path, data_root):
    from fractions import Fraction

    from hydra.utils import instantiate

    from ddetr.training.run import build_module

    def config(*extra: str):
        return compose([*_debug_overrides(tmp_path, data_root), *extra])

    datamodule = instantiate(config().data)
    network = build_module(config(), datamodule).model.backbone.body
    generator = torch.Generator().manual_seed(0)
    weights = {
        key: torch.rand(value.shape, generator=generator) + 0.5 if value.is_floating_point() else value + 7
        for key, value in network.state_dict().items()
    }
    path = tmp_path / "backbone_with_a_class.pth"
    torch.save({"state_dict": weights, "note": Fraction(1, 3)}, path)
    with pytest.raises(CheckpointRefusedError, match=r"^model.backbone.weights: refused .*fractions.Fraction"):
        build_module(config(f"model.backbone.weights={path}"), datamodule)
    trusted = build_module(config(f"model.backbone.weights={path}", "trust_checkpoint=true"), datamodule)
    loaded = trusted.model.backbone.body.state_dict()
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key


def test_command_line_refuses_with_one_line(tmp_path):
    marker = tmp_path / "MARKER"
    path = write_hostile(tmp_path / "hostile.ckpt", "lightning", marker)
    options = [f"ckpt_path={path}", f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs"]
    last = error_line(run_entry("ddetr.eval", options, cwd=tmp_path))
    assert not marker.exists()
    assert last.startswith(f"error: ckpt_path: refused {path}: ") and PAYLOAD in last, last


# ------------------------------------------------------------------ what real checkpoints hold still loads


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A tiny ``preset=debug`` run whose backbone starts from a weights file (a torchvision ResNet-18 state
    dict); returns the run's overrides, the weights as they were, and the file (deleted by the tests)."""
    import torchvision

    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(3)
    weights = torchvision.models.resnet18(weights=None).state_dict()
    weights_file = root / "resnet18_start.pth"
    torch.save(weights, weights_file)
    # as the official with initial weights: frozen batch norm, the stem never trains
    overrides = _debug_overrides(root / "run", data_root) + [
        f"model.backbone.weights={weights_file}",
        "model.backbone.norm=frozen",
        "model.backbone.freeze_stem=true",
    ]
    train(compose(overrides))
    return overrides, weights, weights_file


def test_a_real_training_checkpoint_is_plain_values(trained):
    overrides, _, _ = trained
    ckpt = Path(compose(overrides).paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # raises on anything but plain values
    for key in (
        "state_dict",
        "optimizer_states",
        "lr_schedulers",
        "loops",
        "callbacks",
        "rng_states",
        "hyper_parameters",
        "epoch",
        "global_step",
    ):
        assert key in state, key
    assert state["optimizer_states"][0]["state"], "the optimiser's moments are saved"
    assert any("ModelCheckpoint" in name for name in state["callbacks"])


def test_checkpoint_neither_rereads_nor_needs_the_initial_weights_file(trained):
    overrides, weights, weights_file = trained
    ckpt = Path(compose(overrides).paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["backbone"]["weights"] is None
    # the frozen stem kept the file's weights: training did start from it
    assert torch.equal(saved["state_dict"]["model.backbone.body.conv1.weight"], weights["conv1.weight"])
    weights_file.unlink()  # gone: another machine, or the file moved

    module = load_module(ckpt)
    assert torch.equal(module.model.backbone.body.conv1.weight, weights["conv1.weight"])
    # a checkpoint written before the fix names the file in its hyper-parameters: load_module ignores it
    saved["hyper_parameters"]["backbone"]["weights"] = str(weights_file)
    old = ckpt.parent / "older.ckpt"
    torch.save(saved, old)
    assert torch.equal(load_module(old).model.backbone.body.conv1.weight, weights["conv1.weight"])
    # resuming with the same overrides does not read the deleted file either: the weights come from ckpt_path
    train(compose([*overrides, "trainer.max_epochs=2", f"ckpt_path={ckpt}"]))
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2 * saved["global_step"]


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_an_official_checkpoint_as_main_py_saves_it_converts(tmp_path, zipped):
    """The official ``main.py`` saves ``model``, ``optimizer``, ``lr_scheduler``, ``epoch`` and ``args`` (the
    ``argparse.Namespace`` of its command line); its released files are of torch 1.5 (the legacy format)."""
    pytest.importorskip("transformers")
    from _hf_oracle import assert_outputs_close, ddetr_flags, hf_model, hf_outputs, official_names_from_hf, padded_batch

    model = hf_model("box_refine", seed=2)
    images, padded, mask = padded_batch(seed=2)
    reference = hf_outputs(model, padded, mask)
    official = official_names_from_hf(model.state_dict())
    parameters = [torch.nn.Parameter(v.clone()) for v in official.values() if v.is_floating_point()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-4, weight_decay=1e-4)
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    # the official command line's options (main.py's argparse), the architecture those of the tiny model
    options = {
        "lr": 2e-4,
        "lr_backbone_names": ["backbone.0"],
        "lr_backbone": 2e-5,
        "lr_linear_proj_names": ["reference_points", "sampling_offsets"],
        "lr_linear_proj_mult": 0.1,
        "batch_size": 2,
        "weight_decay": 1e-4,
        "epochs": 50,
        "lr_drop": 40,
        "lr_drop_epochs": None,
        "clip_max_norm": 0.1,
        "sgd": False,
        "frozen_weights": None,
        "position_embedding": "sine",
        "position_embedding_scale": 6.283185307179586,
        "dropout": 0.0,
        "enc_n_points": 4,
        "dec_n_points": 4,
        "masks": False,
        "aux_loss": True,
        "set_cost_class": 2,
        "set_cost_bbox": 5,
        "set_cost_giou": 2,
        "cls_loss_coef": 2,
        "bbox_loss_coef": 5,
        "giou_loss_coef": 2,
        "focal_alpha": 0.25,
        "dataset_file": "coco",
        "coco_path": "./data/coco",
        "remove_difficult": False,
        "output_dir": "exps/r50_deformable_detr",
        "device": "cuda",
        "seed": 42,
        "resume": "",
        "start_epoch": 0,
        "eval": False,
        "num_workers": 2,
        "cache_mode": False,
    }
    args = argparse.Namespace(**options, **{**ddetr_flags("box_refine"), "two_stage": False})
    source = tmp_path / "checkpoint0049.pth"
    torch.save(
        {
            "model": official,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "epoch": 49,
            "args": args,
        },
        source,
        _use_new_zipfile_serialization=zipped,
    )
    with pytest.raises(CheckpointRefusedError, match="argparse.Namespace"):
        load_file(source)  # Namespace is allowed for the official checkpoint's read only

    target = tmp_path / "converted.ckpt"
    assert convert_main(["official", str(source), str(target)]) == 0  # every option from the saved args
    converted = torch.load(target, map_location="cpu", weights_only=True)
    assert converted["hyper_parameters"]["with_box_refine"] and converted["hyper_parameters"]["hidden_dim"] == 32
    with torch.no_grad():
        assert_outputs_close(load_module(target)(images), reference)


# ------------------------------------------------------------------ atomic writes


def test_a_failing_checkpoint_write_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "converted.ckpt"
    good = micro_module()
    save_checkpoint(good, path, "official")
    before = path.read_bytes()
    broken = micro_module()
    broken.hparams["not_picklable"] = lambda: None  # pickling fails after the file would have been opened
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(broken, path, "official")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.ckpt"], "no temporary file left behind"
    assert load_module(path).hparams.hidden_dim == 32


# ------------------------------------------------------------------ predict's resize from the run's config


def write_run(run: Path, config_text: str) -> Path:
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(config_text)
    return run / "checkpoints" / "last.ckpt"


RUN_CONFIG = "task_name: train\ndata:\n  val_transforms:\n    size: 128\n    max_size: 224\n"


def test_predict_reads_the_run_config_only_for_a_checkpoint_in_a_runs_checkpoints_folder(tmp_path):
    assert resolve_resize(None, None, write_run(tmp_path / "run", RUN_CONFIG))[:2] == (128, 224)
    # the same layout two folders up, but the checkpoint is not in a checkpoints/ folder: not its run's config
    elsewhere = tmp_path / "downloads" / "models" / "r50.ckpt"
    elsewhere.parent.mkdir(parents=True)
    (tmp_path / "downloads" / ".hydra").mkdir()
    (tmp_path / "downloads" / ".hydra" / "config.yaml").write_text(RUN_CONFIG)
    assert resolve_resize(None, None, elsewhere) == (800, 1333, "official defaults")


def test_predict_reads_the_run_config_as_plain_yaml(tmp_path):
    marker = tmp_path / "MARKER"
    hostile = f"data:\n  val_transforms: !!python/object/apply:builtins.open ['{marker}', 'w']\n"
    ckpt = write_run(tmp_path / "run", hostile)
    with pytest.raises(ValueError, match=re.escape(f"cannot read the training run's config {ckpt.parents[1]}")):
        resolve_resize(None, None, ckpt)
    assert not marker.exists()
    yaml.unsafe_load(hostile)  # the control: a full YAML load would have run it
    assert marker.exists()
    interpolated = write_run(tmp_path / "run2", "data:\n  val_transforms:\n    size: ${data.image_size}\n")
    with pytest.raises(ValueError, match="data.val_transforms.size .* not a whole number"):
        resolve_resize(None, None, interpolated)
    assert resolve_resize(96, 160, interpolated) == (96, 160, "config")  # explicit values: the file is not read
