"""Pydantic models of /segment's and /v1/model's responses, for the OpenAPI schema (the options:
service/core/options.py)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ImageInfo(BaseModel):
    width: int
    height: int


class ModelRef(BaseModel):
    name: str
    version: str


class RLE(BaseModel):
    """COCO compressed RLE, readable by ``pycocotools.mask.decode``."""

    size: list[int] = Field(description="[height, width] of the image")
    counts: str


class Detection(BaseModel):
    label: str
    class_id: int
    score: float
    box: list[float] = Field(description="x1, y1, x2, y2 in the original image's pixels")
    area: int = Field(description="Mask pixels")
    mask: RLE | None = Field(None, description="Present when formats include rle")
    polygons: list[list[float]] | None = Field(
        None,
        description="Outer contours (holes dropped) as COCO polygons x1, y1, x2, y2, ... in pixel "
        "coordinates (pixel centres at +0.5), one per connected part, at least 3 points each (a lone "
        "pixel or thin line repeats its last point); present when formats include polygons",
    )


class Timings(BaseModel):
    decode_ms: float
    queue_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float


class SegmentResponse(BaseModel):
    image: ImageInfo
    model: ModelRef
    batch_size: int = Field(description="Images in the ONNX Runtime call that served this request (tiled: the "
                            "largest of its calls)")
    tiles: int | None = Field(None, description="Images a tiled request sent to the model: its tiles, and the "
                              "whole image when asked (absent when the image was run whole)")
    detections: list[Detection]
    timings: Timings


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = Field(None, description="The request's X-Request-ID, to quote when asking about it")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelResponse(BaseModel):
    name: str
    version: str
    architecture: str
    classes: list[str] = Field(description="Class names without the background, in class_id order from 1")
    mask_size: int
    min_size: int
    max_size: int
    size_divisibility: int
    detections_per_image: int
    providers: list[str]
    max_batch_size: int
