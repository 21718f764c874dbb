"""The FastAPI app: the inference core (service/core) behind its front doors.

``create_app(settings)`` loads the model at once (so a bad file fails before serving) and returns the
app; ``service.app:app`` builds one from ``MRCNN_*`` environment variables for ``uvicorn``. The event
loop only moves bytes and futures: the pipeline decodes and post-processes in worker threads and runs
the model in its batcher's thread. Each door (service/segment, service/oip) brings its routes and says
its errors itself; the page and the probes are routes beside them. The gRPC door (service/grpc, unless
``MRCNN_GRPC_PORT`` is 0) is a server of its own in the same event loop, started after the pipeline and
stopped before it, so its RPCs in flight finish.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator

import cv2
from fastapi import FastAPI

from service.core.pipeline import Pipeline
from service.core.runtime import ModelLoadError, OnnxModel
from service.core.settings import Settings
from service.grpc.server import GrpcDoor
from service.label_studio.routes import label_studio_door
from service.oip.routes import oip_door
from service.page.routes import add_page
from service.segment.routes import segment_door
from service.web.doors import add_doors
from service.web.health import health_router

API_VERSION = "1"


def create_app(settings: Settings | None = None, model: OnnxModel | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment); loads the model now unless given."""
    settings = settings or Settings()
    if model is None:
        model = OnnxModel(
            settings.model_path, settings.providers, settings.intra_op_threads, settings.inter_op_threads,
            allow_spinning=settings.ort_spinning,
        )
    cv2.setNumThreads(1)  # requests are parallel already; OpenCV's own threads would oversubscribe
    pipeline = Pipeline(settings, model)
    grpc_door = GrpcDoor(pipeline, API_VERSION) if settings.grpc_port else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pipeline.start()
        try:
            if grpc_door is not None:
                await grpc_door.start(settings.host, settings.grpc_port)
            yield
        finally:
            if grpc_door is not None:  # its RPCs in flight finish while the pipeline still runs
                await grpc_door.stop(settings.drain_timeout_s)
            await pipeline.stop()

    app = FastAPI(
        title="Mask R-CNN segmentation service",
        version=API_VERSION,
        description="Instance segmentation with an exported Mask R-CNN on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.pipeline = pipeline
    app.state.grpc = grpc_door
    add_doors(app, [segment_door(pipeline), oip_door(pipeline, API_VERSION), label_studio_door(pipeline)])
    app.include_router(health_router(pipeline))
    add_page(app, pipeline)
    return app


def load_app_or_exit(settings: Settings | None = None) -> FastAPI:
    """create_app, but a bad model file ends the process with one line instead of a traceback."""
    try:
        return create_app(settings)
    except ModelLoadError as exc:
        print(f"error: cannot serve the model: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    """``service.app:app`` for uvicorn, built on first access so importing this module loads nothing."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = load_app_or_exit()
    return _app
