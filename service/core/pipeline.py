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
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Tracer

from service.core import tracing
from service.core.batcher import BatchStats, Draining, DynamicBatcher, QueueFull, Slot
from service.core.errors import DeadlineExceeded, InternalError, InvalidOption, ServiceError, Unavailable
from service.core.metrics import Metrics, Route
from service.core.options import Resolved
from service.core.postprocess import EncodedMasks, encode_local, select_detections
from service.core.runtime import OnnxModel, Prediction, Resized
from service.core.segmentation import decode, finish, prepare, run_batch
from service.core.settings import Settings
from service.core.stitching import local_masks, merge, tile_pieces
from service.core.tiling import Tiling, TooManyTiles, Window, plan_tiles

log = logging.getLogger("service")
State = Literal["starting", "ready", "draining"]
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
    tiles: int = 1  # images sent to the model: its tiles (and the whole image when asked), 1 when run whole


@dataclass(frozen=True)
class Sliced:
    """A decoded image and the windows it is to be run in (service/core/tiling.py), None to run it whole."""

    pixels: np.ndarray
    views: list[Window] | None


class Pipeline:
    """The model, the batcher, the worker pool and the metrics of one server."""

    def __init__(self, settings: Settings, model: OnnxModel, tracer: Tracer | None = None) -> None:
        self.settings = settings
        self.model = model
        self.tracer = tracer or trace.NoOpTracer()  # service/core/tracing.py's spans
        self.metrics = Metrics()
        info = model.metadata
        self.metrics.model.info({"name": info.model_name, "version": info.model_version, "arch": info.architecture})
        self._state: State = "starting"
        self._state_watchers: list[Callable[[State], None]] = []
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
    @property
    def state(self) -> State:
        """``starting`` until warmed up, ``ready``, then ``draining`` from SIGTERM on."""
        return self._state

    def watch_state(self, watcher: Callable[[State], None]) -> None:
        """Call ``watcher`` (on the event loop) with every new state: for probes that are told rather than
        asked, such as gRPC's health service."""
        self._state_watchers.append(watcher)

    def _set_state(self, state: State) -> None:
        if state != self._state:
            self._state = state
            for watcher in self._state_watchers:
                watcher(state)

    async def start(self) -> None:
        """Start batching and, unless disabled, run one inference first so that the first request does
        not pay ONNX Runtime's allocations; then report ready."""
        await self.batcher.start()
        if self.settings.warmup:
            info = self.model.metadata
            image = np.full((info.min_size, info.min_size, 3), 114, dtype=np.uint8)
            await self.in_pool(self.model.predict, [image], self.settings.score_threshold)
        self._set_state("ready")
        log.info("serving %s %s on %s", self.model.metadata.model_name, self.model.metadata.model_version,
                 ", ".join(self.model.providers))

    def execute(self, requests: list[BatchItem]) -> list[Prediction | Exception]:
        """In the inference thread: pad, one ORT call, split per image, under the batch's one span. If the
        batch fails, each request is run alone, so that one bad request gets its own error and its neighbours
        their results."""
        with tracing.batch_span(self.tracer, [r.trace for r in requests]) as span:
            results = run_batch(self.model, [r.image for r in requests], [r.score_threshold for r in requests])
            span.set_attribute(tracing.DETECTIONS, sum(len(r.scores) for r in results if isinstance(r, Prediction)))
            return results

    def drain(self) -> None:
        """Readiness off (SIGTERM); requests are still served until ``stop``."""
        self._set_state("draining")

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
        status_of: Callable[[R], int | str],
    ) -> R:
        """Answer one request: ``work``'s answer, or its ServiceError in the front door's own terms
        (``error_answer``), or an InternalError for anything unexpected; the status answered (``status_of``,
        the door's) and the time taken go to the metrics."""
        started = time.perf_counter()
        status: int | str = 500  # also when the request is cancelled (the client went away)
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
        if options.tiling is not None:
            with self.tracer.start_as_current_span(tracing.DECODE):
                sliced = await self.in_pool(self._slice, image, options.tiling)
            if sliced.views is not None:
                return await self.segment_tiles(slot, sliced, options, decode_started)
            image = sliced.pixels
        self.metrics.tiles.observe(1)
        with self.tracer.start_as_current_span(tracing.DECODE):
            resized = await self.in_pool(self._prepare, image)
        decode_s = time.perf_counter() - decode_started
        inferred = await self.infer(slot, BatchItem(resized, options.score_threshold), options.priority)
        post_started = time.perf_counter()
        with self.tracer.start_as_current_span(tracing.POSTPROCESS) as span:
            done = await self.in_pool(finish, inferred.prediction, options)
            span.set_attribute(tracing.DETECTIONS, len(done.prediction.scores))
        postprocess_s = time.perf_counter() - post_started
        self.metrics.postprocess.observe(postprocess_s)
        self.metrics.detections.inc(len(done.prediction.scores))
        return Segmented(done.prediction, done.masks, inferred, decode_s, postprocess_s)

    async def segment_tiles(
        self, slot: Slot[BatchItem, Prediction], sliced: Sliced, options: Resolved, decode_started: float
    ) -> Segmented:
        """A tiled request's work: its tiles (and the whole image when asked) hold one place each of the
        server's capacity and run through the batcher a batch at a time, so that requests queued meanwhile
        wait for at most one batch of them; their detections are stitched back into one answer."""
        height, width = sliced.pixels.shape[:2]
        views = list(sliced.views or [])
        if options.tiling is not None and options.tiling.full_image:
            views.append(Window(0, 0, width, height))
        slot.hold(len(views))
        items = await self.in_pool(self._resize_views, sliced.pixels, views)
        decode_s = time.perf_counter() - decode_started
        self.metrics.tiles.observe(len(views))
        preds: list[Prediction] = []
        queue_s = run_s = 0.0
        biggest = 0
        for first in range(0, len(items), self.batcher.max_batch_size):
            jobs = [slot.submit(BatchItem(item, options.score_threshold), options.priority)
                    for item in items[first : first + self.batcher.max_batch_size]]
            preds.extend(await asyncio.gather(*(job.future for job in jobs)))
            queue_s += max(job.queue_s for job in jobs)
            run_s += max(job.run_s for job in jobs)
            biggest = max(biggest, *(job.batch_size for job in jobs))
        post_started = time.perf_counter()
        with self.tracer.start_as_current_span(tracing.POSTPROCESS) as span:
            pred, masks = await self.in_pool(self._stitch, preds, views, options, (height, width))
            span.set_attribute(tracing.DETECTIONS, len(pred.scores))
        postprocess_s = time.perf_counter() - post_started
        self.metrics.postprocess.observe(postprocess_s)
        self.metrics.detections.inc(len(pred.scores))
        return Segmented(pred, masks, Inferred(pred, queue_s, run_s, biggest), decode_s, postprocess_s, len(views))

    def _slice(self, image: bytes | np.ndarray, tiling: Tiling) -> Sliced:
        """Worker thread: the image checked and decoded, and its tiles under the server's cap (InvalidOption
        past it); no tiles when it is to run whole."""
        image = decode(image, self.settings.max_image_pixels)
        info = self.model.metadata
        cap = max(min(self.settings.max_tiles, self.settings.queue_capacity - tiling.full_image), 1)
        try:
            views = plan_tiles(tiling.spec, image.shape[0], image.shape[1], tiling.overlap, info.min_size,
                               info.max_size, cap)
        except TooManyTiles as exc:
            raise InvalidOption("too_many_tiles", f"tiles: {exc}") from None
        return Sliced(image, views)

    def _resize_views(self, pixels: np.ndarray, views: list[Window]) -> list[Resized]:
        """Worker thread: each window cut at the original resolution and resized by the model's policy."""
        return [self.model.resize(np.ascontiguousarray(pixels[v.y0 : v.y1, v.x0 : v.x1])) for v in views]

    def _stitch(
        self, preds: list[Prediction], views: list[Window], options: Resolved, image_size: tuple[int, int]
    ) -> tuple[Prediction, EncodedMasks | None]:
        """Worker thread: the tiles' detections of the request's classes shifted back and merged across the
        seams, at most its count, their masks encoded as it asked."""
        every = replace(options, max_detections=None)
        merged = merge(tile_pieces([select_detections(p, every) for p in preds], views))
        merged = merged.select(np.arange(min(len(merged), options.max_detections or len(merged))))
        masks = None
        if options.rle or options.polygons:
            masks = encode_local(local_masks(merged, image_size), options.rle, options.polygons)
        # The masks are pasted and merged already: the prediction carries none of the model's m x m ones.
        empty = np.zeros((len(merged), 0, 0), np.float32)
        return Prediction(merged.boxes, merged.scores, merged.labels, empty, image_size), masks

    def _prepare(self, image: bytes | np.ndarray) -> Resized:
        """Worker thread: the image checked against the limits (before decoding), decoded, resized by the
        model's policy."""
        return prepare(self.model, image, self.settings.max_image_pixels)

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
