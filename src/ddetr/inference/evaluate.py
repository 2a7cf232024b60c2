"""``python -m ddetr.eval model_file=MODEL.onnx|MODEL.xml``: the COCO metrics of an exported model.

The val split of ``cfg.data`` is read, batched and normalised exactly as ``python -m ddetr.eval
ckpt_path=...`` reads it (the data module's val loader), the batches run in onnxruntime or OpenVINO
(``ddetr.inference.runtime``), and the same post-processing, evaluator and tables follow; so the
deployed file's AP is checked before it ships. There is no validation loss (the file has no criterion).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from ddetr.inference.runtime import ExportedModel, ExportedModelError
from ddetr.models.postprocess import PostProcess

log = logging.getLogger(__name__)


def evaluate_exported(cfg: DictConfig) -> dict[str, float | None]:
    """Evaluates ``cfg.model_file`` on the val split of ``cfg.data``; returns the COCO metrics
    (``val/AP`` ...) and writes ``cfg.results_file`` and ``cfg.metrics_file`` into the run directory."""
    from ddetr.training.evaluation import CocoEvaluator
    from ddetr.training.evaluation_pictures import write_evaluation_pictures
    from ddetr.training.run import report_metrics

    model_file, ckpt_path = cfg.get("model_file"), cfg.get("ckpt_path")
    if model_file is not None and ckpt_path is not None:
        raise ExportedModelError(f"give either ckpt_path ({ckpt_path}) or model_file ({model_file}), not both")
    if model_file is None:
        raise ExportedModelError("give ckpt_path=CHECKPOINT or model_file=MODEL.onnx|MODEL.xml")
    model = ExportedModel(model_file, threads=cfg.get("threads"))
    datamodule = instantiate(cfg.data)
    if len(model.metadata.class_names) != datamodule.num_classes:
        raise ExportedModelError(
            f"model_file: {model_file} has {len(model.metadata.class_names)} classes but the data has "
            f"{datamodule.num_classes} (category_mapping={datamodule.category_mapping!r})"
        )
    if model.metadata.label_to_category_id != list(datamodule.label_to_category_id):
        log.warning("%s: the model's category ids differ from the data's; evaluating with the data's", model_file)
    evaluator = CocoEvaluator(datamodule.val_coco, datamodule.label_to_category_id)
    postprocess = PostProcess(num_select=model.metadata.num_select)
    loader = datamodule.val_dataloader()
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not cfg.get("progress_bar", True)):
        images, mask, targets = datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer(batch, 0), 0)
        outputs = model((images, mask))
        orig_sizes = torch.stack([target["orig_size"] for target in targets])  # (B, 2) as (h, w)
        detections = postprocess(outputs, orig_sizes)
        evaluator.update({int(t["image_id"]): d for t, d in zip(targets, detections)})
    found = evaluator.compute()
    metrics = {f"val/{name}": value for name, value in found.items()}
    output = Path(cfg.paths.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if cfg.get("results_file"):
        (output / cfg.results_file).write_text(json.dumps(evaluator.results_json()))
    path = output / cfg.metrics_file if cfg.get("metrics_file") else None
    pictures = write_evaluation_pictures(evaluator, output, cfg.get("confusion_threshold"))
    report_metrics(
        metrics, evaluator, path, f"COCO metrics of {model_file}", {"model_file": str(model_file), **pictures}
    )
    return metrics
