"""The routes a platform asks of any server, whatever its doors: liveness, readiness (warmed up, not
draining) and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from service.core.pipeline import Pipeline


class Status(BaseModel):
    status: str


def health_router(pipeline: Pipeline) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", response_model=Status, summary="Liveness")
    async def healthz() -> Status:
        return Status(status="ok")

    @router.get("/readyz", response_model=Status, responses={503: {"model": Status}}, summary="Readiness")
    async def readyz() -> Response:
        return JSONResponse({"status": pipeline.state}, status_code=200 if pipeline.state == "ready" else 503)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(pipeline.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
