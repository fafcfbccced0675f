"""A collector that turns concurrent calls, each with one item, into one call with all of them.

Each caller puts its item on a queue and awaits a future; one task takes everything queued, writes
it in one call, and resolves the futures. While one batch is written the next one fills, so the
batch size follows the load by itself; an item that finds the writer idle is written by its caller
at once. Optionally the writer waits briefly for a worthwhile batch (``worth_waiting``), and
several writers can write at once (``writers``, for a database server's round trips). Used for
PostgreSQL's grouped writes (``store.database``) and the webhook sender's recordings; SQLite's
writes are grouped by ``SQLiteDatabase`` itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class WriteBatcher(Generic[Item, Result]):
    def __init__(
        self,
        write: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        name: str,
        max_batch: int = 1000,
        worth_waiting: Callable[[int], bool] | None = None,
        max_wait_seconds: float = 0.01,
        writers: int = 1,
    ) -> None:
        self._write = write
        self._name = name
        self._max_batch = max_batch
        # Optional: while worth_waiting(items queued) says more items are coming soon, the writer
        # waits up to max_wait_seconds for them (where a bigger batch is much cheaper per item).
        self._worth_waiting = worth_waiting
        self._max_wait_seconds = max_wait_seconds
        self._enough = asyncio.Event()
        self._filling: int | None = None  # items taken while waiting for more
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] = asyncio.Queue()
        # With several writers, one collects the next batch while the others' writes are in
        # flight (worth it where a write waits on round trips to a database server).
        self._writers = writers
        self._collecting = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._writing = 0  # writes in progress (by callers or the writer task)

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name=self._name) for _ in range(self._writers)
            ]

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if not self._tasks:
            return
        await self._queue.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def submit(self, item: Item) -> Result:
        """Write ``item`` (with whatever else is queued); returns once it is committed. An item
        that finds the writer idle is written at once by its caller (no hop to the writer task);
        items that come meanwhile queue and go together."""
        if self._writing or not self._queue.empty() or self._worth_waiting is not None:
            return await self.put(item)
        self._writing += 1
        try:
            [result] = await self._write([item])
        finally:
            self._writing -= 1
        return result

    def put(self, item: Item) -> asyncio.Future[Result]:
        """Queue ``item``; the future resolves once it is committed (or with the error)."""
        self.start()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        filling, worth_waiting = self._filling, self._worth_waiting
        if (
            filling is not None
            and worth_waiting
            and not worth_waiting(filling + self._queue.qsize())
        ):
            self._enough.set()  # the batch being filled is worth writing now
        return future

    async def _run(self) -> None:
        while True:
            async with self._collecting:
                batch = [await self._queue.get()]
                while len(batch) < self._max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                if self._worth_waiting is not None and self._worth_waiting(len(batch)):
                    await self._fill(batch)
            self._writing += 1
            try:
                results = await self._write([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
            finally:
                self._writing -= 1
            for _ in batch:
                self._queue.task_done()

    async def _fill(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        self._enough.clear()
        self._filling = len(batch)
        try:
            async with asyncio.timeout(self._max_wait_seconds):
                await self._enough.wait()  # put() sets it once the batch is worth writing
        except TimeoutError:
            pass
        finally:
            self._filling = None
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
