"""Shipping a classifier: `export` (ONNX, int8, verified against PyTorch) and `serve` (HTTP with dynamic batching
and limits), both over the one classifier runtime (classify.runtime)."""
