"""The accept path's single writer: concurrent submissions are grouped into one transaction each.

A per-request INSERT + COMMIT costs one fsync and (on aiosqlite) several thread hand-offs per job.
Here every request puts its job on a queue and awaits a future; one task takes everything queued, writes
it in one transaction, and resolves the futures. While one batch commits the next one fills, so the
batch size follows the load by itself and an idle gateway still commits each job at once.
"""

from __future__ import annotations

import asyncio
import contextlib

from hookline.events import NewEvent
from hookline.jobs import Job
from hookline.store.base import AcceptOutcome, Store

_Item = tuple[Job, NewEvent, "asyncio.Future[AcceptOutcome]"]


class AcceptBatcher:
    def __init__(self, store: Store, max_batch: int = 1000) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="hookline-accept-writer")

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def insert(self, job: Job, event: NewEvent) -> AcceptOutcome:
        """Durably insert ``job`` with its first event; returns once it is committed."""
        self.start()
        future: asyncio.Future[AcceptOutcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, event, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                outcomes = await self._store.insert_jobs([(job, event) for job, event, _ in batch])
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
            for _ in batch:
                self._queue.task_done()
