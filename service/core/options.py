"""The options of a segmentation request, declared once.

``SegmentOptions`` is what a client may send: FastAPI reads it from the query string; the multipart
form fields, a JSON body's members and the Open Inference Protocol's request parameters are validated
by the same model (they win over the query); the OpenAPI schema of all of them comes from it.
``resolve`` then fills in the server's defaults and checks the options against the model being served,
giving the ``Resolved`` options the pipeline works with.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator

from contract import GraphMetadata
from service.core.errors import InvalidOption
from service.core.tiling import DEFAULT_OVERLAP, MAX_OVERLAP, SPEC_HELP, Tiling, parse_tiles

Format = Literal["rle", "polygons"]
FORMATS: tuple[Format, ...] = typing.get_args(Format)
# The priority of a request that names none (or 0, Triton's "the default"): the highest, so that a priority
# can only let a request yield to others (a bulk job to interactive traffic), never push ahead of them.
DEFAULT_PRIORITY = 1


class SegmentOptions(BaseModel):
    """Options of one request; every field may be left out."""

    score_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop detections scoring at or below it (default: the server's)"
    )
    max_detections: int | None = Field(
        None, ge=1, description="Keep at most this many, best first (at most the model's detections_per_image)"
    )
    classes: list[str] | None = Field(None, description="Class names to keep, comma-separated or repeated")
    formats: list[Format] | None = Field(
        None, min_length=1, description="Mask encodings: rle, polygons, or both (the default)"
    )
    tiles: str | None = Field(
        None, description=f"Sliced inference for large images (docs/tiling.md): {SPEC_HELP}; default none"
    )
    tile_overlap: float | None = Field(
        None, ge=0.0, lt=MAX_OVERLAP, description=f"Share of a tile its neighbour sees too (default {DEFAULT_OVERLAP})"
    )
    tile_full_image: bool | None = Field(
        None, description="With tiles, also run the whole image at the model's size, so large objects are not "
        "only seen in pieces (default false)"
    )
    timeout_ms: float | None = Field(
        None, gt=0, description="Answer 504 rather than later than this after arrival, without running the model "
        "if it has not started (the server's deadline stays the cap)"
    )
    priority: int | None = Field(
        None, ge=0, description=f"Served before waiting requests of a larger number; 1 is the highest and "
        f"the default ({DEFAULT_PRIORITY}; 0 means the default)"
    )

    @field_validator("classes", "formats", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """``classes=a,b`` and ``classes=a&classes=b`` mean the same."""
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return [part.strip() for item in items for part in item.split(",") if part.strip()]
        return value

    @field_validator("tiles")
    @classmethod
    def _check_tiles(cls, value: str | None) -> str | None:
        """A ``tiles`` value that ``parse_tiles`` reads, lower-cased."""
        if value is not None:
            parse_tiles(value)
            return value.strip().lower()
        return value

    @classmethod
    def validated(cls, values: dict[str, object]) -> SegmentOptions:
        """Validate ``values``; the first problem is an InvalidOption naming it."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidOption("invalid_option", f"{where}: {first['msg']}") from None

    def with_form(self, fields: Mapping[str, Sequence[str]]) -> SegmentOptions:
        """These options overridden by the multipart form's fields of the same names (each name's values in
        order; a single-valued option takes the last, as a form read into a dict would)."""
        given: dict[str, object] = {}
        for name, info in type(self).model_fields.items():
            if fields.get(name):
                is_list = list in (typing.get_origin(a) for a in typing.get_args(info.annotation))
                given[name] = list(fields[name]) if is_list else fields[name][-1]
        return self.overridden(given)

    def overridden(self, given: Mapping[str, object]) -> SegmentOptions:
        """These options overridden by ``given`` (a JSON body's members, a form's fields); other names
        in ``given`` are not options and are left alone."""
        options = {name: value for name, value in given.items() if name in type(self).model_fields}
        return self.validated({**self.model_dump(exclude_unset=True), **options})


@dataclass(frozen=True)
class Resolved:
    """Options with the server's defaults filled in and the class names turned into labels."""

    score_threshold: float
    max_detections: int | None
    labels: np.ndarray | None  # int64 labels to keep, or None for all
    rle: bool
    polygons: bool
    tiling: Tiling | None = None  # None: the image is run whole
    timeout_s: float | None = None  # the request's own, from its arrival
    priority: int = DEFAULT_PRIORITY


def resolve(options: SegmentOptions, default_threshold: float, info: GraphMetadata) -> Resolved:
    """Defaults and the checks that need the model: InvalidOption on a limit above the model's or an unknown class."""
    limit = info.detections_per_image
    if options.max_detections is not None and options.max_detections > limit:
        raise InvalidOption("invalid_option", f"max_detections: at most {limit} for this model")
    labels = None
    if options.classes is not None:
        known = info.class_names[1:]
        unknown = sorted(set(options.classes) - set(known))
        if unknown:
            raise InvalidOption("invalid_option", f"classes: unknown {unknown}; see GET /v1/model")
        labels = np.array([info.class_names.index(c) for c in options.classes], dtype=np.int64)
    formats = set(options.formats or FORMATS)
    return Resolved(
        score_threshold=default_threshold if options.score_threshold is None else options.score_threshold,
        max_detections=options.max_detections,
        labels=labels,
        rle="rle" in formats,
        polygons="polygons" in formats,
        tiling=resolve_tiling(options),
        timeout_s=None if options.timeout_ms is None else options.timeout_ms / 1e3,
        priority=options.priority or DEFAULT_PRIORITY,
    )


def resolve_tiling(options: SegmentOptions) -> Tiling | None:
    """The request's tiling with the defaults filled in; None when it asks for none."""
    spec = parse_tiles(options.tiles or "none")
    if spec is None:
        return None
    overlap = DEFAULT_OVERLAP if options.tile_overlap is None else options.tile_overlap
    return Tiling(spec, overlap, bool(options.tile_full_image))
