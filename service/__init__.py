"""Torch-free inference service: ONNX Runtime, dynamic batching, FastAPI.

core/ (the inference core, no web framework) · segment/, oip/, page/ (the front doors, each saying the
core's errors in its own protocol) · web/ (what the HTTP doors share) · app.py (the assembly) · overlay.py
and client.py (the picture and the Python client). service/README.md has the tree and what imports what.
"""
