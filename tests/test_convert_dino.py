"""IDEA-Research/DINO checkpoints -> ddetr (``python -m ddetr.convert dino``), checked against DINO's own outputs.

The fixtures in ``tests/fixtures/dino`` were written by ``tests/fixtures/dino/make_fixture.py`` with DINO's code
(commit faa8520, its pure-PyTorch attention, no pretrained weights): tiny DINO models (ResNet-50, 1 encoder
and 2 decoder layers, 30 queries, 5 classes) with random weights at 4 and 5 scales, and DINO's outputs for a
fixed padded batch. The converted model must reproduce them within 1e-4 in float32 on the CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath

import pytest
import torch

from ddetr.checkpoints import CheckpointRefusedError, load_pretrained
from ddetr.convert.cli import main
from ddetr.convert.dino import DINO_COMMIT, dino_options, load_dino, read_dino
from ddetr.models.build import build_deformable_detr
from ddetr.models.config import DeformableDETRConfig
from ddetr.models.postprocess import PostProcess

FIXTURES = Path(__file__).parent / "fixtures" / "dino"
TOLERANCE = 1e-4


def _reference(num_scales: int) -> dict:
    return torch.load(FIXTURES / f"dino_tiny_{num_scales}scale_outputs.pth", map_location="cpu", weights_only=True)


def _assert_matches_dino(model: torch.nn.Module, reference: dict) -> None:
    """Logits and boxes of every decoder layer, the selected proposals and the post-processed detections."""
    with torch.no_grad():
        outputs = model((reference["images"], reference["mask"]))
    layers = [*outputs["aux_outputs"], outputs]
    torch.testing.assert_close(
        torch.stack([layer["pred_logits"] for layer in layers]), reference["layer_logits"], atol=TOLERANCE, rtol=0
    )
    torch.testing.assert_close(
        torch.stack([layer["pred_boxes"] for layer in layers]), reference["layer_boxes"], atol=TOLERANCE, rtol=0
    )
    torch.testing.assert_close(
        outputs["interm_outputs"]["pred_logits"], reference["interm_logits"], atol=TOLERANCE, rtol=0
    )
    torch.testing.assert_close(
        outputs["interm_outputs"]["pred_boxes"], reference["interm_boxes"], atol=TOLERANCE, rtol=0
    )
    detections = PostProcess(reference["num_select"])(outputs, reference["target_sizes"])
    for index, detection in enumerate(detections):
        assert torch.equal(detection["labels"], reference["labels"][index])
        torch.testing.assert_close(detection["scores"], reference["scores"][index], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(detection["boxes"], reference["boxes"][index], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("num_scales", [4, 5])
def test_converted_dino_reproduces_dinos_outputs(num_scales):
    reference = _reference(num_scales)
    assert reference["dino_commit"] == DINO_COMMIT
    module = load_dino(FIXTURES / f"dino_tiny_{num_scales}scale.pth")
    config = module.config
    assert (config.variant, config.num_feature_levels, config.position_temperature) == ("dino", num_scales, 20.0)
    assert config.backbone.min_stride == (4 if num_scales == 5 else 8)
    assert module.model.level_strides() == [4, 8, 16, 32, 64][5 - num_scales :]
    assert config.denoising.enabled and config.look_forward_twice and config.query_selection == "mixed"
    _assert_matches_dino(module.model, reference)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The 4-scale fixture converted by ``python -m ddetr.convert dino IN OUT num_select=20`` (in-process)."""
    target = tmp_path_factory.mktemp("dino") / "dino.ckpt"
    assert main(["dino", str(FIXTURES / "dino_tiny_4scale.pth"), str(target), "num_select=20"]) == 0
    return target


def test_cli_dino_writes_a_checkpoint_that_loads_back(converted):
    from ddetr.training.module import DeformableDETRModule

    checkpoint = torch.load(converted, map_location="cpu", weights_only=True)
    assert checkpoint["ddetr_converted_from"] == "dino"
    assert checkpoint["hyper_parameters"]["num_select"] == 20
    loaded = DeformableDETRModule.load_from_checkpoint(converted, map_location="cpu").eval()
    _assert_matches_dino(loaded.model, _reference(4))
    # the label book: label_enc's first num_classes rows (DINO's has dn_labelbook_size + 1)
    state, _ = read_dino(FIXTURES / "dino_tiny_4scale.pth")
    assert torch.equal(loaded.model.denoising.label_embed.weight, state["label_enc.weight"][:5])


def test_dino_file_is_read_weights_only_with_only_its_namespace(tmp_path):
    state, args = read_dino(FIXTURES / "dino_tiny_4scale.pth")
    assert args["modelname"] == "dino" and args["num_queries"] == 30
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": state, "args": argparse.Namespace(output_dir=PurePosixPath("/tmp"))}, hostile)
    with pytest.raises(CheckpointRefusedError, match="hostile.pth"):
        load_dino(hostile)


def test_dino_options_name_what_ddetr_does_not_build():
    with pytest.raises(ValueError, match="decoder_sa_type='ca_label'.*return_interm_indices=\\[3\\]"):
        dino_options({"decoder_sa_type": "ca_label", "return_interm_indices": [3]})
    with pytest.raises(TypeError, match="unknown DINO options \\['with_box_refine'\\]"):
        load_dino(FIXTURES / "dino_tiny_4scale.pth", with_box_refine=True)


def test_fine_tuning_from_dino_reinitialises_only_the_class_sized_weights(converted):
    checkpoint = torch.load(converted, map_location="cpu", weights_only=True)
    weights = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    architecture = {
        k: v for k, v in checkpoint["hyper_parameters"].items() if k in DeformableDETRConfig.__dataclass_fields__
    }
    model = build_deformable_detr(DeformableDETRConfig.from_dict(architecture, num_classes=3))
    fresh = {key: value.clone() for key, value in model.state_dict().items()}
    load_pretrained(model, str(converted))
    class_sized = {"class_embed.0.weight", "class_embed.0.bias", "enc_class_embed.weight", "enc_class_embed.bias"}
    class_sized.add("denoising.label_embed.weight")
    for key, value in model.state_dict().items():
        expected = fresh[key] if key in class_sized else weights[key]
        assert torch.equal(value, expected), key
