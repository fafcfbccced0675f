"""How store code reaches a database: every operation is a plain function over a SQLAlchemy
``Connection``, run as one transaction by :meth:`Database.write` or :meth:`Database.read`.

Writing the operations synchronously lets each database run them its best way:

* SQLite (stdlib ``sqlite3``): writes queue for one writer task, which runs what queued up
  together as one transaction, each write in a savepoint of its own (a write that fails is undone
  alone and its caller gets the error): under load one commit, one fsync and one hand-off to the
  writer thread serve many writes (measured on the streaming benchmark at c=100: 2.0-2.2 ms of
  CPU per stream instead of 2.8-3.4). A transaction starts with ``BEGIN IMMEDIATE`` (so it never fails
  half-way on a lock upgrade) and its statements run right in the event loop when the database
  is free: short transactions cost less there than a hand-off to a thread, whose every GIL
  re-acquisition waits behind the busy loop (measured: a 32-row accept batch took 24 ms on a
  thread, 2 ms in the loop). Its COMMIT, an fsync, runs on the writer thread, which drops the GIL
  while the disk works, so the loop keeps serving meanwhile (the processes shorten the GIL switch
  interval, see ``cli.tune_interpreter``); a batch of only ``bulk`` writes commits in the loop,
  and so does a lone write while the process is quiet (``quiet``, set by the gateway).
  When another process holds the write lock, the whole batch moves to the writer thread, which
  waits for it, so the loop never blocks on a lock. Reads run on a few reader threads, which WAL
  lets run beside the writer.
* PostgreSQL (asyncpg): the same function runs in the event loop through SQLAlchemy's
  ``run_sync`` bridge; no threads.

Errors are translated here, at the boundary, into :mod:`hookline.errors`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy import Connection, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from hookline.errors import InvalidRequest, StoreError, StoreUnavailable

log = logging.getLogger("hookline.store")
T = TypeVar("T")
Operation = Callable[[Connection], T]

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # FULL: a commit is on disk before we answer 202. Batching accepts keeps the fsyncs few.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)
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


class _WriteLockTaken(Exception):
    """Another process holds SQLite's write lock."""


class Database(abc.ABC):
    dialect: str

    @abc.abstractmethod
    async def write(self, operation: Operation[T], *, bulk: bool = False) -> T:
        """Run ``operation`` in one read-write transaction and commit it. ``bulk``: a large
        batched write, worth committing where it is cheapest in CPU rather than where the event
        loop waits least (SQLite: in the loop rather than on the writer thread)."""

    @abc.abstractmethod
    async def read(self, operation: Operation[T]) -> T:
        """Run ``operation`` on a connection that sees committed data."""

    @abc.abstractmethod
    async def dispose(self) -> None: ...


class SQLiteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, url: str) -> None:
        self._loop_engine = self._engine(url, writer=True, busy_timeout_ms=0)
        self._writer_engine = self._engine(url, writer=True)
        self._reader_engine = self._engine(url, writer=False)
        self._pending: collections.deque[_PendingWrite] = collections.deque()
        self._have_writes = asyncio.Event()
        self._writing = False  # a transaction is in progress (inline or in the writer task)
        # Set by the gateway: True while this process is quiet (at most one job running). A lone
        # write then commits in the event loop: the fsync is short, and the hand-off to the writer
        # thread (waiting for the GIL behind the loop) would cost the waiting caller more. Under
        # load the thread lets the loop serve during commits and the writes meanwhile batch up.
        self.quiet: Callable[[], bool] = lambda: False
        self._writer_task: asyncio.Task[None] | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = concurrent.futures.ThreadPoolExecutor(
            _SQLITE_READERS, thread_name_prefix="sqlite-reader"
        )

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
        # A write that finds the database idle runs at once, in the caller's task. Writes that
        # come meanwhile queue for the writer task, which runs what queued up together as one
        # transaction (each write in a savepoint of its own): under load one commit, one fsync
        # and one hand-off to the writer thread serve many writes.
        pending: _PendingWrite = _PendingWrite(operation, bulk)
        if not self._writing and not self._pending:
            self._writing = True
            try:
                await self._write_batch([pending])
            except Exception as exc:  # a bug: the caller gets it, the others go on
                if not pending.future.done():
                    pending.future.set_exception(exc)
            finally:
                self._writing = False
                if self._pending:
                    self._wake_writer()
        else:
            self._pending.append(pending)
            self._wake_writer()
        result: T = await pending.future
        return result

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
        if not any(w.ok for w in batch):
            conn.close()  # nothing to keep: roll back
            _deliver(batch)
            return
        if all(w.bulk for w in batch) or (len(batch) == 1 and not self._pending and self.quiet()):
            # Measured with the webhook sender's batches: the hand-off to the thread and the
            # GIL traffic around it cost more CPU per message than the loop's short stall.
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
        self._loop_engine.dispose()
        self._writer_engine.dispose()
        self._reader_engine.dispose()


class PostgresDatabase(Database):
    dialect = "postgresql"

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
        )

    async def write(self, operation: Operation[T], *, bulk: bool = False) -> T:
        return await self._run(operation, commit=True)

    async def read(self, operation: Operation[T]) -> T:
        return await self._run(operation, commit=False)

    async def _run(self, operation: Operation[T], *, commit: bool) -> T:
        try:
            async with self.engine.connect() as conn:
                result = await conn.run_sync(operation)
                if commit:
                    await conn.commit()
                return result
        except (sa_exc.SQLAlchemyError, OSError, TimeoutError) as exc:
            raise translate_error(exc) from exc

    async def dispose(self) -> None:
        await self.engine.dispose()


_MAX_WRITES_PER_TRANSACTION = 200


class _PendingWrite:
    """A write waiting for the writer task, then its outcome."""

    __slots__ = ("bulk", "future", "ok", "operation", "outcome")

    def __init__(self, operation: Operation[Any], bulk: bool) -> None:
        self.operation = operation
        self.bulk = bulk
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.ok = False
        self.outcome: Any = None


def _run_writes(conn: Connection, batch: list[_PendingWrite]) -> None:
    """Run each write of a batch; a write that fails is undone alone (its savepoint), and its
    caller gets the error. A batch of one needs no savepoint."""
    savepoints = len(batch) > 1
    for write in batch:
        if savepoints:
            _driver_sql(conn, "SAVEPOINT hookline_write")
        try:
            write.outcome = write.operation(conn)
        except Exception as exc:
            if savepoints:
                _driver_sql(conn, "ROLLBACK TO hookline_write")
                _driver_sql(conn, "RELEASE hookline_write")
            write.outcome = _translated(exc)
            if not savepoints:
                return
            continue
        if savepoints:
            _driver_sql(conn, "RELEASE hookline_write")
        write.ok = True


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
        if not write.future.done():
            write.future.set_exception(exc)


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
