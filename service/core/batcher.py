"""Dynamic batching on asyncio, in the style of Triton's dynamic batcher, with a tiny explicit lifecycle.

``start()`` -> ``with admit() as slot`` (or :class:`QueueFull` at once) -> ``slot.submit(payload)`` ->
awaited result -> the slot is released; ``stop()`` drains what was admitted. One collector task forms
batches: it takes the first waiting job, then waits at most ``max_wait_s`` for company, but only while
admitted requests are still on their way (decoding), so a lone request never pays the wait. The batch runs in
a single inference thread (one ORT call); each job's future gets exactly its own result, or its own error,
by position. A job whose caller gave up (deadline, disconnect) is cancelled and dropped before it runs.
A request that sends several images (a tiled one) first holds one place of the capacity per image
(``slot.hold(n)``, or QueueFull at once), then submits them.
Waiting jobs are taken by priority (a lower number first, as Triton's levels: 1 is the highest), in arrival
order within one priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class QueueFull(Exception):
    """The server holds ``capacity`` requests already; the caller should retry later (503)."""


class Draining(Exception):
    """The server is shutting down and takes no new work (503)."""


@dataclass
class BatchStats:
    """What one batch cost, for metrics: size, ORT time and each job's wait in the queue."""

    size: int
    run_s: float
    queue_waits_s: list[float]


@dataclass(eq=False)
class Job(Generic[P, R]):
    """One request's work and the future its caller awaits."""

    payload: P
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.perf_counter)
    queue_s: float = 0.0
    run_s: float = 0.0
    batch_size: int = 0


class Slot(Generic[P, R]):
    """An admitted request's place in the server; ``submit`` queues its work, once per place held."""

    def __init__(self, batcher: DynamicBatcher[P, R]) -> None:
        self._batcher = batcher
        self.places = 1  # of the batcher's capacity: one, or one per image of a tiled request (``hold``)
        self.jobs = 0  # submitted so far
        self.admitted_at = time.perf_counter()  # a request's own timeout counts from here

    def hold(self, places: int) -> None:
        """Count this request as ``places`` requests against the capacity (a tiled request: one per image
        it sends to the model), so that admitted work stays bounded; QueueFull at once when they are not
        free. It may then submit that many payloads."""
        self._batcher._hold(self, places)

    def submit(self, payload: P, priority: int = 0) -> Job[P, R]:
        """Queue the payload, ahead of waiting jobs of a larger ``priority`` number; await ``job.future`` for
        this request's own result. Once per place held.

        Cancelling the future (e.g. ``asyncio.timeout`` around the await) drops the job if it has not
        started; if its batch is already running, the result is discarded.
        """
        if self.jobs >= self.places:
            raise RuntimeError("a slot submits once per place it holds")
        job = self._batcher._enqueue(payload, priority, arrived=self.jobs == 0)
        self.jobs += 1
        return job


class DynamicBatcher(Generic[P, R]):
    """Groups concurrent jobs into batches for ``run_batch(list[P]) -> list[R | Exception]``: same order,
    same length, an exception in a job's place being that job's error alone."""

    def __init__(
        self,
        run_batch: Callable[[list[P]], list[R | Exception]],
        max_batch_size: int = 8,
        max_wait_s: float = 0.005,
        capacity: int = 64,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._queue: asyncio.PriorityQueue[tuple[int, int, Job[P, R]]] | None = None
        self._arrivals = itertools.count()  # ties within a priority go in arrival order
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.admitted = 0  # requests holding a slot: decoding, queued, running or post-processing
        self.arriving = 0  # admitted requests not yet submitted (their company is worth waiting for)
        self.closed = False  # stopping: admits no one

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the queue, the inference thread and the collector task on the running loop."""
        self._queue = asyncio.PriorityQueue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task = asyncio.create_task(self._collect(), name="batch-collector")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let admitted ones finish (up to ``timeout_s``), then stop the thread."""
        self.closed = True
        end = time.monotonic() + timeout_s
        while self.admitted > 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    # -- per request -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def admit(self) -> Iterator[Slot[P, R]]:
        """Hold one of ``capacity`` slots for the whole request; refuse at once when none is free."""
        if self.closed:
            raise Draining("the server is shutting down")
        if self.admitted >= self.capacity:
            raise QueueFull(f"{self.admitted} requests in progress (capacity {self.capacity})")
        slot: Slot[P, R] = Slot(self)
        self.admitted += 1
        self.arriving += 1
        try:
            yield slot
        finally:
            if slot.jobs == 0:
                self.arriving -= 1
            self.admitted -= slot.places

    def _hold(self, slot: Slot[P, R], places: int) -> None:
        more = places - slot.places
        if more > 0 and self.admitted + more > self.capacity:
            raise QueueFull(f"{self.admitted} requests in progress (capacity {self.capacity}); this one needs "
                            f"{places} places (one per image it sends to the model)")
        self.admitted += max(more, 0)
        slot.places = max(places, slot.places)

    def _enqueue(self, payload: P, priority: int, arrived: bool = True) -> Job[P, R]:
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if arrived:  # the request's first job: it is no longer on its way
            self.arriving -= 1
        job: Job[P, R] = Job(payload, asyncio.get_running_loop().create_future())
        self._queue.put_nowait((priority, next(self._arrivals), job))
        self._depth()
        return job

    # -- the collector -----------------------------------------------------------------------------
    def _depth(self) -> None:
        if self._on_depth is not None and self._queue is not None:
            self._on_depth(self._queue.qsize())

    async def _gather(self) -> list[Job[P, R]]:
        """The next batch: first job, then whatever comes within max_wait_s while more is expected."""
        assert self._queue is not None
        batch = [(await self._queue.get())[-1]]
        loop = asyncio.get_running_loop()
        until = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait()[-1])
                continue
            remaining = until - loop.time()
            if self.arriving <= 0 or remaining <= 0:
                break
            try:
                batch.append((await asyncio.wait_for(self._queue.get(), remaining))[-1])
            except TimeoutError:
                break
        self._depth()
        return [job for job in batch if not job.future.done()]

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            start = time.perf_counter()
            for job in batch:
                job.queue_s = start - job.enqueued
            try:
                payloads = [j.payload for j in batch]
                results = await loop.run_in_executor(self._executor, self._run_batch, payloads)
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} jobs")
            except Exception as exc:  # run_batch itself failed: every caller learns why
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            run_s = time.perf_counter() - start
            for job, result in zip(batch, results, strict=True):
                job.run_s, job.batch_size = run_s, len(batch)
                if job.future.done():
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            if self._on_batch is not None:
                self._on_batch(BatchStats(len(batch), run_s, [j.queue_s for j in batch]))
