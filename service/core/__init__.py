"""The inference core: what every front door shares, and no protocol.

runtime (the ONNX graph in an ONNX Runtime session) · batcher (dynamic batching) · pipeline (admission,
deadline, decode -> batch -> post-process, lifecycle) · postprocess (masks to RLE and polygons) · images
(decoding under the limits) · options (a request's options, declared once) · errors (what went wrong, by
meaning) · metrics (Prometheus families) · settings (``MRCNN_*``). Nothing here imports a web framework:
the doors (service/segment, service/oip, service/page) turn requests into calls on the pipeline and its
errors into their protocol's answers.
"""
