"""Torch-free inference service: ONNX Runtime, dynamic batching, FastAPI."""
