"""The web page: ``GET /`` (service/page/static/index.html), its files under ``/static/`` and its settings at
``GET /page.json``. Not a protocol: its only errors (a missing static file) are the server's own.

The page is plain HTML, CSS and JavaScript served by the service itself: no CDN, no build step, and a
Content-Security-Policy that lets it load nothing from anywhere else (the machines that run this have
no internet). These routes are not API: they are left out of the OpenAPI schema, and as they never go
through the pipeline they are not counted in the /segment metrics.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.core.pipeline import Pipeline
from service.overlay import style

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Scripts, styles and fetches from this origin only; images also from the blob: URLs of local files.
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'"


def add_page(app: FastAPI, pipeline: Pipeline) -> None:
    """Register the page's routes on ``app``."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.get("/page.json", include_in_schema=False)
    async def page_settings() -> dict[str, object]:
        """The request threshold (the model's own, so the slider can go down to it without asking
        again), the slider's first position (the server's default threshold) and the drawing style."""
        return {
            "score_threshold": pipeline.model.metadata.score_threshold,
            "default_score": pipeline.settings.score_threshold,
            "style": style(),
        }

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
