"""int8 post-training quantization of an exported detector, calibrated on training images.

- ONNX: onnxruntime's static quantization (QDQ, int8 weights per channel, uint8 activations) of
  the convolutions and matrix products; the sampling arithmetic, softmax and norms stay float32.
- OpenVINO: NNCF's post-training quantization (``nncf.quantize``, ``ModelType.TRANSFORMER``).

The calibration images are the first ``N`` of the data module's **train** split, resized and
normalised as for evaluation, so the split the model is scored on never calibrates it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ddetr.inference.runtime import missing_extra

log = logging.getLogger(__name__)

# what onnxruntime quantizes: the layers that hold the weights and nearly all of the arithmetic
ONNX_QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


def train_split_files(datamodule) -> list[Path]:
    """The image files of ``datamodule``'s train split, in the order of its records."""
    dataset = datamodule.train_dataset
    return [Path(dataset.image_dir) / dataset.records.file_name(i) for i in range(len(dataset.records))]


def calibration_batches(
    files: Sequence[Path],
    count: int,
    size: int,
    max_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    with_mask: bool,
) -> list[dict[str, np.ndarray]]:
    """The inputs of ``count`` calibration images (the first ``count`` of ``files`` that can be read), one
    image per batch: ``images`` (1, 3, height, width) float32 and, ``with_mask``, ``mask`` (1, height, width).

    Raises ``ValueError`` when fewer than ``count`` images are readable."""
    from ddetr.data.image_loading import ImageLoadError, load_rgb_image
    from ddetr.data.transforms import make_val_transforms

    transform = make_val_transforms(size=size, max_size=max_size, mean=mean, std=std)
    batches, unreadable = [], 0
    for file in files:
        if len(batches) == count:
            break
        try:
            pixels = load_rgb_image(file)
        except ImageLoadError as error:
            unreadable += 1
            log.warning("calibration: skipping %s: %s", file, error.reason)
            continue
        image, _, _ = transform(pixels, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), seed=0)
        feed = {"images": image[None].numpy().astype(np.float32)}
        if with_mask:
            feed["mask"] = np.zeros((1, *image.shape[1:]), dtype=bool)
        batches.append(feed)
    if len(batches) < count:
        raise ValueError(
            f"calibration_images={count}, but the train split has {len(batches)} readable image(s) "
            f"({unreadable} unreadable)"
        )
    if unreadable:
        log.warning("calibration: %d unreadable train image(s) skipped", unreadable)
    return batches


def quantize_onnx(source: str | os.PathLike, target: str | os.PathLike, batches: list[dict[str, np.ndarray]]) -> None:
    """onnxruntime static int8 quantization of the ONNX model ``source`` into ``target`` (its
    ``metadata_props`` are kept)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items: Iterator[dict[str, np.ndarray]] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(ONNX_QUANTIZED_OPS),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    metadata = {entry.key: entry.value for entry in onnx.load(str(source), load_external_data=False).metadata_props}
    model = onnx.load(str(target))
    present = {entry.key for entry in model.metadata_props}
    for key, value in metadata.items():
        if key not in present:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(target))


def quantize_openvino(model, batches: list[dict[str, np.ndarray]]):
    """NNCF post-training int8 quantization of the OpenVINO ``model`` (an ``openvino.Model``); returns
    the quantized model."""
    try:
        import nncf
    except ImportError:
        raise missing_extra("nncf", "openvino", "quantize=int8 with format=openvino") from None
    dataset = nncf.Dataset(batches)
    return nncf.quantize(model, dataset, subset_size=len(batches), model_type=nncf.ModelType.TRANSFORMER)
