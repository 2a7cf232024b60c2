"""The library side of ``python -m ddetr.export`` (see ``ddetr/export.py`` for what it writes)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ddetr.inference.metadata import KEY, ModelMetadata, metadata_of_module
from ddetr.models.ms_deform_attn import set_attention_backend

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "torch_export")
# the attention of ONNX and OpenVINO exports unless attn_backend says otherwise (docs/deploy.md): GridSample ran
# faster than the gather graph in onnxruntime on the CPU (small model 93 against 126 ms, R50 5.41 against 5.85 s); the gather graph is
# OpenVINO's (the one measured there) and the one to give TensorRT (attn_backend=gather)
DEFAULT_BACKENDS = {"onnx": "pytorch", "openvino": "gather"}
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


class ExportableDetector(nn.Module):
    """``DeformableDETR`` with tensor inputs and a tuple output, as exporters want.

    Args:
        model: a ``DeformableDETR`` (put in eval mode, with the wrapper).
        with_mask: ``forward(images, mask)``; without it ``forward(images)`` assumes no padding.
    """

    def __init__(self, model: nn.Module, with_mask: bool = False) -> None:
        super().__init__()
        self.model = model
        self.with_mask = with_mask
        self.eval()  # the wrapper too: exporters restore the wrapper's mode, recursively

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (batch_size, 3, height, width); mask: (batch_size, height, width) bool, True on padding.

        Returns:
            pred_logits (batch_size, num_queries, num_classes), pred_boxes (batch_size, num_queries, 4).
        """
        if mask is None:
            batch_size, _, height, width = images.shape
            mask = torch.zeros((batch_size, height, width), dtype=torch.bool, device=images.device)
        outputs = self.model((images, mask))
        return outputs["pred_logits"], outputs["pred_boxes"]


def example_inputs(
    batch_size: int, height: int, width: int, with_mask: bool, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """A random normalised batch; with a mask, every image after the first is padded at the bottom/right."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((batch_size, 3, height, width), generator=generator)
    if not with_mask:
        return (images,)
    mask = torch.zeros((batch_size, height, width), dtype=torch.bool)
    for index in range(1, batch_size):
        valid_height, valid_width = max(1, height - 8 * index), max(1, width - 16 * index)
        mask[index, valid_height:, :] = True
        mask[index, :, valid_width:] = True
        images[index, :, valid_height:, :] = 0
        images[index, :, :, valid_width:] = 0
    return images, mask


def dynamic_shapes(num_inputs: int) -> dict[str, dict[int, Any]]:
    """Batch, height and width of ``images`` (and the same of ``mask``) as named dynamic dimensions for
    ``torch.export``; they become the input dimensions ``batch``, ``height`` and ``width`` of the ONNX model."""
    batch, height, width = (torch.export.Dim(name) for name in ("batch", "height", "width"))
    dims = {"images": {0: batch, 2: height, 3: width}}
    if num_inputs == 2:
        dims["mask"] = {0: batch, 1: height, 2: width}
    return dims


def onnx_input_shapes(path: str | os.PathLike) -> dict[str, list[int | str]]:
    """The inputs of the ONNX model at ``path``: name -> dims (an int where fixed, a name where dynamic)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {arg.name: arg.type.tensor_type.shape.dim for arg in model.graph.input}
    return {name: [dim.dim_param or dim.dim_value for dim in shape] for name, shape in dims.items()}


def export_onnx(
    detector: ExportableDetector,
    inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    opset: int = 18,
    dynamo: bool = True,
    dynamic: bool = True,
) -> str:
    """Writes ``detector`` as ONNX; returns which exporter wrote it ("dynamo" or "torchscript").

    The dynamo (``torch.export``-based) exporter is tried first when ``dynamo``; with ``dynamic`` the
    batch size, height and width of the inputs are dynamic dimensions of the model (``inputs`` only
    give example values), so onnxruntime runs it at any image size. If it fails, the TorchScript
    exporter is used, with a warning naming the error; its model has the fixed size of ``inputs``.
    """
    if opset < 16:
        raise ValueError(f"opset must be >= 16 (GridSample), got {opset}")
    input_names = ["images", "mask"][: len(inputs)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if dynamo:
        try:
            with warnings.catch_warnings():  # images and mask share their named dims: torch says so per axis
                warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
                program = torch.onnx.export(
                    detector,
                    inputs,
                    input_names=input_names,
                    output_names=list(OUTPUT_NAMES),
                    opset_version=opset,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                    dynamic_shapes=dynamic_shapes(len(inputs)) if dynamic else None,
                )
                program.save(str(path))
            return "dynamo"
        except Exception as error:  # noqa: BLE001 - any exporter failure falls back to TorchScript
            log.warning(
                "the dynamo ONNX exporter failed (%s: %s); using the TorchScript exporter, whose model "
                "takes only the export size",
                type(error).__name__,
                error,
            )
    torch.onnx.export(
        detector,
        inputs,
        str(path),
        input_names=input_names,
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        dynamo=False,
    )
    return "torchscript"


def run_onnx(path: str | os.PathLike, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Runs the ONNX model at ``path`` with onnxruntime (CPU) on ``inputs``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(array) for array in session.run(list(OUTPUT_NAMES), feed)]


def export_program(
    detector: ExportableDetector, inputs: tuple[torch.Tensor, ...], path: str | os.PathLike | None = None
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``detector`` (saved to ``path`` when given).

    Strict (dynamo) tracing, so that the feature-map sizes become constants of the program (see
    ``ddetr.ops.reference.spatial_shapes_list``); the input size is fixed.
    """
    program = torch.export.export(detector, inputs, strict=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
    return program


def check_dynamic_example(detector: ExportableDetector, inputs: tuple[torch.Tensor, ...]) -> None:
    """Raises unless every feature level of ``inputs`` is at least 2x2: torch.export fixes every size
    whose example value is 1, so a 1-pixel level would leave a fixed size inside a dynamic model."""
    images = inputs[0]
    mask = inputs[1] if len(inputs) == 2 else torch.zeros(images.shape[:1] + images.shape[2:], dtype=torch.bool)
    with torch.no_grad():
        srcs, _ = detector.model.feature_levels(images, mask)
    sizes = [tuple(src.shape[-2:]) for src in srcs]
    if min(min(size) for size in sizes) < 2:
        height, width = images.shape[-2:]
        raise ValueError(
            f"ONNX export with dynamic sizes: an example image of {height}x{width} gives feature levels of "
            f"{sizes}; torch.export fixes every size whose example value is 1, so the model would only run at "
            "this size: export with a larger height/width (the default 800x1333 works), or dynamic=false for a "
            "fixed-size model"
        )


def max_abs_difference(expected: tuple[torch.Tensor, ...], actual: list[torch.Tensor]) -> float:
    """The largest absolute difference over all outputs."""
    return max(float((e.detach() - a.detach()).abs().max()) for e, a in zip(expected, actual, strict=True))


def onnx_backend(name: str | None, format: str = "onnx") -> str:
    """The attention backend of an ONNX/OpenVINO export: ``gather`` (no ``GridSample``) or ``pytorch``
    (``grid_sample``; ``attn_backend=grid_sample`` names it too); None: ``DEFAULT_BACKENDS[format]``."""
    backend = {None: DEFAULT_BACKENDS[format], "grid_sample": "pytorch"}.get(name, name)
    if backend not in ("gather", "pytorch"):
        raise ValueError(
            f"ONNX/OpenVINO export needs attn_backend=gather (no GridSample) or attn_backend=pytorch "
            f"(GridSample, also named grid_sample), got {name!r}"
        )
    return backend


def write_onnx_metadata(path: str | os.PathLike, metadata: ModelMetadata) -> None:
    """Stores ``metadata`` as the ``ddetr`` entry of the ONNX file's ``metadata_props``."""
    import onnx

    model = onnx.load(str(path))
    model.metadata_props.add(key=KEY, value=metadata.to_json())
    onnx.save(model, str(path))


def export_metadata(cfg: DictConfig, module, backend: str) -> ModelMetadata:
    """The pre- and post-processing settings the exported file carries (``ddetr.inference.metadata``):
    the resize as ``python -m ddetr.predict`` resolves it (``size``/``max_size``, else the training
    run's, else the official), the class names (``class_names``), ImageNet's normalisation."""
    from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ddetr.inference.predict import resolve_class_names, resolve_resize

    size, max_size, _ = resolve_resize(cfg.get("size"), cfg.get("max_size"), cfg.ckpt_path)
    return metadata_of_module(
        module,
        size,
        max_size,
        IMAGENET_MEAN,
        IMAGENET_STD,
        resolve_class_names(module, cfg.get("class_names", "auto")),
        with_mask=bool(cfg.with_mask),
        attn_backend=backend,
        quantize=cfg.get("quantize"),
        source=str(cfg.ckpt_path),
    )


def calibration_inputs(cfg: DictConfig, metadata: ModelMetadata) -> list[dict[str, Any]]:
    """``cfg.calibration_images`` inputs from the train split of ``cfg.data`` (see ``ddetr.inference.quantize``)."""
    from hydra.utils import instantiate

    from ddetr.inference.quantize import calibration_batches, train_split_files

    count = int(cfg.calibration_images)
    if count < 1:
        raise ValueError(f"calibration_images must be >= 1, got {count}")
    datamodule = instantiate(cfg.data)
    files = train_split_files(datamodule)
    log.info("calibrating on %d of the %d train-split images of %s", count, len(files), cfg.data._target_)
    return calibration_batches(
        files, count, metadata.size, metadata.max_size, metadata.mean, metadata.std, metadata.with_mask
    )


def write_onnx_model(
    cfg: DictConfig, detector: ExportableDetector, inputs: tuple[torch.Tensor, ...], path: Path, metadata: ModelMetadata
) -> str:
    """The ONNX file at ``path`` with its metadata, int8 when ``cfg.quantize``; returns the exporter's name."""
    from ddetr.inference.quantize import quantize_onnx

    dynamic_onnx = cfg.dynamo and cfg.dynamic
    if dynamic_onnx:
        check_dynamic_example(detector, inputs)
    float_path = path.with_name(path.stem + ".fp32.onnx") if cfg.get("quantize") else path
    exporter = export_onnx(detector, inputs, float_path, opset=cfg.opset, dynamo=cfg.dynamo, dynamic=cfg.dynamic)
    write_onnx_metadata(float_path, metadata)
    if cfg.get("quantize"):
        quantize_onnx(float_path, path, calibration_inputs(cfg, metadata))
        float_path.unlink()
    return exporter


def write_openvino_model(
    cfg: DictConfig, detector: ExportableDetector, inputs: tuple[torch.Tensor, ...], path: Path, metadata: ModelMetadata
) -> str:
    """The OpenVINO IR (``path`` .xml and its .bin), converted from a dynamic ONNX export, with the
    metadata as ``rt_info``; float32 weights (no fp16 compression), int8 through NNCF when ``cfg.quantize``."""
    try:
        import openvino
    except ImportError:
        raise ValueError(
            f"format=openvino (output {path}) needs the 'openvino' package: pip install 'ddetr[openvino]'"
        ) from None
    import tempfile

    from ddetr.inference.quantize import quantize_openvino

    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "model.onnx"
        check_dynamic_example(detector, inputs)
        exporter = export_onnx(detector, inputs, onnx_path, opset=cfg.opset, dynamo=True, dynamic=True)
        model = openvino.convert_model(str(onnx_path))
    if cfg.get("quantize"):
        model = quantize_openvino(model, calibration_inputs(cfg, metadata))
    model.set_rt_info(metadata.to_json(), KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    openvino.save_model(model, str(path), compress_to_fp16=False)
    return f"{exporter} ONNX, OpenVINO {openvino.get_version().split('-')[0]}"


def run_exported(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Runs the exported file at ``path`` (``ddetr.inference.runtime``) on the example ``inputs``."""
    from ddetr.inference.runtime import ExportedModel

    images = inputs[0]
    mask = inputs[1] if len(inputs) == 2 else torch.zeros(images.shape[:1] + images.shape[2:], dtype=torch.bool)
    outputs = ExportedModel(path)((images, mask))
    return [outputs[name] for name in OUTPUT_NAMES]


def export(cfg: DictConfig) -> dict[str, Any]:
    """Exports as ``cfg`` says; returns ``{"path", "format", "exporter", "max_abs_diff"}`` and, for ONNX,
    ``"input_shapes"`` (input name -> dims, a name where the dimension is dynamic)."""
    from ddetr.checkpoints import load_module, trust_checkpoint

    if cfg.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {cfg.format!r}")
    quantize = cfg.get("quantize")
    if quantize not in (None, "int8") or (quantize and cfg.format == "torch_export"):
        raise ValueError(f"quantize must be null or int8 (format onnx or openvino), got {quantize!r} for {cfg.format}")
    if cfg.format == "torch_export":
        backend = cfg.get("attn_backend") or "auto"
    else:
        backend = onnx_backend(cfg.get("attn_backend"), cfg.format)
    module = load_module(cfg.ckpt_path, "cpu", trust=trust_checkpoint(cfg))
    set_attention_backend(module.model, backend)
    detector = ExportableDetector(module.model, with_mask=cfg.with_mask)
    dynamic_onnx = cfg.format == "openvino" or (cfg.format == "onnx" and cfg.dynamo and cfg.dynamic)
    # torch.export fixes every dimension whose example value is 1: trace a dynamic batch with 2 images
    batch_size = max(cfg.batch_size, 2) if dynamic_onnx else cfg.batch_size
    inputs = example_inputs(batch_size, cfg.height, cfg.width, cfg.with_mask)
    path = Path(cfg.output)
    summary: dict[str, Any] = {"path": str(path), "format": cfg.format, "max_abs_diff": None}
    if cfg.format in ("onnx", "openvino"):
        metadata = export_metadata(cfg, module, backend)
        write = write_onnx_model if cfg.format == "onnx" else write_openvino_model
        summary["exporter"] = write(cfg, detector, inputs, path, metadata)
        if cfg.format == "onnx":
            summary["input_shapes"] = onnx_input_shapes(path)
        dynamic = dynamic_onnx and "torchscript" not in summary["exporter"]
        if cfg.check:  # at the export size and, when dynamic, at another batch size and image size
            checks = [inputs]
            if dynamic:
                other_size = (cfg.height + 32, max(cfg.width - 32, 64))
                checks.append(example_inputs(batch_size + 1, *other_size, cfg.with_mask, seed=1))
            with torch.no_grad():
                summary["max_abs_diff"] = max(max_abs_difference(detector(*x), run_exported(path, x)) for x in checks)
    else:
        program = export_program(detector, inputs, path)
        summary["exporter"] = "torch.export"
        if cfg.check:
            with torch.no_grad():
                summary["max_abs_diff"] = max_abs_difference(detector(*inputs), list(program.module()(*inputs)))
    if "input_shapes" in summary:
        inputs_text = ", ".join(
            f"{name} ({', '.join(map(str, dims))})" for name, dims in summary["input_shapes"].items()
        )
    else:
        inputs_text = "images, mask" if cfg.with_mask else "images"
        inputs_text += (
            " (batch, 3, height, width)" if dynamic_onnx else f" of {cfg.batch_size}x3x{cfg.height}x{cfg.width}"
        )
    quantized = ", int8" if quantize else ""
    print(
        f"wrote {path} ({cfg.format} via {summary['exporter']}{quantized}, inputs {inputs_text}, "
        f"attention backend {backend})"
    )
    if summary["max_abs_diff"] is not None:
        print(f"max abs difference to PyTorch on a random batch: {summary['max_abs_diff']:.3g}")
    return summary
