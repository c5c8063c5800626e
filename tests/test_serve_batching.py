"""Dynamic batching: concurrent submits share batches; limits, timeouts and failures behave."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imagefm.serve.batching import DynamicBatcher, QueueFullError


class Recorder:
    """A batch function that doubles numbers and remembers the batch sizes it saw."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.release.wait(5)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot process {self.fail_on}")
        time.sleep(self.delay)
        self.sizes.append(len(items))
        return [2 * i for i in items]


def run(coro):
    return asyncio.run(coro)


async def _started(recorder: Recorder, **kw) -> DynamicBatcher:
    batcher = DynamicBatcher(recorder, ThreadPoolExecutor(1), **kw)
    await batcher.start()
    return batcher


def test_concurrent_requests_share_batches_and_keep_their_results() -> None:
    async def main() -> None:
        recorder = Recorder(delay=0.01)
        batcher = await _started(recorder, max_batch=8, max_wait_s=0.05)
        results = await asyncio.gather(*(batcher.submit(i, timeout=5) for i in range(20)))
        assert results == [2 * i for i in range(20)]
        assert sum(recorder.sizes) == 20 and max(recorder.sizes) == 8
        assert len(recorder.sizes) == 3  # 8 + 8 + 4
        stats = batcher.stats.to_dict()
        assert stats["items"] == 20
        assert 0.03 <= stats["busy_s"] < 0.5  # three batches that sleep 10 ms each
        await batcher.stop()

    run(main())


def test_max_batch_one_is_one_request_at_a_time() -> None:
    async def main() -> None:
        recorder = Recorder()
        batcher = await _started(recorder, max_batch=1)
        assert await batcher.submit_many(list(range(6)), timeout=5) == [0, 2, 4, 6, 8, 10]
        assert recorder.sizes == [1] * 6
        await batcher.stop()

    run(main())


def test_a_lone_request_waits_at_most_max_wait() -> None:
    async def main() -> None:
        batcher = await _started(Recorder(), max_batch=32, max_wait_s=0.05)
        started = time.perf_counter()
        assert await batcher.submit(21, timeout=5) == 42
        assert time.perf_counter() - started < 1.0
        await batcher.stop()

    run(main())


def test_a_full_queue_refuses_at_once() -> None:
    async def main() -> None:
        recorder = Recorder()
        recorder.release.clear()  # the model is stuck: nothing leaves the queue
        batcher = await _started(recorder, max_batch=2, max_wait_s=0.0, max_queue=4)
        first = asyncio.ensure_future(batcher.submit_many([1, 2], timeout=5))  # in the model
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.submit_many([3, 4, 5, 6], timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):
            await batcher.submit(7, timeout=5)
        recorder.release.set()
        assert await first == [2, 4] and await waiting == [6, 8, 10, 12]
        await batcher.stop()

    run(main())


def test_timeouts_raise_and_abandoned_items_are_not_computed() -> None:
    async def main() -> None:
        recorder = Recorder()
        recorder.release.clear()
        batcher = await _started(recorder, max_batch=1, max_wait_s=0.0)
        stuck = asyncio.ensure_future(batcher.submit(1, timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await batcher.submit(2, timeout=0.05)
        recorder.release.set()
        assert await stuck == 2
        assert await batcher.submit(3, timeout=5) == 6
        assert recorder.sizes == [1, 1]  # the item that timed out was skipped
        await batcher.stop()

    run(main())


def test_a_failing_batch_fails_its_requests_only() -> None:
    async def main() -> None:
        batcher = await _started(Recorder(fail_on=13), max_batch=4, max_wait_s=0.02)
        results = await asyncio.gather(batcher.submit(13, timeout=5), batcher.submit(1, 5),
                                       return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)  # same batch
        assert await batcher.submit(5, timeout=5) == 10  # the batcher lives on
        await batcher.stop()

    run(main())


def test_stop_fails_waiting_requests() -> None:
    async def main() -> None:
        recorder = Recorder()
        recorder.release.clear()
        batcher = await _started(recorder, max_batch=1, max_wait_s=0.0)
        asyncio.ensure_future(batcher.submit(1, timeout=5))
        waiting = asyncio.ensure_future(batcher.submit(2, timeout=5))
        await asyncio.sleep(0.05)
        await batcher.stop()
        recorder.release.set()
        with pytest.raises(RuntimeError, match="shutting down"):
            await waiting

    run(main())
