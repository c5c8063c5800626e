"""Dynamic batching: concurrent requests share one forward pass of the model.

Each request ``submit``s its item and awaits the result. One collector task takes the first item
waiting, then keeps taking items until it has ``max_batch`` of them or ``max_wait`` has passed
since that first item, and runs the batch function on the model thread. While a batch runs, new
items queue up, so under load batches fill without any waiting at all; when idle, a lone request
waits at most ``max_wait``. ``max_batch=1`` is one-request-at-a-time (the baseline).

The queue is bounded: a full queue refuses at once (``QueueFullError`` → HTTP 429 with
Retry-After) rather than letting latency grow without limit, and every wait has a timeout
(``TimeoutError`` → 504). An item whose request gave up (timeout, client gone) is skipped, not
computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFullError(RuntimeError):
    """The batcher's queue is full; the caller should retry later."""


@dataclass
class BatchStats:
    """Counters for monitoring and tests: batches run, items computed, largest batch, and the
    seconds spent computing batches (against wall time, how busy the model is)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    busy_s: float = 0.0
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))

    @property
    def mean_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "largest": self.largest,
                "mean_size": round(self.mean_size, 2), "busy_s": round(self.busy_s, 3)}


class DynamicBatcher(Generic[Item, Result]):
    """Collects items into batches for ``run_batch(items) -> results`` (same length, same order),
    which runs on ``executor`` (one model thread: batches never overlap)."""

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], executor: Executor,
                 *, max_batch: int = 32, max_wait_s: float = 0.005, max_queue: int = 1024,
                 name: str = "batcher") -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_queue = max_queue
        self.name = name
        self.stats = BatchStats()
        self._queue: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        """Start the collector on the running event loop."""
        if self._task is None:
            self._arrived = asyncio.Event()
            self._task = asyncio.create_task(self._collect(), name=self.name)

    async def stop(self) -> None:
        """Stop collecting; waiting requests fail with ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, item: Item, timeout: float | None = None) -> Result:
        """The result for ``item``; raises ``QueueFullError``, ``TimeoutError`` or whatever
        the batch function raised."""
        if self._task is None or self._arrived is None:
            raise RuntimeError(f"{self.name} is not started")
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(f"{self.name}: {len(self._queue)} items already queued")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._arrived.set()
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{self.name}: no result within {timeout:g} s") from None

    async def submit_many(self, items: Sequence[Item], timeout: float | None = None
                          ) -> list[Result]:
        """Results for several items (they may land in different batches)."""
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFullError(f"{self.name}: no room for {len(items)} more items")
        return list(await asyncio.gather(*(self.submit(i, timeout) for i in items)))

    async def _collect(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait_s
            batch = self._take(self.max_batch)
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if not self._queue:
                    self._arrived.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                batch.extend(self._take(self.max_batch - len(batch)))
            if batch:
                await self._run(batch)

    def _timed(self, items: list[Item]) -> Sequence[Result]:
        started = time.perf_counter()
        try:
            return self.run_batch(items)
        finally:
            self.stats.busy_s += time.perf_counter() - started

    def _take(self, limit: int) -> list[tuple[Item, asyncio.Future[Result]]]:
        taken = []
        while self._queue and len(taken) < limit:
            item, future = self._queue.popleft()
            if not future.done():  # cancelled: its request timed out or went away
                taken.append((item, future))
        return taken

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self._timed, items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
        except Exception as err:  # the batch failed: every request in it gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.largest = max(self.stats.largest, len(items))
        self.stats.sizes.append(len(items))
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
