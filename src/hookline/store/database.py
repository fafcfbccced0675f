"""How store code reaches a database: every operation is a plain function over a SQLAlchemy
``Connection``, run as one transaction by :meth:`Database.write` or :meth:`Database.read`; a write
that many callers make at once (accepting a job) is a :class:`GroupedWrite`, which the database
runs for everything that arrives together in one call.

* SQLite (stdlib ``sqlite3``) is the one place that groups SQLite writes: a write that finds the
  database idle runs at once in its caller's task; writes that come meanwhile queue, and the next
  transaction runs all of them (each in a savepoint, so a failing write is undone alone, and the
  items of one grouped write in one call). Statements run in the event loop; the COMMIT (the
  fsync) runs on a writer thread, so the loop serves and the next batch fills meanwhile. Only a
  lone write in a quiet process commits in the loop. Reads run on a few reader threads beside
  the writer (WAL).
* PostgreSQL (asyncpg): every write is its own transaction in the event loop; a grouped write's
  items that arrive while one of its calls is in flight go together in the next (round trips,
  not fsyncs, are the cost there).

The measurements behind these choices are in docs/benchmarks.md. Errors are translated here, at
the boundary, into :mod:`hookline.errors`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy import Connection, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from hookline.errors import InvalidRequest, StoreError, StoreFull, StoreUnavailable
from hookline.store.group_commit import WriteBatcher

log = logging.getLogger("hookline.store")
T = TypeVar("T")
Item = TypeVar("Item")
Result = TypeVar("Result")
Operation = Callable[[Connection], T]

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # FULL: a commit is on disk before we answer 202. Batching accepts keeps the fsyncs few.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    # After a checkpoint the WAL file is cut back to this size: without it, it keeps its largest
    # size for ever, and after a full disk it grows back into whatever space was freed.
    f"PRAGMA journal_size_limit={64 * 1024 * 1024}",
)
# How long after a write failed on a full disk /readyz keeps saying so; below how much free space
# it says so anyway; how often an idle WAL is cut back.
_FULL_DISK_MEMORY_SECONDS = 10.0
_MIN_FREE_BYTES = 4 * 1024 * 1024
_CHECKPOINT_SECONDS = 300.0
_SQLITE_READERS = 4
# PostgreSQL's codes for "not now": connection exceptions (08…), a server shutting down or
# starting up (57P01-57P03), too many connections (53300).
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")
_UNAVAILABLE_MARKERS = (
    "connection",
    "could not connect",
    "database is locked",
    "closed",
    "timeout",
)


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def translate_error(exc: BaseException) -> StoreError:
    """Our exception for a driver's (the cause stays attached by the caller's ``raise … from``)."""
    if _disk_full(exc):
        return StoreFull("the database's disk is full: nothing was written")
    if isinstance(exc, (OSError, ConnectionError)):
        return StoreUnavailable(f"database unreachable: {exc}")
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return StoreUnavailable(f"database connection lost: {exc.orig}")
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    if sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
        return StoreUnavailable(f"database unavailable: {getattr(exc, 'orig', exc)}")
    if isinstance(exc, TimeoutError):
        return StoreUnavailable("database did not answer in time")
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        text = str(exc).lower()
        if any(marker in text for marker in _UNAVAILABLE_MARKERS):
            return StoreUnavailable(f"database unavailable: {exc}")
    return StoreError(f"database error: {exc}")


@dataclasses.dataclass(frozen=True, eq=False)
class GroupedWrite(Generic[Item, Result]):
    """A write that many callers make at once, each with its own item (accepting a job). The
    database runs the items that arrive together in one call, ``run(conn, items)``, which
    returns one result per item, in order: one multi-row statement instead of one per item. If
    such a call fails, each of its items is tried alone, so a bad item fails only its caller."""

    name: str
    run: Callable[[Connection, list[Item]], list[Result]]


# A lone write commits in the event loop only when the one before it ended this long ago: writes
# closer together are load, and a commit in the loop would keep the next ones from grouping.
_QUIET_GAP_SECONDS = 0.002


def _disk_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100), or the operating system's ENOSPC."""
    orig = getattr(exc, "orig", exc)
    if isinstance(orig, OSError) and orig.errno == errno.ENOSPC:
        return True
    if isinstance(orig, sqlite3.Error):
        return getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "database or disk is full" in str(orig)
        )
    return getattr(orig, "sqlstate", None) == "53100"


class _StaleConnection(Exception):
    """A connection broke before its transaction committed (the cause is the driver's error)."""


class _WriteLockTaken(Exception):
    """Another process holds SQLite's write lock."""


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a database offers beyond transactions. The layers above the store ask for these by
    name, never for a dialect: each flag says what it allows, not which database has it."""

    # Processes can wake each other through the database (PostgreSQL's LISTEN/NOTIFY): wake-ups
    # and live output cross between processes over it (hookline.live.broadcast).
    listen_notify: bool
    # The file that the processes sharing the database open on this host (SQLite), else None:
    # live output crosses over Unix sockets beside it (hookline.live.relay), and the first process to
    # open it ends the leases of processes that died (Database.join_processes).
    file_path: str | None
    # Write transactions run side by side, each waiting on round trips to a server (PostgreSQL):
    # a writer that waits on them gains from a second one. Else writes run one at a time.
    concurrent_writers: bool
    # The database commits a lone write differently in a quiet process: tell it, with
    # Database.hint_quiet, how to know (SQLite).
    quiet_hint: bool
    # Processes on other machines may use the database at once (PostgreSQL): what it counts
    # across processes, such as an upstream's running jobs, may change at any moment, so work
    # counted against such a limit waits for its count to commit.
    shared_across_hosts: bool

    @property
    def shares_a_file(self) -> bool:
        """Processes share the database as a file on this host."""
        return self.file_path is not None


class Database(abc.ABC):
    dialect: str  # a name for logs and for SQL the store writes per dialect; nothing to branch on
    capabilities: Capabilities

    @abc.abstractmethod
    async def write(self, operation: Operation[T], *, bulk: bool = False) -> T:
        """Run ``operation`` in one read-write transaction and commit it. ``bulk``: a large
        batched write, worth committing where it is cheapest in CPU rather than where the event
        loop waits least (SQLite: in the loop rather than on the writer thread)."""

    @abc.abstractmethod
    async def write_grouped(self, group: GroupedWrite[Item, Result], item: Item) -> Result:
        """Write ``item`` together with the other items of ``group`` that arrive meanwhile; returns
        its result once it is committed."""

    @abc.abstractmethod
    async def read(self, operation: Operation[T]) -> T:
        """Run ``operation`` on a connection that sees committed data."""

    @abc.abstractmethod
    async def dispose(self) -> None: ...

    def hint_quiet(self, quiet: Callable[[], bool]) -> None:
        """``quiet()`` says whether this process is quiet now (at most one job running): a
        database with ``capabilities.quiet_hint`` commits a lone write accordingly; others
        ignore it."""
        del quiet

    async def join_processes(self) -> bool:
        """Count this process among those using a database shared as a file
        (``capabilities.file_path``). True if no other process had it open: every lease in it
        belongs to a process that is gone. Call :meth:`shared` once those leases are dealt
        with. Databases shared otherwise always answer False."""
        return False

    def shared(self) -> None:
        """After :meth:`join_processes` returned True: let other processes join."""
        return None

    _full_at = -1e9  # time.monotonic() of the last write refused for a full disk

    def storage_problem(self) -> str | None:
        """Why the database cannot take writes now (for readiness), or None."""
        if time.monotonic() - self._full_at < _FULL_DISK_MEMORY_SECONDS:
            return "the database's disk is full: writes fail until space is freed"
        return None

    def _note_failure(self, exc: BaseException) -> None:
        if isinstance(exc, StoreFull):
            self._full_at = time.monotonic()


class SQLiteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, url: str) -> None:
        self._path = sqlite_path(url)
        self.capabilities = Capabilities(
            listen_notify=False,
            file_path=self._path,
            concurrent_writers=False,
            quiet_hint=True,
            shared_across_hosts=False,
        )
        self._loop_engine = self._engine(url, writer=True, busy_timeout_ms=0)
        self._writer_engine = self._engine(url, writer=True)
        self._reader_engine = self._engine(url, writer=False)
        self._pending: collections.deque[_PendingWrite] = collections.deque()
        self._have_writes = asyncio.Event()
        self._writing = False  # a transaction is in progress (inline or in the writer task)
        self._last_write_ended = 0.0  # time.monotonic()
        # Set by the gateway (hint_quiet): True while this process runs at most one job. A lone
        # write in a quiet process (that, and no write just before it) commits in the event loop:
        # the fsync is short, and the hand-off to the writer thread would cost the waiting caller
        # more. Under load the thread lets the loop serve during commits while the next writes
        # queue.
        self.quiet: Callable[[], bool] = lambda: False
        self._writer_task: asyncio.Task[None] | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = concurrent.futures.ThreadPoolExecutor(
            _SQLITE_READERS, thread_name_prefix="sqlite-reader"
        )
        # Checkpoints run on a thread and a connection of their own, never waiting for a lock:
        # the writer's commits do not queue behind them.
        self._checkpoint_engine = self._engine(url, writer=True, busy_timeout_ms=0)
        self._checkpointer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="sqlite-checkpoint"
        )
        self._checkpoint: asyncio.Future[None] | None = None
        self._last_checkpoint = time.monotonic()
        self._presence: int | None = None  # the file descriptor holding the lock

    def hint_quiet(self, quiet: Callable[[], bool]) -> None:
        self.quiet = quiet

    async def join_processes(self) -> bool:
        """Count this process among those using the database file, for as long as it is open
        (an advisory lock on a file beside it, which the kernel drops when a process dies).
        True if no other process had it open: every lease in it belongs to a process that is
        gone. Call :meth:`shared` once those leases are dealt with; until then, other processes
        joining wait."""
        if self._path is None:
            return False
        fd = self._presence = os.open(f"{self._path}.processes", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # others are here: wait (in a thread) for a shared place
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_SH)
            return False
        return True

    def shared(self) -> None:
        """After :meth:`join_processes` returned True: let other processes join."""
        if self._presence is not None:
            fcntl.flock(self._presence, fcntl.LOCK_SH)

    def storage_problem(self) -> str | None:
        problem = super().storage_problem()
        if problem is None and self._path is not None:
            try:
                free = shutil.disk_usage(os.path.dirname(os.path.abspath(self._path))).free
            except OSError:
                return None
            if free < _MIN_FREE_BYTES:
                problem = f"only {free // 1024} KiB free on the database's disk"
        return problem

    def _after_batch(self, batch: list[_PendingWrite]) -> None:
        """Remember a full disk (for readiness), and give the WAL's space back: at once after a
        full disk, else every few minutes (SQLite's own checkpoints never shrink the file)."""
        full = any(isinstance(w.outcome, StoreFull) for w in batch)
        if full:
            self._full_at = time.monotonic()
        if self._checkpoint is not None:
            return
        if full or time.monotonic() - self._last_checkpoint > _CHECKPOINT_SECONDS:
            self._last_checkpoint = time.monotonic()
            self._checkpoint = asyncio.get_running_loop().run_in_executor(
                self._checkpointer, _truncate_wal, self._checkpoint_engine
            )
            self._checkpoint.add_done_callback(self._checkpoint_done)

    def _checkpoint_done(self, done: asyncio.Future[None]) -> None:
        self._checkpoint = None
        if not done.cancelled() and done.exception() is not None:
            log.warning("checkpointing the WAL failed: %s", done.exception())

    @staticmethod
    def _engine(url: str, *, writer: bool, busy_timeout_ms: int = 10_000) -> sa.Engine:
        engine = sa.create_engine(
            url,
            poolclass=sa.pool.QueuePool,
            pool_size=1 if writer else _SQLITE_READERS,
            max_overflow=0,
            connect_args={"check_same_thread": False},
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            hide_parameters=True,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from the driver so that BEGIN is ours (SQLAlchemy's recipe).
            dbapi_connection.isolation_level = None
            for pragma in SQLITE_PRAGMAS:
                dbapi_connection.execute(pragma)
            dbapi_connection.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine

    async def write(self, operation: Operation[T], *, bulk: bool = False) -> T:
        result: T = await self._submit(_PendingWrite(operation, bulk))
        return result

    async def write_grouped(self, group: GroupedWrite[Item, Result], item: Item) -> Result:
        result: Result = await self._submit(_PendingWrite(None, False, group, item))
        return result

    async def _submit(self, pending: _PendingWrite) -> Any:
        # A write that finds the database idle runs at once, in the caller's task. Writes that
        # come meanwhile queue for the writer task, which runs what queued up together as one
        # transaction: under load one commit, one fsync and one hand-off to the writer thread
        # serve many writes.
        if not self._writing and not self._pending:
            self._writing = True
            try:
                await self._write_batch([pending])
            except Exception as exc:  # a bug: the caller gets it, the others go on
                if not pending.future.done():
                    pending.future.set_exception(exc)
            finally:
                self._writing = False
                self._last_write_ended = time.monotonic()
                self._after_batch([pending])
                if self._pending:
                    self._wake_writer()
        else:
            self._pending.append(pending)
            self._wake_writer()
        return await pending.future

    def _wake_writer(self) -> None:
        self._have_writes.set()
        if self._writer_task is None:
            self._writer_task = asyncio.create_task(self._write_loop(), name="hookline-sqlite")

    async def _write_loop(self) -> None:
        while True:
            await self._have_writes.wait()
            self._have_writes.clear()
            while self._pending and not self._writing:
                batch = [w for w in self._take_batch() if not w.future.done()]  # not cancelled
                if not batch:
                    continue
                self._writing = True
                try:
                    await self._write_batch(batch)
                except asyncio.CancelledError:
                    _fail(batch, StoreUnavailable("the database is closing"))
                    raise
                except Exception as exc:  # a bug: answer the callers, keep writing for others
                    log.exception("writing a batch failed")
                    _fail(batch, StoreError(f"database error: {exc}"))
                finally:
                    self._writing = False
                    self._last_write_ended = time.monotonic()
                    self._after_batch(batch)

    def _take_batch(self) -> list[_PendingWrite]:
        count = min(len(self._pending), _MAX_WRITES_PER_TRANSACTION)
        return [self._pending.popleft() for _ in range(count)]

    async def _write_batch(self, batch: list[_PendingWrite]) -> None:
        try:
            conn = self._begin_in_loop()
        except _WriteLockTaken:
            # Another process writes: the whole batch waits for the lock on the writer thread.
            engine = self._writer_engine
            committed = asyncio.get_running_loop().run_in_executor(
                self._writer, _run_batch, engine, batch
            )
            await _settle(batch, committed)
            return
        except sa_exc.SQLAlchemyError as exc:
            _fail(batch, _translated(exc))
            return
        try:
            _run_writes(conn, batch)
        except sa_exc.SQLAlchemyError as exc:  # the transaction itself broke (a savepoint's undo)
            conn.close()
            _fail(batch, _translated(exc))
            return
        except BaseException:  # an error while handling an error: the connection is given back
            conn.close()
            raise
        if not any(w.ok for w in batch):
            conn.close()  # nothing to keep: roll back
            _deliver(batch)
            return
        if all(w.bulk for w in batch) or (len(batch) == 1 and self._is_quiet()):
            # Bulk writes (the webhook sender's batches): the hand-off to the thread and the GIL
            # traffic around it cost more CPU per message than the loop's short stall.
            try:
                _commit(conn)
            except sa_exc.SQLAlchemyError as exc:
                _fail(batch, _translated(exc))
            else:
                _deliver(batch)
            return
        # The COMMIT (an fsync) runs on the writer thread, which drops the GIL while it waits for
        # the disk: the loop goes on serving (say, a stream's upstream call) instead of standing
        # still for it.
        committed = asyncio.get_running_loop().run_in_executor(self._writer, _commit, conn)
        await _settle(batch, committed)

    def _is_quiet(self) -> bool:
        """No other write waits, none ended just before this one, and the gateway says the
        process is quiet: a commit in the loop then delays nobody."""
        return (
            not self._pending
            and time.monotonic() - self._last_write_ended > _QUIET_GAP_SECONDS
            and self.quiet()
        )

    def _begin_in_loop(self) -> Connection:
        conn = self._loop_engine.connect()
        try:
            conn.begin()  # BEGIN IMMEDIATE, failing at once if another process writes
        except sa_exc.OperationalError as exc:
            conn.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise _WriteLockTaken from exc
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    async def read(self, operation: Operation[T]) -> T:
        return await self._run(self._readers, self._reader_engine, operation)

    @staticmethod
    async def _run(
        executor: concurrent.futures.Executor, engine: sa.Engine, operation: Operation[T]
    ) -> T:
        def transaction() -> T:
            with engine.begin() as conn:
                return operation(conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(executor, transaction)
        except sa_exc.SQLAlchemyError as exc:
            raise translate_error(exc) from exc

    async def dispose(self) -> None:
        if self._writer_task is not None:
            with contextlib.suppress(StoreError):
                await self.write(lambda conn: None)  # done once every write before it is
            self._writer_task.cancel()
            await asyncio.gather(self._writer_task, return_exceptions=True)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        self._checkpoint_engine.dispose()
        if self._presence is not None:
            os.close(self._presence)  # the lock goes with it
            self._presence = None
        self._loop_engine.dispose()
        self._writer_engine.dispose()
        self._reader_engine.dispose()


class PostgresDatabase(Database):
    dialect = "postgresql"
    capabilities = Capabilities(
        listen_notify=True,
        file_path=None,
        concurrent_writers=True,
        quiet_hint=False,
        shared_across_hosts=True,
    )

    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(
            url,
            pool_size=20,
            max_overflow=0,
            # The connection used last is used next: a few connections do the work, their
            # prepared statements (asyncpg caches them per connection) stay warm.
            pool_use_lifo=True,
            # No ping before each use: it was a round trip per transaction (-12% webhook messages/s).
            # A connection broken by a server restart fails its first use instead (a 503, or a
            # retried worker write), and SQLAlchemy then drops every pooled connection older than
            # the failure, so the next transactions reconnect.
            pool_pre_ping=False,
            # Fail fast while the server is away (clients get a 503, never a hang).
            pool_timeout=10,
            connect_args={"timeout": 5},
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            hide_parameters=True,
        )
        self._groups: dict[GroupedWrite[Any, Any], WriteBatcher[Any, _ItemOutcome]] = {}

    async def write(self, operation: Operation[T], *, bulk: bool = False) -> T:
        return await self._run(operation, commit=True)

    async def write_grouped(self, group: GroupedWrite[Item, Result], item: Item) -> Result:
        batcher = self._groups.get(group)
        if batcher is None:
            batcher = WriteBatcher(
                lambda items: self._write_items(group, items), name=f"hookline-{group.name}"
            )
            self._groups[group] = batcher
        outcome = await batcher.submit(item)
        if not outcome.ok:
            raise outcome.value
        result: Result = outcome.value
        return result

    async def _write_items(
        self, group: GroupedWrite[Item, Result], items: list[Item]
    ) -> list[_ItemOutcome]:
        """One transaction for all ``items``; if it fails, one each (so only the bad one fails)."""
        try:
            results = await self.write(lambda conn: group.run(conn, items))
        except Exception as exc:
            if len(items) == 1:
                return [_ItemOutcome(False, exc)]
        else:
            return [_ItemOutcome(True, result) for result in results]
        return [(await self._write_items(group, [item]))[0] for item in items]

    async def read(self, operation: Operation[T]) -> T:
        return await self._run(operation, commit=False)

    async def _run(self, operation: Operation[T], *, commit: bool) -> T:
        try:
            try:
                return await self._once(operation, commit=commit)
            except _StaleConnection:
                # A pooled connection the server had closed (it restarted): SQLAlchemy has
                # dropped the pool's older connections, and nothing was committed. Once more,
                # on a fresh connection, rather than a 503 per pooled connection.
                return await self._once(operation, commit=commit)
        except _StaleConnection as stale:
            exc: BaseException = stale.__cause__ or stale
        except (sa_exc.SQLAlchemyError, OSError, TimeoutError) as error:
            exc = error
        translated = translate_error(exc)
        self._note_failure(translated)
        raise translated from exc

    async def _once(self, operation: Operation[T], *, commit: bool) -> T:
        async with self.engine.connect() as conn:
            try:
                result = await conn.run_sync(operation)
            except sa_exc.DBAPIError as exc:
                if exc.connection_invalidated:  # before COMMIT: the server rolled it back
                    raise _StaleConnection from exc
                raise
            if commit:
                await conn.commit()  # never repeated: a failure here may follow a commit
            return result

    async def dispose(self) -> None:
        for batcher in self._groups.values():
            await batcher.stop()
        self._groups.clear()
        await self.engine.dispose()


@dataclasses.dataclass(frozen=True, slots=True)
class _ItemOutcome:
    ok: bool
    value: Any  # the item's result, or the exception it failed with


_MAX_WRITES_PER_TRANSACTION = 200


class _PendingWrite:
    """A write waiting for its transaction, then its outcome: an operation, or one item of a
    grouped write."""

    __slots__ = ("bulk", "future", "group", "item", "ok", "operation", "outcome")

    def __init__(
        self,
        operation: Operation[Any] | None,
        bulk: bool,
        group: GroupedWrite[Any, Any] | None = None,
        item: Any = None,
    ) -> None:
        self.operation = operation
        self.bulk = bulk
        self.group = group
        self.item = item
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.ok = False
        self.outcome: Any = None


def _run_writes(conn: Connection, batch: list[_PendingWrite]) -> None:
    """Run each write of a batch, the items of one grouped write in one call; a write that fails
    is undone alone (its savepoint), and its caller gets the error. A batch of one needs no
    savepoint."""
    units: dict[object, list[_PendingWrite]] = {}
    for write in batch:
        units.setdefault(write.group if write.group is not None else write, []).append(write)
    savepoints = len(batch) > 1
    for unit in units.values():
        if len(unit) == 1:
            if not _run_unit(conn, unit, savepoints) and not savepoints:
                return
        elif not _run_unit(conn, unit, True):
            for write in unit:  # the group's call failed: find the item(s) that made it fail
                _run_unit(conn, [write], True)


def _run_unit(conn: Connection, unit: list[_PendingWrite], savepoint: bool) -> bool:
    """One write, or several items of one grouped write in one call; True if it succeeded."""
    if savepoint:
        _driver_sql(conn, "SAVEPOINT hookline_write")
    try:
        first = unit[0]
        if first.group is None:
            assert first.operation is not None
            outcomes = [first.operation(conn)]
        else:
            outcomes = first.group.run(conn, [write.item for write in unit])
    except Exception as exc:
        if savepoint:
            _driver_sql(conn, "ROLLBACK TO hookline_write")
            _driver_sql(conn, "RELEASE hookline_write")
        for write in unit:
            write.outcome = _translated(exc)
        return False
    if savepoint:
        _driver_sql(conn, "RELEASE hookline_write")
    for write, outcome in zip(unit, outcomes, strict=True):
        write.outcome = outcome
        write.ok = True
    return True


def _driver_sql(conn: Connection, statement: str) -> None:
    """A statement run on SQLite's own connection, past SQLAlchemy. For the savepoints around
    each write of a batch: SQLAlchemy's nested transactions cost ~4% of a facade stream's CPU
    under load, for the same two statements."""
    try:
        conn.connection.driver_connection.execute(statement)  # type: ignore[union-attr]
    except sqlite3.Error as exc:
        raise sa_exc.OperationalError(statement, None, exc) from exc


def _run_batch(engine: sa.Engine, batch: list[_PendingWrite]) -> None:
    """A whole batch on the writer thread (another process held the write lock)."""
    with engine.connect() as conn:
        conn.begin()
        _run_writes(conn, batch)
        if any(w.ok for w in batch):
            conn.commit()


async def _settle(batch: list[_PendingWrite], committed: asyncio.Future[None]) -> None:
    """Wait for a commit running on the writer thread, then answer the batch's callers. The
    writer task is not cancelled half-way: the connection is the thread's until it is done."""
    try:
        await asyncio.shield(committed)
    except asyncio.CancelledError:
        await asyncio.wait([committed])
        raise
    except Exception as exc:
        _fail(batch, _translated(exc))
        return
    _deliver(batch)


def _translated(exc: BaseException) -> BaseException:
    """A driver error as the store's error (with the driver's as its cause); others as they are."""
    if not isinstance(exc, sa_exc.SQLAlchemyError):
        return exc
    translated = translate_error(exc)
    translated.__cause__ = exc
    return translated


def _deliver(batch: list[_PendingWrite]) -> None:
    for write in batch:
        if write.future.done():
            continue
        if write.ok:
            write.future.set_result(write.outcome)
        else:
            write.future.set_exception(
                write.outcome
                if isinstance(write.outcome, BaseException)
                else StoreError("not written: an earlier write of its transaction failed")
            )


def _fail(batch: list[_PendingWrite], exc: BaseException) -> None:
    for write in batch:
        write.outcome = exc
        if not write.future.done():
            write.future.set_exception(exc)


def _truncate_wal(engine: sa.Engine) -> None:
    """Copy the WAL into the database and cut it to nothing, if no reader or writer is in the way
    (then it returns at once, to try again later)."""
    with engine.connect() as conn:  # no statement through SQLAlchemy: no BEGIN
        conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]


def _commit(conn: Connection) -> None:
    try:
        conn.commit()
    finally:
        conn.close()


def chosen_once(query: sa.Select[tuple[str]], name: str) -> sa.Select[tuple[str]]:
    """``SELECT id FROM (query)``, for ``UPDATE … WHERE id IN (…)``, with ``query`` evaluated
    exactly once. A plain ``IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`` may be re-run by
    PostgreSQL's plan, each run skipping the rows the last one locked, and so claim more than
    ``n`` rows; a materialized CTE cannot be."""
    chosen = query.cte(name).prefix_with("MATERIALIZED")
    return sa.select(chosen.c.id)


def sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite:///`` URL (None for other databases and in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


def open_database(url: str) -> Database:
    """A :class:`Database` for a plain ``sqlite:///…`` or ``postgresql://…`` URL."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidRequest(f"not a database URL: {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return SQLiteDatabase(str(parsed.set(drivername="sqlite+pysqlite")))
    if backend in ("postgresql", "postgres"):
        driver_url = parsed.set(drivername="postgresql+asyncpg")
        return PostgresDatabase(driver_url.render_as_string(hide_password=False))
    raise InvalidRequest(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
