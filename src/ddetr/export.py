"""Export entry point: ``python -m ddetr.export ckpt_path=CKPT format=onnx output=FILE [height=.. width=..]``.

- ``format=onnx``: an ONNX model whose deformable attention is decomposed into standard ops (the
  pure-PyTorch backend, ``GridSample`` from opset 16). Inputs ``images`` (batch_size, 3, height,
  width) normalised float32 and, with ``with_mask=true``, ``mask`` (batch_size, height, width) bool,
  True on padding (bottom/right); outputs ``pred_logits`` (batch_size, num_queries, num_classes) and
  ``pred_boxes`` (batch_size, num_queries, 4) normalised (cx, cy, w, h). The input size is fixed.
- ``format=torch_export``: a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``),
  same inputs and outputs. With ``attn_backend=auto`` it calls the compiled op
  ``torch.ops.ddetr.ms_deform_attn_forward`` when that is available, so ``import ddetr.ops`` and
  ``ddetr.ops.compiled_op_available(...)`` must run before ``torch.export.load``.

With ``check=true`` (the default) the exported model runs on a random batch and its outputs are
compared with PyTorch's; the largest absolute difference is printed.
"""

from ddetr.app import hydra_app
from ddetr.inference.export import export
from ddetr.inference.runtime import one_line_errors

main = hydra_app("export", one_line_errors(export))

if __name__ == "__main__":
    main()
