"""Shipping a classifier: `export` (ONNX, int8, verified against PyTorch), one runtime over PyTorch and ONNX
Runtime (`runtime`), and `serve` (HTTP with dynamic batching and limits)."""
