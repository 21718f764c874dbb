"""The request pipeline, with the lifecycle of a Triton Python backend: ``start`` (warm the model up,
start batching), ``execute`` (one batch in, exactly one result or error per request out), ``stop``
(drain).

Every front door (``/segment``, the Open Inference Protocol's infer) goes through ``handle``: it answers
one request with its status and latency in the metrics, under the door's route label. Inside,
``admitted`` holds one of the server's slots for the request (refused at once, Unavailable, when full or
draining) under the request's deadline (DeadlineExceeded), and ``segment`` does the work off the event
loop: decoding and post-processing in a small worker pool, inference in the batcher's single thread. Each
door only parses its own request, encodes its own response and says its errors in its own protocol; this
module knows no protocol (no web framework is imported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Tracer

from service.core import tracing
from service.core.batcher import BatchStats, Draining, DynamicBatcher, QueueFull, Slot
from service.core.errors import DeadlineExceeded, InternalError, ServiceError, Unavailable
from service.core.images import check_size, decode_image
from service.core.metrics import Metrics, Route
from service.core.options import Resolved
from service.core.postprocess import EncodedMasks, encode_detections, select_detections
from service.core.runtime import OnnxModel, Prediction, Resized, split_outputs
from service.core.settings import Settings

log = logging.getLogger("service")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchItem:
    """What one request puts in a batch: its resized image, its own score threshold and its trace."""

    image: Resized
    score_threshold: float
    trace: tracing.BatchTrace = field(default_factory=tracing.BatchTrace)  # captures the caller's context


@dataclass(frozen=True)
class Inferred:
    """One request's detections and what its batch cost it."""

    prediction: Prediction
    queue_s: float
    run_s: float
    batch_size: int


@dataclass(frozen=True)
class Segmented:
    """One request's answer before its front door encodes it: the detections it asked for, their masks in
    the formats it asked for, and what each step cost."""

    prediction: Prediction  # filtered by the request's classes and count
    masks: EncodedMasks | None  # None when the request asked for no mask encoding
    inferred: Inferred
    decode_s: float
    postprocess_s: float


class Pipeline:
    """The model, the batcher, the worker pool and the metrics of one server."""

    def __init__(self, settings: Settings, model: OnnxModel, tracer: Tracer | None = None) -> None:
        self.settings = settings
        self.model = model
        self.tracer = tracer or trace.NoOpTracer()  # service/core/tracing.py's spans
        self.metrics = Metrics()
        info = model.metadata
        self.metrics.model.info({"name": info.model_name, "version": info.model_version, "arch": info.architecture})
        self.state: Literal["starting", "ready", "draining"] = "starting"
        self.pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="worker")
        self.batcher: DynamicBatcher[BatchItem, Prediction] = DynamicBatcher(
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

    def execute(self, requests: list[BatchItem]) -> list[Prediction | Exception]:
        """In the inference thread: pad, one ORT call, split per image, under the batch's one span. If the
        batch fails, each request is run alone, so that one bad request gets its own error and its neighbours
        their results."""
        with tracing.batch_span(self.tracer, [r.trace for r in requests]) as span:
            results = self._execute(requests)
            span.set_attribute(tracing.DETECTIONS, sum(len(r.scores) for r in results if isinstance(r, Prediction)))
            return results

    def _execute(self, requests: list[BatchItem]) -> list[Prediction | Exception]:
        try:
            items = [r.image for r in requests]
            images, sizes = self.model.collate(items)
            thresholds = np.array([r.score_threshold for r in requests], dtype=np.float32)
            return list(split_outputs(self.model.run(images, sizes, thresholds), items))
        except Exception as exc:
            if len(requests) == 1:
                log.exception("inference failed")
                return [exc]
            return [self._execute([r])[0] for r in requests]

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
        self,
        route: Route,
        work: Callable[[], Awaitable[R]],
        error_answer: Callable[[ServiceError], R],
        status_of: Callable[[R], int],
    ) -> R:
        """Answer one request: ``work``'s answer, or its ServiceError in the front door's own terms
        (``error_answer``), or an InternalError for anything unexpected; the status answered (``status_of``,
        the door's) and the time taken go to the metrics."""
        started = time.perf_counter()
        status = 500  # also when the request is cancelled (the client went away)
        try:
            try:
                answer = await work()
            except ServiceError as exc:
                answer = error_answer(exc)
            except Exception:
                log.exception("request failed")
                answer = error_answer(InternalError("internal_error", "the server failed on this request"))
            status = status_of(answer)
            return answer
        finally:
            self.metrics.observe_request(route, status, time.perf_counter() - started)

    @contextlib.asynccontextmanager
    async def admitted(self, route: Route, started: float) -> AsyncIterator[Slot[BatchItem, Prediction]]:
        """Hold a slot for the block, which must finish within the request deadline from ``started``:
        Unavailable at once when the server is full or draining, DeadlineExceeded past the deadline."""
        deadline = started + self.settings.request_timeout_s
        in_progress = self.metrics.in_progress.labels(route)
        try:
            with self.batcher.admit() as slot:
                in_progress.inc()
                try:
                    async with asyncio.timeout(max(deadline - time.perf_counter(), 0.0)):
                        yield slot
                finally:
                    in_progress.dec()
        except (QueueFull, Draining) as exc:
            code = "overloaded" if isinstance(exc, QueueFull) else "shutting_down"
            raise Unavailable(code, str(exc)) from None
        except TimeoutError:
            limit = self.settings.request_timeout_s
            raise DeadlineExceeded("deadline_exceeded", f"not answered within the {limit:g} s deadline") from None

    async def segment(
        self, slot: Slot[BatchItem, Prediction], image: bytes | np.ndarray, options: Resolved
    ) -> Segmented:
        """One admitted request's work: decode and resize ``image`` (an encoded file, or RGB uint8 pixels
        [H, W, 3]), infer in whichever batch it joins, keep the detections ``options`` asks for and encode
        only the mask formats it asks for; within the request's own timeout, if it has one (DeadlineExceeded
        past it: its job is dropped unless its batch is already running)."""
        if options.timeout_s is None:
            return await self._segment(slot, image, options)
        try:
            async with asyncio.timeout(max(slot.admitted_at + options.timeout_s - time.perf_counter(), 0.0)):
                return await self._segment(slot, image, options)
        except TimeoutError:
            limit_ms = options.timeout_s * 1e3
            raise DeadlineExceeded("deadline_exceeded", f"not answered within its timeout of {limit_ms:g} ms") from None

    async def _segment(
        self, slot: Slot[BatchItem, Prediction], image: bytes | np.ndarray, options: Resolved
    ) -> Segmented:
        decode_started = time.perf_counter()
        with self.tracer.start_as_current_span(tracing.DECODE):
            resized = await self.in_pool(self._prepare, image)
        decode_s = time.perf_counter() - decode_started
        inferred = await self.infer(slot, BatchItem(resized, options.score_threshold), options.priority)
        post_started = time.perf_counter()
        with self.tracer.start_as_current_span(tracing.POSTPROCESS) as span:
            pred = select_detections(inferred.prediction, options)
            masks = await self.in_pool(encode_detections, pred, options) if options.rle or options.polygons else None
            span.set_attribute(tracing.DETECTIONS, len(pred.scores))
        postprocess_s = time.perf_counter() - post_started
        self.metrics.postprocess.observe(postprocess_s)
        self.metrics.detections.inc(len(pred.scores))
        return Segmented(pred, masks, inferred, decode_s, postprocess_s)

    def _prepare(self, image: bytes | np.ndarray) -> Resized:
        """Worker thread: the image checked against the limits (before decoding), decoded, resized by the
        model's policy."""
        if isinstance(image, np.ndarray):
            check_size(image.shape[1], image.shape[0], self.settings.max_image_pixels)
        else:
            image = decode_image(image, self.settings.max_image_pixels)
        return self.model.resize(image)

    async def infer(self, slot: Slot[BatchItem, Prediction], request: BatchItem, priority: int) -> Inferred:
        """The request's detections, from whichever batch it joins."""
        submitted_ns = time.time_ns()
        job = slot.submit(request, priority)
        prediction = await job.future
        tracing.record_queue_wait(self.tracer, request.trace, submitted_ns, job.queue_s, job.batch_size, priority)
        return Inferred(prediction, job.queue_s, job.run_s, job.batch_size)

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.inference.observe(stats.run_s)
        for wait in stats.queue_waits_s:
            self.metrics.queue_wait.observe(wait)
