"""Prediction entry point: ``python -m ddetr.predict ckpt_path=CKPT input=IMAGE_OR_DIR output=DIR``.

Runs a trained (or converted) checkpoint on one image or every image under a folder, in batches, and
writes into ``output``:

- ``images/<name>.png``: every image with its detections (boxes, class names, scores);
- ``detections.json``: the detections in the COCO results format (``image_id``, ``category_id``,
  ``bbox`` [x, y, w, h] in pixels of the file, ``score``), loadable with ``COCO.loadRes``;
- ``images.json``: the COCO ``images`` entries (``id``, ``file_name``, ``width``, ``height``) that
  tie the ids to the files (ids are 1..N in sorted order, or taken from ``annotations=COCO_JSON``);
- with ``attention=true``, ``attention/<name>_<k>.png``: the last decoder layer's sampling locations
  of the ``attention_top_k`` best detections (see ``ddetr.pictures.attention``).

``model_file=MODEL.onnx`` (onnxruntime) or ``model_file=MODEL.xml`` (OpenVINO IR) instead of
``ckpt_path`` runs a model written by ``python -m ddetr.export``, with the same pre- and post-processing
(its resize, normalisation and class names come from the file) and the same outputs.

Images that cannot be read are skipped with a warning each and counted in the final summary.
"""

from ddetr.app import hydra_app
from ddetr.inference.predict import predict
from ddetr.inference.runtime import one_line_errors

main = hydra_app("predict", one_line_errors(predict))

if __name__ == "__main__":
    main()
