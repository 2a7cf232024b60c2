"""Export: ONNX (deformable attention as grid_sample) checked with onnxruntime, and torch.export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddetr import ops
from ddetr.app import compose
from ddetr.checkpoints import save_checkpoint
from ddetr.inference.export import ExportableDetector, example_inputs, export
from ddetr.models.ms_deform_attn import set_attention_backend
from ddetr.training.module import DeformableDETRModule
from ddetr.checkpoints import load_module

HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, micro_options) -> Path:
    torch.manual_seed(0)
    module = DeformableDETRModule(num_classes=5, **micro_options(with_box_refine=True))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    save_checkpoint(module, path, "test")
    return path


def export_config(checkpoint: Path, output: Path, *extra: str):
    return compose(
        [
            f"ckpt_path={checkpoint}",
            f"output={output}",
            f"height={HEIGHT}",
            f"width={WIDTH}",
            f"paths.log_dir={output.parent}/logs",
            *extra,
        ],
        config_name="export",
    )


def pytorch_outputs(checkpoint: Path, inputs: tuple[torch.Tensor, ...], backend: str) -> tuple[torch.Tensor, ...]:
    """The reference: the checkpoint's model in PyTorch with the given attention backend."""
    module = load_module(checkpoint)
    set_attention_backend(module.model, backend)
    with torch.no_grad():
        return ExportableDetector(module.model, with_mask=len(inputs) == 2)(*inputs)


def run_onnxruntime(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [arg.name for arg in session.get_inputs()] == ["images", "mask"][: len(inputs)]
    feed = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(array) for array in session.run(["pred_logits", "pred_boxes"], feed)]


# the dynamic ONNX model is traced at 2 x 128 x 160 (smallest level 2x3: torch.export fixes sizes of 1)
# and run at other batch sizes and image sizes: taller than wide, and with a 1-pixel smallest level
DYNAMIC_EXPORT = ["batch_size=2", "height=128", "width=160"]
OTHER_SIZES = [(1, 96, 64), (3, 80, 128)]


# with the mask input; the images-only dynamic export is run the same way by tests/test_backbones.py
# (test_timm_backbone_trains_evaluates_predicts_and_exports), and images-only at a fixed size below
@pytest.mark.slow
@pytest.mark.parametrize("with_mask", [True], ids=["mask"])
def test_onnx_has_dynamic_sizes_and_matches_pytorch_at_other_sizes(tmp_path, checkpoint, with_mask):
    path = tmp_path / "model.onnx"
    summary = export(export_config(checkpoint, path, *DYNAMIC_EXPORT, f"with_mask={with_mask}"))
    assert summary["exporter"] == "dynamo" and path.is_file()
    expected_dims = {"images": ["batch", 3, "height", "width"], "mask": ["batch", "height", "width"]}
    assert summary["input_shapes"] == {name: expected_dims[name] for name in ("images", "mask")[: 1 + with_mask]}
    for batch_size, height, width in OTHER_SIZES:
        inputs = example_inputs(batch_size, height, width, with_mask=with_mask, seed=7)
        if with_mask and batch_size > 1:
            assert inputs[1][1].any() and not inputs[1][0].any(), "the second image is padded"
        onnx_logits, onnx_boxes = run_onnxruntime(path, inputs)
        assert onnx_logits.shape[0] == batch_size
        for backend in ("pytorch", "auto"):  # grid_sample, and the compiled kernel where it is available
            logits, boxes = pytorch_outputs(checkpoint, inputs, backend)
            assert (onnx_logits - logits).abs().max() < 1e-4, (batch_size, height, width, backend)
            assert (onnx_boxes - boxes).abs().max() < 1e-4, (batch_size, height, width, backend)


def test_onnx_torchscript_exporter_images_only(tmp_path, checkpoint):
    path = tmp_path / "model.onnx"
    summary = export(export_config(checkpoint, path, "dynamo=false", "check=false"))
    assert summary["exporter"] == "torchscript"
    assert summary["input_shapes"] == {"images": [1, 3, HEIGHT, WIDTH]}  # the export size, fixed
    inputs = example_inputs(1, HEIGHT, WIDTH, with_mask=False, seed=3)
    for actual, expected in zip(run_onnxruntime(path, inputs), pytorch_outputs(checkpoint, inputs, "pytorch")):
        assert (actual - expected).abs().max() < 1e-4


def exported_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


def test_torch_export_with_the_pytorch_backend(tmp_path, checkpoint):
    path = tmp_path / "model.pt2"
    summary = export(
        export_config(checkpoint, path, "format=torch_export", "attn_backend=pytorch", "with_mask=true", "batch_size=2")
    )
    assert summary["max_abs_diff"] < 1e-5
    program = torch.export.load(str(path))
    assert not any("ddetr" in target for target in exported_ops(program))
    assert any("grid_sampler" in target for target in exported_ops(program))
    inputs = example_inputs(2, HEIGHT, WIDTH, with_mask=True, seed=5)
    for actual, expected in zip(program.module()(*inputs), pytorch_outputs(checkpoint, inputs, "pytorch")):
        assert (actual - expected).abs().max() < 1e-5


@pytest.mark.skipif(not ops.compiled_op_available("cpu"), reason="the compiled op is not available")
def test_torch_export_keeps_the_compiled_op(tmp_path, checkpoint):
    path = tmp_path / "model.pt2"
    export(export_config(checkpoint, path, "format=torch_export", "attn_backend=auto"))
    program = torch.export.load(str(path))
    targets = exported_ops(program)
    assert "ddetr.ms_deform_attn_forward.default" in targets
    assert not any("grid_sampler" in target for target in targets)
    inputs = example_inputs(1, HEIGHT, WIDTH, with_mask=False, seed=5)
    for actual, expected in zip(program.module()(*inputs), pytorch_outputs(checkpoint, inputs, "pytorch")):
        assert (actual - expected).abs().max() < 1e-4


def test_bad_options_are_named(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="format must be one of"):
        export(export_config(checkpoint, tmp_path / "m", "format=tflite"))
    with pytest.raises(ValueError, match="attn_backend=pytorch"):
        export(export_config(checkpoint, tmp_path / "m.onnx", "attn_backend=cpu"))
    with pytest.raises(ValueError, match=r"feature levels of \[\(8, 12\), \(4, 6\), \(2, 3\), \(1, 2\)\]"):
        export(export_config(checkpoint, tmp_path / "small.onnx"))  # 64x96: the smallest level is 1x2
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        export(export_config(tmp_path / "missing.ckpt", tmp_path / "m.onnx"))
