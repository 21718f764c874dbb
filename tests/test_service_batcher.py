"""The dynamic batcher on its own: grouping, own results, lone requests, full queue, dropped work, drain."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.core.batcher import Draining, DynamicBatcher, QueueFull


class Recorder:
    """A run_batch that remembers its calls and answers each payload with a value derived from it."""

    def __init__(self, delay_s: float = 0.02, gate: threading.Event | None = None) -> None:
        self.calls: list[list[int]] = []
        self.delay_s, self.gate = delay_s, gate

    def __call__(self, payloads: list[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        self.calls.append(list(payloads))
        return [p * 10 + 1 for p in payloads]


async def _request(b: DynamicBatcher[int, int], payload: int, decode_s: float = 0.0) -> int:
    with b.admit() as slot:
        await asyncio.sleep(decode_s)  # stands for decoding in a worker thread
        return await slot.submit(payload).future


def test_concurrent_requests_share_calls_and_get_their_own_results() -> None:
    async def main() -> None:
        rec = Recorder()
        b: DynamicBatcher[int, int] = DynamicBatcher(rec, max_batch_size=8, max_wait_s=0.05, capacity=64)
        await b.start()
        results = await asyncio.gather(*(_request(b, i, decode_s=0.001 * (i % 4)) for i in range(16)))
        await b.stop()
        assert results == [i * 10 + 1 for i in range(16)]
        assert len(rec.calls) < 16 and max(len(c) for c in rec.calls) <= 8
        assert sorted(p for c in rec.calls for p in c) == list(range(16))

    asyncio.run(main())


def test_a_lone_request_does_not_wait_for_company() -> None:
    async def main() -> float:
        b: DynamicBatcher[int, int] = DynamicBatcher(Recorder(0.0), max_batch_size=8, max_wait_s=2.0)
        await b.start()
        t = time.perf_counter()
        assert await _request(b, 3) == 31
        elapsed = time.perf_counter() - t
        await b.stop()
        return elapsed

    assert asyncio.run(main()) < 0.5


def test_full_queue_refuses_at_once_and_recovers() -> None:
    async def main() -> None:
        gate = threading.Event()
        rec = Recorder(0.0, gate)
        b: DynamicBatcher[int, int] = DynamicBatcher(rec, max_batch_size=2, max_wait_s=0.0, capacity=3)
        await b.start()
        held = [asyncio.create_task(_request(b, i)) for i in range(3)]
        await asyncio.sleep(0.05)
        t = time.perf_counter()
        with pytest.raises(QueueFull), b.admit():
            pass
        assert time.perf_counter() - t < 0.01
        gate.set()
        assert await asyncio.gather(*held) == [1, 11, 21]
        assert await _request(b, 5) == 51  # capacity is back
        await b.stop()

    asyncio.run(main())


def test_cancelled_job_is_dropped_before_it_runs() -> None:
    async def main() -> None:
        gate = threading.Event()
        rec = Recorder(0.0, gate)
        b: DynamicBatcher[int, int] = DynamicBatcher(rec, max_batch_size=1, max_wait_s=0.0)
        await b.start()
        first = asyncio.create_task(_request(b, 1))
        await asyncio.sleep(0.05)  # job 1 is running (blocked on the gate)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await _request(b, 2)  # queued behind 1, gives up
        gate.set()
        assert await first == 11
        assert await _request(b, 3) == 31
        await b.stop()
        assert rec.calls == [[1], [3]]

    asyncio.run(main())


def test_failed_batch_fails_each_caller_and_the_batcher_lives_on() -> None:
    async def main() -> None:
        def boom(payloads: list[int]) -> list[int]:
            if 0 in payloads:
                raise RuntimeError("model failed")
            return payloads

        b: DynamicBatcher[int, int] = DynamicBatcher(boom, max_batch_size=4, max_wait_s=0.01)
        await b.start()
        with pytest.raises(RuntimeError, match="model failed"):
            await _request(b, 0)
        assert await _request(b, 7) == 7
        await b.stop()

    asyncio.run(main())


def test_stop_drains_admitted_work_and_refuses_new() -> None:
    async def main() -> None:
        rec = Recorder(0.05)
        b: DynamicBatcher[int, int] = DynamicBatcher(rec, max_batch_size=2, max_wait_s=0.0)
        await b.start()
        inflight = [asyncio.create_task(_request(b, i)) for i in range(4)]
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(b.stop(timeout_s=5))
        await asyncio.sleep(0.01)
        with pytest.raises(Draining), b.admit():
            pass
        assert await asyncio.gather(*inflight) == [1, 11, 21, 31]
        await stopping

    asyncio.run(main())
