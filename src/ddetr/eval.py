"""Evaluation entry point: ``python -m ddetr.eval ckpt_path=CKPT [data=coco data.data_dir=DIR]``.

Runs Lightning's ``trainer.validate`` with the checkpoint's module on the data module's val split,
prints the COCO metrics table and writes into the run directory ``results.json`` (the detections in
the COCO results format, ``CocoEvaluator.results_json()``) and ``metrics.json``.
``model_file=MODEL.onnx|MODEL.xml`` instead of ``ckpt_path`` evaluates a model written by
``python -m ddetr.export`` the same way (``ddetr.inference.evaluate``).
"""

from ddetr.app import hydra_app
from ddetr.inference.runtime import one_line_errors
from ddetr.training.run import evaluate


def run(cfg) -> float | None:
    return evaluate(cfg).get("val/AP")


main = hydra_app("eval", one_line_errors(run))

if __name__ == "__main__":
    main()
