"""The routes a platform asks of any server, whatever its doors: liveness, readiness (warmed up, not
draining) and the Prometheus metrics, on the API port or (``MRCNN_METRICS_PORT``, as Triton's 8002) on a port
of their own, which can stay inside the cluster while the API port is public."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from pydantic import BaseModel

from service.core.pipeline import Pipeline

# The probes of a platform: ours and the Open Inference Protocol's (service/oip/routes.py serves those).
PROBE_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")


class Status(BaseModel):
    status: str


def serve_metrics(pipeline: Pipeline, host: str, port: int) -> WSGIServer:
    """The metrics on their own port, by prometheus-client's server (a thread); ``shutdown()`` stops it."""
    server, _ = start_http_server(port, addr=host, registry=pipeline.metrics.registry)
    return server


def health_router(pipeline: Pipeline, metrics_on_api_port: bool = True) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", response_model=Status, summary="Liveness")
    async def healthz() -> Status:
        return Status(status="ok")

    @router.get("/readyz", response_model=Status, responses={503: {"model": Status}}, summary="Readiness")
    async def readyz() -> Response:
        return JSONResponse({"status": pipeline.state}, status_code=200 if pipeline.state == "ready" else 503)

    if metrics_on_api_port:
        @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
        async def metrics() -> Response:
            return Response(generate_latest(pipeline.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
