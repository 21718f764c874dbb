"""Label Studio's ML backend door: our detections as predictions on a project's BrushLabels, PolygonLabels or
RectangleLabels, for pre-annotation (routes.py; the config read by config.py, the task images by images.py, the
regions written by regions.py)."""
