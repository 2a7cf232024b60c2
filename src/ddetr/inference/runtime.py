"""An exported detector (ONNX in onnxruntime, OpenVINO IR in OpenVINO's CPU runtime) behind one call.

``load_exported(path)`` reads the file and its ``ddetr`` metadata (``ddetr.inference.metadata``);
the returned model is called like ``DeformableDETR`` on a padded batch: ``model((images, mask))``
returns ``{"pred_logits", "pred_boxes"}``. Every bad input (no such file, not a model, a model not
written by ``python -m ddetr.export``, a missing runtime) raises ``ExportedModelError`` with one
line naming the file and the cause.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddetr.inference.metadata import KEY, ModelMetadata

OUTPUT_NAMES = ("pred_logits", "pred_boxes")
SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}


class ExportedModelError(ValueError):
    """An exported model that cannot be used; the message is one line naming the file and the cause."""


def missing_extra(package: str, extra: str, what: str) -> ExportedModelError:
    """The one-line error for a runtime that is not installed."""
    return ExportedModelError(f"{what} needs the '{package}' package: pip install 'ddetr[{extra}]'")


class ExportedModel:
    """A loaded exported detector; ``metadata`` holds its pre- and post-processing settings.

    Args:
        path: the ``.onnx`` or ``.xml`` (OpenVINO IR, its ``.bin`` beside it) file.
        threads: CPU threads of the runtime (None: the runtime's default).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportedModelError(f"model_file: no file at {self.path}")
        self.format = SUFFIXES.get(self.path.suffix.lower())
        if self.format is None:
            raise ExportedModelError(
                f"model_file: {self.path} is neither .onnx nor .xml (OpenVINO IR); export one with python -m ddetr.export"
            )
        if self.format == "onnx":
            self._run, text = _load_onnx(self.path, threads)
        else:
            self._run, text = _load_openvino(self.path, threads)
        if text is None:
            raise ExportedModelError(
                f"model_file: {self.path} has no '{KEY}' metadata: not a detector written by python -m ddetr.export"
            )
        try:
            self.metadata = ModelMetadata.from_json(text, str(self.path))
        except ValueError as error:
            raise ExportedModelError(f"model_file: {error}") from None

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Runs on ``(images (batch_size, 3, height, width) float32, mask (batch_size, height, width)
        bool)``. A model without the mask input takes one unpadded image at a time (each is cropped
        to its extent and run alone).

        Returns:
            ``pred_logits`` (batch_size, num_queries, num_classes), ``pred_boxes`` (batch_size, num_queries, 4).
        """
        images, mask = batch
        images = images.detach().to("cpu", torch.float32)
        mask = mask.detach().to("cpu")
        if self.metadata.with_mask:
            outputs = self._run({"images": images.numpy(), "mask": mask.numpy()})
        else:
            from ddetr.image_list import valid_extent

            heights, widths = valid_extent(mask)
            parts = [
                self._run({"images": images[i : i + 1, :, : int(h), : int(w)].contiguous().numpy()})
                for i, (h, w) in enumerate(zip(heights, widths))
            ]
            outputs = [np.concatenate([part[k] for part in parts]) for k in range(len(OUTPUT_NAMES))]
        return {name: torch.from_numpy(np.asarray(array)) for name, array in zip(OUTPUT_NAMES, outputs)}


def _load_onnx(path: Path, threads: int | None):
    """An onnxruntime CPU session's run function and the file's ``ddetr`` metadata (None without)."""
    try:
        import onnxruntime
    except ImportError:
        raise missing_extra("onnxruntime", "onnx", f"model_file {path}") from None
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own classes for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportedModelError(f"model_file: {path} is not an ONNX model onnxruntime can load ({reason})") from None
    names = [arg.name for arg in session.get_inputs()]
    outputs = [arg.name for arg in session.get_outputs()]
    text = session.get_modelmeta().custom_metadata_map.get(KEY)
    if text is not None and (names[:1] != ["images"] or outputs != list(OUTPUT_NAMES)):
        raise ExportedModelError(f"model_file: {path} has inputs {names} and outputs {outputs}, not ddetr's")

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(list(OUTPUT_NAMES), {name: feed[name] for name in names})

    return run, text


def _load_openvino(path: Path, threads: int | None):
    """An OpenVINO CPU compiled model's run function (float32 inference precision: CPUs with bf16
    would otherwise default to it) and the file's ``ddetr`` rt_info (None without)."""
    try:
        import openvino
    except ImportError:
        raise missing_extra("openvino", "openvino", f"model_file {path}") from None
    core = openvino.Core()
    try:
        model = core.read_model(str(path))
    except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportedModelError(f"model_file: {path} is not an OpenVINO IR OpenVINO can read ({reason})") from None
    text = model.get_rt_info()[KEY].astype(str) if model.has_rt_info(KEY) else None
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    names = [port.get_any_name() for port in compiled.inputs]

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = request.infer({name: feed[name] for name in names})
        return [np.array(results[compiled.output(name)]) for name in OUTPUT_NAMES]

    return run, text


def one_line_errors(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``run`` with an ``ExportedModelError`` (or the ``ValueError`` of a refused option combination)
    turned into one line, ``error: ...``, and exit status 1, as the entry points do for checkpoints."""

    @functools.wraps(run)
    def wrapped(cfg: Any) -> Any:
        try:
            return run(cfg)
        except ExportedModelError as error:
            raise SystemExit(f"error: {error}") from None

    return wrapped
