"""Segment a whole data set: ``python -m bulk SOURCE --out DIR`` runs the served model over a folder, a glob
or a list file of images (local paths, or any filesystem pyarrow reaches: ``s3://``, ``gs://``, ...) and
writes COCO results JSON, resumably.

Local by default (one process, ONNX Runtime, the server's own decode -> resize -> run -> paste -> RLE
function, service/core/segmentation.py); on a Ray cluster with ``--ray auto|ADDRESS`` (Ray Data, an actor
pool of ONNX Runtime sessions). Both write the same per-shard JSON Lines (sources.py names the images,
records.py the files), so a rerun of either does only what is missing. No torch, no web framework.
"""
