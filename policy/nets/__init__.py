"""Denoisers and observation encoders (plain torch, ONNX-exportable)."""
