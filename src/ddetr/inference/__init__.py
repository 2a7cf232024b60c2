"""Inference: batch prediction on image files and export (ONNX, torch.export)."""
