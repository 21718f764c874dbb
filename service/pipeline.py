"""The request pipeline, with the lifecycle of a Triton Python backend: ``start`` (warm the model up,
start batching), ``execute`` (one batch in, exactly one result or error per request out), ``stop``
(drain).

Every front door goes through ``handle``: it answers one request with its status and latency in the
metrics. Inside, ``admitted`` holds one of the server's slots for the request (refused at once with
503 when full or draining) under the request's deadline (504), and ``decode``, ``infer`` and
``in_pool`` do the work off the event loop: decoding and post-processing in a small worker pool,
inference in the batcher's single thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from starlette.responses import Response

from service.batcher import BatchStats, Draining, DynamicBatcher, QueueFull, Slot
from service.errors import ApiError
from service.images import decode_image
from service.metrics import Metrics
from service.runtime import OnnxModel, Prediction, Resized, split_outputs
from service.settings import Settings

log = logging.getLogger("service")
T = TypeVar("T")


@dataclass(frozen=True)
class InferenceRequest:
    """What one request puts in a batch: its resized image and its own score threshold."""

    image: Resized
    score_threshold: float


@dataclass(frozen=True)
class Inferred:
    """One request's detections and what its batch cost it."""

    prediction: Prediction
    queue_s: float
    run_s: float
    batch_size: int


class Pipeline:
    """The model, the batcher, the worker pool and the metrics of one server."""

    def __init__(self, settings: Settings, model: OnnxModel) -> None:
        self.settings = settings
        self.model = model
        self.metrics = Metrics()
        info = model.metadata
        self.metrics.model.info({"name": info.model_name, "version": info.model_version, "arch": info.architecture})
        self.state: Literal["starting", "ready", "draining"] = "starting"
        self.pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="worker")
        self.batcher: DynamicBatcher[InferenceRequest, Prediction] = DynamicBatcher(
            self.execute,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000.0,
            capacity=settings.queue_capacity,
            on_batch=self._on_batch,
            on_depth=self.metrics.queue_depth.set,
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start batching and, unless disabled, run one inference first so that the first request does
        not pay ONNX Runtime's allocations; then report ready."""
        await self.batcher.start()
        if self.settings.warmup:
            info = self.model.metadata
            image = np.full((info.min_size, info.min_size, 3), 114, dtype=np.uint8)
            await self.in_pool(self.model.predict, [image], self.settings.score_threshold)
        self.state = "ready"
        log.info("serving %s %s on %s", self.model.metadata.model_name, self.model.metadata.model_version,
                 ", ".join(self.model.providers))

    def execute(self, requests: list[InferenceRequest]) -> list[Prediction | Exception]:
        """In the inference thread: pad, one ORT call, split per image. If the batch fails, each request
        is run alone, so that one bad request gets its own error and its neighbours their results."""
        try:
            items = [r.image for r in requests]
            images, sizes = self.model.collate(items)
            thresholds = np.array([r.score_threshold for r in requests], dtype=np.float32)
            return list(split_outputs(self.model.run(images, sizes, thresholds), items))
        except Exception as exc:
            if len(requests) == 1:
                log.exception("inference failed")
                return [exc]
            return [self.execute([r])[0] for r in requests]

    def drain(self) -> None:
        """Readiness off (SIGTERM); requests are still served until ``stop``."""
        self.state = "draining"

    async def stop(self) -> None:
        """Refuse new requests, let admitted ones finish (up to the drain timeout), stop the threads."""
        self.drain()
        await self.batcher.stop(self.settings.drain_timeout_s)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- one request -------------------------------------------------------------------------------
    async def handle(
        self, work: Callable[[], Awaitable[Response]], error_response: Callable[[ApiError], Response]
    ) -> Response:
        """Answer one request: ``work``'s response, or its ApiError in the front door's own error body,
        or a 500 for anything unexpected; the status and the time taken go to the metrics."""
        started = time.perf_counter()
        status = 500
        try:
            response = await work()
            status = response.status_code
            return response
        except ApiError as exc:
            status = exc.status
            return error_response(exc)
        except Exception:
            log.exception("request failed")
            return error_response(ApiError(500, "internal_error", "the server failed on this request"))
        finally:
            self.metrics.observe_request(status, time.perf_counter() - started)

    @contextlib.asynccontextmanager
    async def admitted(self, started: float) -> AsyncIterator[Slot[InferenceRequest, Prediction]]:
        """Hold a slot for the block, which must finish within the request deadline from ``started``."""
        deadline = started + self.settings.request_timeout_s
        try:
            with self.batcher.admit() as slot:
                self.metrics.in_progress.inc()
                try:
                    async with asyncio.timeout(max(deadline - time.perf_counter(), 0.0)):
                        yield slot
                finally:
                    self.metrics.in_progress.dec()
        except (QueueFull, Draining) as exc:
            code = "overloaded" if isinstance(exc, QueueFull) else "shutting_down"
            raise ApiError(503, code, str(exc), {"Retry-After": "1"}) from None
        except TimeoutError:
            limit = self.settings.request_timeout_s
            raise ApiError(504, "deadline_exceeded", f"not answered within the {limit:g} s deadline") from None

    async def decode(self, data: bytes) -> Resized:
        """Worker thread: decode (limits checked first), then resize by the model's policy."""
        return await self.in_pool(self._decode_resize, data)

    def _decode_resize(self, data: bytes) -> Resized:
        return self.model.resize(decode_image(data, self.settings.max_image_pixels))

    async def infer(self, slot: Slot[InferenceRequest, Prediction], request: InferenceRequest) -> Inferred:
        """The request's detections, from whichever batch it joins."""
        job = slot.submit(request)
        prediction = await job.future
        return Inferred(prediction, job.queue_s, job.run_s, job.batch_size)

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.inference.observe(stats.run_s)
        for wait in stats.queue_waits_s:
            self.metrics.queue_wait.observe(wait)
