"""Converters: official and transformers checkpoints -> ddetr, checked against the transformers oracle."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from _hf_oracle import NUM_CLASSES, assert_outputs_close, ddetr_flags
from _hf_oracle import hf_model, hf_outputs, official_names_from_hf, padded_batch

from ddetr.models.config import BackboneConfig
from ddetr.convert import (
    hf_to_official,
    infer_official_flags,
    load_hf,
    load_official,
    official_to_ddetr,
)
from ddetr.convert.cli import main, parse_overrides


@pytest.fixture(scope="module")
def two_stage_case():
    model = hf_model("two_stage", seed=1)
    images, padded, mask = padded_batch(seed=1)
    return model, hf_outputs(model, padded, mask), images


def _official_checkpoint(path: Path, model, flags: dict | None) -> Path:
    checkpoint = {"model": official_names_from_hf(model.state_dict()), "epoch": 49}
    if flags is not None:
        checkpoint["args"] = argparse.Namespace(lr=2e-4, dataset_file="coco", **flags)
    torch.save(checkpoint, path)
    return path


def test_cli_official_writes_a_checkpoint_that_loads_back(tmp_path, two_stage_case):
    from ddetr.training.module import DeformableDETRModule

    model, reference, images = two_stage_case
    source = _official_checkpoint(tmp_path / "official.pth", model, flags=ddetr_flags("two_stage"))
    target = tmp_path / "converted.ckpt"
    # what `python -m ddetr.convert official IN OUT dropout=0.0` runs, in-process to keep the test fast
    assert main(["official", str(source), str(target), "dropout=0.0"]) == 0
    checkpoint = torch.load(target, map_location="cpu", weights_only=True)
    assert checkpoint["ddetr_converted_from"] == "official"
    hyper_parameters = checkpoint["hyper_parameters"]
    assert hyper_parameters["num_classes"] == NUM_CLASSES
    backbone = hyper_parameters["backbone"]
    assert {k: backbone[k] for k in ("name", "dilation", "weights")} == {
        "name": "resnet18",
        "dilation": False,
        "weights": None,
    }
    assert backbone == dataclasses.asdict(BackboneConfig(name="resnet18"))  # the rest: the official defaults
    assert hyper_parameters["two_stage"] and hyper_parameters["with_box_refine"] and hyper_parameters["dropout"] == 0.0
    loaded = DeformableDETRModule.load_from_checkpoint(target, map_location="cpu").eval()
    with torch.no_grad():
        assert_outputs_close(loaded(images), reference)


def test_load_official_with_explicit_flags_and_flag_checks(tmp_path, two_stage_case):
    model, reference, images = two_stage_case
    source = _official_checkpoint(tmp_path / "no_args.pth", model, flags=None)
    flags = ddetr_flags("two_stage")
    module = load_official(source, **flags)
    assert not module.training
    with torch.no_grad():
        assert_outputs_close(module(images), reference)
    with pytest.raises(ValueError, match="with_box_refine=False"):
        load_official(source, **{**flags, "with_box_refine": False, "two_stage": False})
    with pytest.raises(ValueError, match="dec_layers=6"):
        load_official(source, **{**flags, "dec_layers": 6})
    with pytest.raises(TypeError, match="unknown options"):
        load_official(source, **flags, lr=1.0)


def test_infer_official_flags(two_stage_case):
    model, _, _ = two_stage_case
    inferred = infer_official_flags(official_names_from_hf(model.state_dict()))
    flags = ddetr_flags("two_stage")
    expected = {
        name: flags[name]
        for name in ("backbone", "num_feature_levels", "hidden_dim", "enc_layers", "dec_layers", "dim_feedforward")
    }
    assert inferred == {**expected, "two_stage": True, "with_box_refine": True}


@pytest.mark.parametrize("variant", ["multi_scale", "two_stage"])
def test_load_hf_directory_without_transformers(tmp_path, monkeypatch, variant):
    model = hf_model(variant, seed=2)
    images, padded, mask = padded_batch(seed=2)
    reference = hf_outputs(model, padded, mask)
    model.save_pretrained(tmp_path)  # tied heads of multi_scale are written once: class_embed.0 only
    monkeypatch.setitem(sys.modules, "transformers", None)  # load_hf must not need transformers
    module = load_hf(tmp_path)
    assert module.hparams["num_queries"] == ddetr_flags(variant)["num_queries"]
    with torch.no_grad():
        assert_outputs_close(module(images), reference)


def test_load_hf_state_dict_file_with_flags(tmp_path):
    model = hf_model("box_refine", seed=3)
    images, padded, mask = padded_batch(seed=3)
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    module = load_hf(path, **ddetr_flags("box_refine"))
    with torch.no_grad():
        assert_outputs_close(module(images), hf_outputs(model, padded, mask))


def test_shared_heads_must_be_equal_without_refinement():
    model = hf_model("box_refine", seed=4)  # distinct heads per layer
    official = official_names_from_hf(model.state_dict())
    with pytest.raises(ValueError, match="with_box_refine=True"):
        official_to_ddetr(official, **{**ddetr_flags("box_refine"), "with_box_refine": False})


def test_unknown_keys_are_errors():
    model = hf_model("single_scale", seed=5)
    state_dict = dict(model.state_dict())
    state_dict["model.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="model.extra_head.weight"):
        hf_to_official(state_dict)


def test_parse_overrides():
    assert parse_overrides(["with_box_refine=true", "num_queries=100", "dropout=0.0", "backbone=resnet101"]) == {
        "with_box_refine": True,
        "num_queries": 100,
        "dropout": 0.0,
        "backbone": "resnet101",
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["two_stage"])
