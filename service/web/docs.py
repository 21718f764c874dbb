"""The OpenAPI schema and its two viewers (``/openapi.json``, ``/docs``, ``/redoc``) as ordinary routes of
the app, so that they follow the API key rule like every route (FastAPI's built-in ones are added outside
its dependency system). The pages are FastAPI's own (``get_swagger_ui_html``, ``get_redoc_html``)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

OPENAPI_URL = "/openapi.json"


def add_docs(app: FastAPI) -> None:
    """The schema and viewer routes; ``app`` must be made with ``openapi_url=None`` (no built-in ones)."""

    @app.get(OPENAPI_URL, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=OPENAPI_URL, title=f"{app.title} - ReDoc")
