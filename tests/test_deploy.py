"""Deployment: the gather attention (no GridSample), OpenVINO IR, int8, and predict/eval from exported files.

One debug-preset training run (tiny model, 64-pixel synthetic images) is exported once per form for the
whole session; every form runs in its own runtime and is compared with the PyTorch model of the same
checkpoint. OpenVINO tests skip without the ``openvino`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import _eval_overrides

from ddetr.app import compose
from ddetr.checkpoints import load_module
from ddetr.inference.export import ExportableDetector, example_inputs, export
from ddetr.inference.predict import predict
from ddetr.inference.runtime import ExportedModel, ExportedModelError
from ddetr.models.ms_deform_attn import set_attention_backend
from ddetr.ops import ms_deform_attn_pytorch
from ddetr.ops.gather_sampling import ms_deform_attn_gather
from ddetr.training.run import evaluate

try:
    import openvino  # noqa: F401

    HAS_OPENVINO = True
except ImportError:
    HAS_OPENVINO = False
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")

# traced at 2 x 128 x 160 (every level at least 2x2); run at three other sizes, one with a 1-pixel level
EXPORT_SIZE = ["batch_size=2", "height=128", "width=160"]
OTHER_SIZES = [(1, 96, 64), (3, 80, 128), (2, 144, 112)]


# ---------------------------------------------------------------- the op, against grid_sample
def test_gather_sampling_equals_grid_sample_with_zero_padding():
    """Random locations, a fifth of them outside [0, 1], on levels down to 1 pixel, in float64."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 9), (4, 5), (1, 3)]
    batch_size, num_queries, num_heads, head_dim, num_points = 2, 17, 4, 8, 4
    num_values = sum(height * width for height, width in shapes)
    value = torch.randn(batch_size, num_values, num_heads, head_dim, generator=generator, dtype=torch.float64)
    size = (batch_size, num_queries, num_heads, len(shapes), num_points)
    locations = torch.rand(*size, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(*size, generator=generator, dtype=torch.float64)
    spatial_shapes = torch.tensor(shapes)
    expected = ms_deform_attn_pytorch(value, spatial_shapes, None, locations, weights)
    actual = ms_deform_attn_gather(value, spatial_shapes, locations, weights)
    assert torch.allclose(actual, expected, atol=1e-12)


def test_gather_sampling_hand_computed_corner():
    """One 2x2 map, one sample at the centre of pixel (0, 0) shifted right by a quarter pixel: 3/4 of
    pixel (0, 0) and 1/4 of pixel (0, 1); and one sample half a pixel left of the map: half of pixel
    (0, 0) and half of the zero padding."""
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)  # (B, H*W, M, D), rows y then x
    locations = torch.tensor([[0.25 + 0.25 / 2, 0.25], [0.0, 0.25]]).view(1, 2, 1, 1, 1, 2)
    weights = torch.ones(1, 2, 1, 1, 1)
    output = ms_deform_attn_gather(value, torch.tensor([[2, 2]]), locations, weights)
    assert torch.allclose(output.flatten(), torch.tensor([0.75 * 1 + 0.25 * 2, 0.5 * 1]))


# ---------------------------------------------------------------- one trained checkpoint, exported once per form
@pytest.fixture(scope="session")
def trained(debug_run) -> dict[str, Path]:
    """A debug-preset run (one epoch, tiny model; the session's ``debug_run``): its last checkpoint and its
    synthetic data (read only)."""
    folder, run_dir = debug_run
    return {"ckpt": run_dir / "checkpoints" / "last.ckpt", "data": folder / "data" / "synthetic", "root": folder}


def export_to(trained: dict[str, Path], output: Path, *extra: str) -> dict:
    cfg = compose(
        [
            f"ckpt_path={trained['ckpt']}",
            f"output={output}",
            "size=64",
            "max_size=96",
            "with_mask=true",
            "check=false",
            f"data.root={trained['data']}",
            f"paths.log_dir={output.parent}/logs",
            *EXPORT_SIZE,
            *extra,
        ],
        config_name="export",
    )
    return export(cfg)


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """``exported(name) -> Path``: the checkpoint exported as ``name`` (gather.onnx, grid_sample.onnx,
    int8.onnx, model.xml), each written once per session."""
    folder = tmp_path_factory.mktemp("exported")
    forms = {
        "gather.onnx": ["attn_backend=gather"],
        "grid_sample.onnx": ["attn_backend=grid_sample"],
        "int8.onnx": ["quantize=int8", "calibration_images=4", "attn_backend=gather"],  # int8 as docs/deploy.md exports it
        "model.xml": ["format=openvino"],
    }
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            export_to(trained, folder / name, *forms[name])
            done[name] = folder / name
        return done[name]

    return get


def pytorch_outputs(ckpt: Path, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the checkpoint in PyTorch, attention by grid_sample."""
    module = load_module(ckpt)
    set_attention_backend(module.model, "pytorch")
    with torch.no_grad():
        return ExportableDetector(module.model, with_mask=True)(*inputs)


def assert_matches_pytorch_at_other_sizes(path: Path, ckpt: Path) -> None:
    model = ExportedModel(path)
    for batch_size, height, width in OTHER_SIZES:
        images, mask = example_inputs(batch_size, height, width, with_mask=True, seed=7)
        actual = model((images, mask))
        expected_logits, expected_boxes = pytorch_outputs(ckpt, (images, mask))
        assert actual["pred_logits"].shape == expected_logits.shape
        assert (actual["pred_logits"] - expected_logits).abs().max() < 1e-4, (path.name, batch_size, height, width)
        assert (actual["pred_boxes"] - expected_boxes).abs().max() < 1e-4, (path.name, batch_size, height, width)


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.slow
def test_gather_onnx_has_no_grid_sample_and_matches_pytorch_at_other_sizes(trained, exported):
    path = exported("gather.onnx")
    types = op_types(path)
    assert "GridSample" not in types and "Gather" in types
    dims = {
        arg.name: [d.dim_param or d.dim_value for d in arg.type.tensor_type.shape.dim]
        for arg in onnx.load(str(path)).graph.input
    }
    assert dims == {"images": ["batch", 3, "height", "width"], "mask": ["batch", "height", "width"]}
    assert_matches_pytorch_at_other_sizes(path, trained["ckpt"])


@pytest.mark.slow
def test_grid_sample_onnx_stays_a_choice(trained, exported):
    path = exported("grid_sample.onnx")
    assert "GridSample" in op_types(path)
    assert_matches_pytorch_at_other_sizes(path, trained["ckpt"])


@pytest.mark.slow
@needs_openvino
def test_openvino_ir_matches_pytorch_at_other_sizes(trained, exported):
    path = exported("model.xml")
    assert path.with_suffix(".bin").is_file()
    assert_matches_pytorch_at_other_sizes(path, trained["ckpt"])


@pytest.mark.slow
def test_exported_files_carry_what_inference_needs(trained, exported):
    module = load_module(trained["ckpt"])
    paths = [exported("gather.onnx")] + ([exported("model.xml")] if HAS_OPENVINO else [])
    for path in paths:
        metadata = ExportedModel(path).metadata
        assert metadata.class_names == list(module.category_names)
        assert metadata.label_to_category_id == list(module.label_to_category_id)
        assert (metadata.size, metadata.max_size, metadata.with_mask) == (64, 96, True)
        assert (
            metadata.mean == pytest.approx([0.485, 0.456, 0.406])
            and metadata.num_select == module.postprocess.num_select
        )


# ---------------------------------------------------------------- int8
@pytest.mark.slow
def test_int8_onnx_is_quantized_calibrated_on_train_images_and_close(trained, exported):
    from ddetr.data import SyntheticDataModule
    from ddetr.inference.quantize import train_split_files

    path = exported("int8.onnx")
    types = op_types(path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= types and "GridSample" not in types
    files = train_split_files(SyntheticDataModule(root=trained["data"], num_train=12, num_val=6, image_size=64))
    assert files and all("train" in file.parent.name for file in files)
    assert ExportedModel(path).metadata.quantize == "int8"
    images, mask = example_inputs(2, 64, 96, with_mask=True, seed=3)
    expected_logits, expected_boxes = pytorch_outputs(trained["ckpt"], (images, mask))
    actual = ExportedModel(path)((images, mask))
    # int8 rounds, and the two-stage query selection may take the proposals in another order: every float
    # query box has an int8 query box near it (L1 over cx, cy, w, h in [0, 1]) for most queries
    nearest = torch.cdist(expected_boxes, actual["pred_boxes"], p=1).min(dim=2).values  # (B, Q)
    assert nearest.median() < 0.02, nearest
    assert not torch.equal(actual["pred_logits"], expected_logits)


# ---------------------------------------------------------------- predict and eval from the files
def predict_with(trained: dict[str, Path], output: Path, *model: str) -> list[dict]:
    cfg = compose(
        [
            *model,
            f"input={trained['data']}/val",
            f"output={output}",
            "threshold=0.0",
            "batch_size=3",
            "device=cpu",
            "progress_bar=false",
            "size=64",
            "max_size=96",
            f"paths.log_dir={output}/logs",
        ],
        config_name="predict",
    )
    predict(cfg)
    return json.loads((output / "detections.json").read_text())


@pytest.mark.slow
def test_predict_from_exported_files_gives_the_same_detections(trained, exported, tmp_path):
    expected = predict_with(trained, tmp_path / "torch", f"ckpt_path={trained['ckpt']}")
    assert expected
    names = ["gather.onnx"] + (["model.xml"] if HAS_OPENVINO else [])
    for name in names:
        actual = predict_with(trained, tmp_path / name, f"model_file={exported(name)}")
        assert [(d["image_id"], d["category_id"]) for d in actual] == [
            (d["image_id"], d["category_id"]) for d in expected
        ]
        boxes, expected_boxes = np.array([d["bbox"] for d in actual]), np.array([d["bbox"] for d in expected])
        assert np.abs(boxes - expected_boxes).max() < 1e-4, name
        scores = np.array([d["score"] for d in actual]) - np.array([d["score"] for d in expected])
        assert np.abs(scores).max() < 1e-5, name
        pictures = sorted(p.name for p in (tmp_path / name / "images").iterdir())
        assert pictures == sorted(p.name for p in (tmp_path / "torch" / "images").iterdir())


@pytest.mark.slow
def test_eval_from_exported_files_gives_the_same_metrics(trained, exported, tmp_path):
    def metrics(*model: str, name: str) -> dict:
        overrides = _eval_overrides(Path("unused"), trained["data"], tmp_path / name, tmp_path / "logs")
        overrides = [o for o in overrides if not o.startswith("ckpt_path=")] + list(model)
        return evaluate(compose(overrides, config_name="eval"))

    expected = metrics(f"ckpt_path={trained['ckpt']}", name="torch")
    names = ["gather.onnx"] + (["model.xml"] if HAS_OPENVINO else [])
    for name in names:
        actual = metrics(f"model_file={exported(name)}", name=name)
        for key in ("val/AP", "val/AP50", "val/AP75", "val/AR100"):
            assert actual[key] == pytest.approx(expected[key], abs=1e-6), (name, key)
        assert (tmp_path / name / "metrics.json").is_file() and (tmp_path / name / "results.json").is_file()


# ---------------------------------------------------------------- bad inputs: one line naming the file and the cause
def test_a_file_that_is_not_a_model_is_named(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ExportedModelError, match=r"notes\.onnx is not an ONNX model"):
        ExportedModel(text)
    with pytest.raises(ExportedModelError, match=r"weights\.pt is neither \.onnx nor \.xml"):
        (tmp_path / "weights.pt").write_bytes(b"x")
        ExportedModel(tmp_path / "weights.pt")
    with pytest.raises(ExportedModelError, match=r"no file at .*missing\.onnx"):
        ExportedModel(tmp_path / "missing.onnx")


def test_an_onnx_model_of_another_kind_is_named(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "classifier.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ExportedModelError, match=r"classifier\.onnx has no 'ddetr' metadata"):
        ExportedModel(path)


def test_missing_openvino_extra_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    (tmp_path / "model.xml").write_text("<net/>")
    with pytest.raises(
        ExportedModelError, match=r"model\.xml needs the 'openvino' package: pip install 'ddetr\[openvino\]'"
    ):
        ExportedModel(tmp_path / "model.xml")


def test_checkpoint_and_model_file_together_is_one_error(tmp_path):
    cfg = compose(
        [
            f"ckpt_path={tmp_path}/a.ckpt",
            f"model_file={tmp_path}/a.onnx",
            f"input={tmp_path}",
            f"output={tmp_path}/out",
        ],
        config_name="predict",
    )
    with pytest.raises(ExportedModelError, match="either ckpt_path .* or model_file .*, not both"):
        predict(cfg)
