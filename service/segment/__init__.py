"""The /segment front door: one image per request (multipart, JSON with base64, or a raw image body), its
detections as JSON with COCO RLE masks and polygons; errors as ``{"error": {"code", "message"}}``."""
