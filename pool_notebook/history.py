"""Request history: one row per request, in compact columns, persisted to SQLite.

Recording is on the request path, so it only appends to typed arrays
(``array.array``; a row's strings are interned as one key): about a microsecond
and under 100 bytes per request. A background writer thread copies new and
updated rows to SQLite (WAL) every ``interval`` seconds (0.5 s), so a killed
process loses at most the last second; ``SIGTERM`` and interpreter exit flush
everything first. A row is written once per request whatever its outcome; a
late reply updates its request's row instead of adding another.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import logging
import os
import signal
import sqlite3
import sys
import threading
import types
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

from ._enums import StrEnum
from .errors import HistoryError
from .registry import home

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMNS", "Counts", "History", "Outcome", "counts_from_metrics",
           "counts_from_usage", "default_path", "summary"]

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """How a request ended, as ``Reply.outcome`` and the history's ``outcome`` column."""

    OK = "ok"
    WORKER_ERROR = "worker_error"
    CLIENT_ERROR = "client_error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    LATE_REPLY = "late_reply"



class Counts(NamedTuple):
    """LLM counts of one row; -1 where the worker did not report one."""

    llm_calls: int = -1
    rounds: int = -1
    prompt_tokens: int = -1
    completion_tokens: int = -1


_NO_COUNTS = Counts()
_COUNT_COLUMNS = Counts._fields
_MAX_COUNT = 2**53


def _count(value: Any) -> int:
    """A reported count: a non-negative int (or algocline's ``{"tokens": n}``), else -1."""
    if isinstance(value, Mapping):
        value = value.get("tokens")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT:
        return value
    return -1


def counts_from_usage(usage: Mapping[str, Any] | None) -> Counts | None:
    """Token counts sent with a ``continue`` (``{prompt_tokens, completion_tokens}``)."""
    if not usage:
        return None
    return Counts(prompt_tokens=_count(usage.get("prompt_tokens")),
                  completion_tokens=_count(usage.get("completion_tokens")))


def counts_from_metrics(metrics: Mapping[str, Any] | None) -> Counts | None:
    """Counts of a finished session's metrics, in either shape workers send.

    algocline: ``{"auto": {llm_calls, rounds, prompt_tokens: {"tokens": n, ...},
    response_tokens: {...}}, "custom": {...}}``; the bundled worker's older shape:
    ``{wall_ms, llm_rounds, llm_queries, usage: {prompt_tokens, completion_tokens}}``.
    """
    if not metrics:
        return None
    auto = metrics.get("auto")
    if isinstance(auto, Mapping):
        return Counts(_count(auto.get("llm_calls")), _count(auto.get("rounds")),
                      _count(auto.get("prompt_tokens")), _count(auto.get("response_tokens")))
    usage = metrics.get("usage")
    usage = usage if isinstance(usage, Mapping) else {}
    return Counts(_count(metrics.get("llm_queries")), _count(metrics.get("llm_rounds")),
                  _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


_INT_COLUMNS = ("seq", "worker_pid", "sent_ns", "request_bytes", "response_bytes",
                *_COUNT_COLUMNS, "replayed")
#: The string fields of a row, stored together (with ``replayed``) as one interned "row key".
_KEY_COLUMNS = ("connection", "socket", "worker_version", "op", "session_id", "query_id",
                "outcome", "error_type", "error_message", "feed_state")
_REPLAYED = len(_KEY_COLUMNS)  # the row key's last field: True/False/None
_CAT_COLUMNS = ("kernel_session", *_KEY_COLUMNS)
#: Column order of the DataFrame and of the SQLite table.
COLUMNS = ("seq", "kernel_session", "connection", "socket", "worker_pid", "worker_version", "op",
           "session_id", "query_id", "sent_at", "latency_ms", "outcome", "error_type",
           "error_message", "request_bytes", "response_bytes", "feed_state", *_COUNT_COLUMNS,
           "replayed")
_SQL_COLUMNS = tuple("sent_ns" if c == "sent_at" else c for c in COLUMNS)
_RESULT_FIELDS = tuple(_KEY_COLUMNS.index(c) for c in
                       ("outcome", "feed_state", "error_type", "error_message"))

_RowKey = tuple[str | bool | None, ...]

#: A new row's numbers, in the order of _INSERT_ROW's parameters.
_ROW_FIELDS = ("seq", "worker_pid", "sent_ns", "latency_ms", "request_bytes", "response_bytes",
               *_COUNT_COLUMNS)
_INSERT_KEY = (f"INSERT OR REPLACE INTO temp.row_keys VALUES "
               f"({', '.join('?' * (len(_KEY_COLUMNS) + 3))})")
_INSERT_ROW = (f"INSERT OR REPLACE INTO requests ({', '.join(_SQL_COLUMNS)}) SELECT "
               + ", ".join(f"?{_ROW_FIELDS.index(c) + 1}" if c in _ROW_FIELDS else f"k.{c}"
                           for c in _SQL_COLUMNS)
               + f" FROM temp.row_keys AS k WHERE k.kid = ?{len(_ROW_FIELDS) + 1}")
_INSERT_WIDE = (f"INSERT OR REPLACE INTO requests ({', '.join(_SQL_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_SQL_COLUMNS))})")


class _Batch(NamedTuple):
    """One write: rows up to ``count``, keys up to ``key_count``."""

    row_count: int
    key_count: int
    keys: list[tuple[Any, ...]]  # (kid, kernel_session, *key): keys new since the last write
    rows: list[tuple[Any, ...]]  # (*_ROW_FIELDS, kid) of rows new since the last write
    updated: list[tuple[Any, ...]]  # whole rows rewritten by update() after their write

#: Seconds between background writes (a row reaches SQLite within about this long).
WRITE_INTERVAL = 0.5


def _plain(value: str | bool | None) -> str | bool | None:
    """A row-key field as SQLite and pandas want it: enums as their plain string value."""
    return str(value) if isinstance(value, str) else value


def _nullable(column: Sequence[int]) -> Iterable[int | None]:
    """A counts column for SQL: -1 (not reported) becomes NULL."""
    if max(column, default=-1) < 0:
        return repeat(None, len(column))
    return [None if value < 0 else value for value in column]


def default_path() -> Path | None:
    """``$POOL_NOTEBOOK_HISTORY`` (empty or ``off`` disables), else ``<home>/history.sqlite``."""
    value = os.environ.get("POOL_NOTEBOOK_HISTORY")
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value)
    return home() / "history.sqlite"


class _FlushRequest:
    """One ``flush()`` waiting for the writer: set when a write covering it is done."""

    __slots__ = ("done", "written")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.written = 0


class History:
    """This kernel's request history, and the SQLite file shared by all kernels.

    Numbers go to ``array.array`` columns; a row's strings form one tuple that is
    interned (requests of a session repeat it), so a row costs one dict lookup
    and a few appends to record. Only the writer thread writes to SQLite.
    """

    def __init__(self, path: Path | None = None, *, kernel_session: str | None = None,
                 interval: float = WRITE_INTERVAL) -> None:
        self.path = path
        self.kernel_session = kernel_session or uuid.uuid4().hex[:12]
        self.interval = interval
        self._pid = array.array("i")
        self._sent = array.array("q")
        self._req = array.array("q")
        self._resp = array.array("q")
        self._counts: dict[int, Counts] = {}  # sparse: most requests report none
        self._kid = array.array("i")
        self._latency = array.array("d")  # appended last: its length is the row count
        self._keys: list[_RowKey] = []
        self._keys_sent = 0  # row keys already in the writer's temp table
        self._key_ids: dict[_RowKey, int] = {}
        self._flushed = 0
        self._dirty: set[int] = set()
        self._lock = threading.Lock()  # update() vs the writer's snapshot
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._requests: list[_FlushRequest] = []
        self._writer: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._failing = False

    def __len__(self) -> int:
        return len(self._latency)

    def _intern(self, key: _RowKey) -> int:
        kid = self._key_ids.get(key)
        if kid is None:
            kid = self._key_ids[key] = len(self._keys)
            self._keys.append(key)
        return kid

    def record(
        self,
        *,
        connection: str,
        socket: str,
        worker_pid: int,
        worker_version: str | None,
        op: str,
        sent_ns: int,
        latency_ms: float,
        outcome: Outcome,
        session_id: str | None = None,
        query_id: str | None = None,
        error_type: str | None = None,
        error_message: str | None = None,
        request_bytes: int = 0,
        response_bytes: int = 0,
        feed_state: str | None = None,
        counts: Counts | None = None,
        replayed: bool | None = None,
    ) -> int:
        """Append one request's row; returns its sequence number (its row index).

        ``replayed``: for a ``continue`` answered by a responder, whether its answer
        came from a replay cache (None when a person typed it).
        """
        key = (connection, socket, worker_version, op, session_id, query_id, outcome,
               error_type, error_message, feed_state, replayed)
        kid = self._key_ids.get(key)
        if kid is None:
            kid = self._intern(key)
        seq = len(self._latency)
        self._kid.append(kid)
        self._pid.append(worker_pid)
        self._sent.append(sent_ns)
        self._req.append(request_bytes)
        self._resp.append(response_bytes)
        if counts is not None:
            self._counts[seq] = counts
        self._latency.append(latency_ms)
        if self._writer is None and self.path is not None:
            self._start_writer()
        return seq

    def update(self, seq: int, *, latency_ms: float, outcome: Outcome, response_bytes: int,
               feed_state: str | None, error_type: str | None = None,
               error_message: str | None = None, counts: Counts | None = None) -> None:
        """Rewrite the result of row ``seq`` (a late reply to a request that gave up)."""
        key = list(self._keys[self._kid[seq]])
        for index, value in zip(_RESULT_FIELDS, (outcome, feed_state, error_type,
                                                 error_message), strict=True):
            key[index] = value
        with self._lock:
            self._kid[seq] = self._intern(tuple(key))
            self._latency[seq] = latency_ms
            self._resp[seq] = response_bytes
            if counts is not None:
                self._counts[seq] = counts
            self._dirty.add(seq)

    def row(self, seq: int) -> dict[str, Any]:
        """One row as a dict (for display, SQLite and tests); missing counts are None."""
        key = self._keys[self._kid[seq]]
        out: dict[str, Any] = dict(zip(_KEY_COLUMNS, map(_plain, key), strict=False))
        out["replayed"] = key[_REPLAYED]
        out.update(seq=seq, kernel_session=self.kernel_session, worker_pid=self._pid[seq],
                   sent_ns=self._sent[seq], request_bytes=self._req[seq],
                   response_bytes=self._resp[seq], latency_ms=self._latency[seq])
        for name, value in zip(_COUNT_COLUMNS, self._counts.get(seq, _NO_COUNTS), strict=True):
            out[name] = None if value < 0 else value
        return out

    # ------------------------------------------------------------- DataFrame

    def frame(self, *, all_sessions: bool = False) -> pd.DataFrame:
        """The history as a DataFrame with proper dtypes.

        ``all_sessions`` reads every kernel's rows from SQLite (flushing ours first).
        """
        import numpy as np
        import pandas as pd

        if all_sessions and self.path is not None:
            self.flush()
            return self._from_sql()
        n = len(self)

        def ints(column: array.array[int], dtype: Any = np.int64) -> Any:
            return np.frombuffer(column, dtype=dtype, count=n).astype(np.int64)

        kids = np.frombuffer(self._kid, dtype=np.int32, count=n)
        data: dict[str, Any] = {
            "seq": np.arange(n, dtype=np.int64),
            "kernel_session": pd.Categorical.from_codes(
                np.zeros(n, dtype=np.int8), categories=pd.Index([self.kernel_session])),
            "worker_pid": ints(self._pid, np.int32),
            "sent_at": pd.DatetimeIndex(ints(self._sent).view("datetime64[ns]"), tz="UTC"),
            "latency_ms": np.frombuffer(self._latency, dtype=np.float64, count=n).copy(),
            "request_bytes": ints(self._req),
            "response_bytes": ints(self._resp),
        }
        counts = np.full((n, 4), -1, dtype=np.int64)
        if self._counts:
            seqs = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            counts[seqs] = np.array(list(self._counts.values()), dtype=np.int64)
        for j, name in enumerate(_COUNT_COLUMNS):
            values = counts[:, j].copy()
            data[name] = pd.arrays.IntegerArray(values, values < 0)
        for j, name in enumerate(_KEY_COLUMNS):
            per_key, categories = pd.factorize(
                pd.Series([None if key[j] is None else str(key[j]) for key in self._keys],
                          dtype=object), use_na_sentinel=True)
            codes = per_key[kids] if len(per_key) else np.zeros(0, dtype=np.int64)
            data[name] = pd.Categorical.from_codes(codes, categories=pd.Index(categories),
                                                   validate=False)
        replayed = np.array([key[_REPLAYED] for key in self._keys], dtype=object)
        data["replayed"] = pd.array(replayed[kids] if len(replayed) else [], dtype="boolean")
        frame: pd.DataFrame = pd.DataFrame(data, columns=list(COLUMNS))
        return frame

    def _from_sql(self) -> pd.DataFrame:
        import pandas as pd

        assert self.path is not None
        try:
            with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as db:
                df = pd.read_sql_query(f"SELECT {', '.join(_SQL_COLUMNS)} FROM requests "
                                       "ORDER BY sent_ns, seq", db)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot read the history database {self.path}: {exc}; "
                               "set POOL_NOTEBOOK_HISTORY to another file, or off") from exc
        df.insert(COLUMNS.index("sent_at"), "sent_at",
                  pd.to_datetime(df.pop("sent_ns").astype("int64"), unit="ns", utc=True))
        for name in _CAT_COLUMNS:
            df[name] = df[name].astype("category")
        for name in _COUNT_COLUMNS:
            df[name] = df[name].astype("Int64")
        df["replayed"] = df["replayed"].astype("boolean")
        df["latency_ms"] = df["latency_ms"].astype("float64")
        ordered: pd.DataFrame = df[list(COLUMNS)]
        return ordered

    # ----------------------------------------------------------------- SQLite

    def _connect(self) -> sqlite3.Connection:
        """The writer's database connection (created on the writer thread)."""
        if self._db is None:
            assert self.path is not None
            # mkdir, not ensure_private_dir: the user may point this into a shared dir
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
            db.execute("PRAGMA journal_mode=WAL")
            types = {c: "REAL" if c == "latency_ms" else "INTEGER" if c in _INT_COLUMNS
                     else "TEXT" for c in _SQL_COLUMNS}
            db.execute(f"CREATE TABLE IF NOT EXISTS requests "
                       f"({', '.join(f'{c} {t}' for c, t in types.items())}, "
                       "PRIMARY KEY (kernel_session, seq))")
            have = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
            for column in _SQL_COLUMNS:  # files written by an older version
                if column not in have:
                    db.execute(f"ALTER TABLE requests ADD COLUMN {column} {types[column]}")
            db.execute(f"CREATE TEMP TABLE row_keys (kid INTEGER PRIMARY KEY, kernel_session, "
                       f"{', '.join(_KEY_COLUMNS)}, replayed)")
            self._db = db
        return self._db

    def _snapshot(self) -> _Batch:
        """What the writer must send: new row keys, new rows (numbers), updated rows.

        New rows are only numbers and a key id, zipped from array slices in C; their
        strings go once per distinct key into a temporary table that the INSERT
        joins, so the writer holds the GIL for about a microsecond per row.
        """
        with self._lock:
            lo, n = self._flushed, len(self)
            updated = sorted(seq for seq in self._dirty if seq < lo)
            self._dirty.clear()
            wide = [tuple(row[c] for c in _SQL_COLUMNS) for row in map(self.row, updated)]
            # read after n: every row below n has its key below key_count (interned first);
            # keys interned meanwhile wait for the next batch, which key_count must say
            key_count = len(self._keys)
            keys = [(kid, self.kernel_session, *map(_plain, key)) for kid, key in
                    enumerate(self._keys[self._keys_sent:key_count], self._keys_sent)]
            if self._counts:
                got = list(map(self._counts.get, range(lo, n), repeat(_NO_COUNTS)))
                counts = [_nullable([c[j] for c in got]) for j in range(4)]
            else:
                counts = [repeat(None)] * 4
            rows = list(zip(range(lo, n), self._pid[lo:n], self._sent[lo:n],
                            self._latency[lo:n], self._req[lo:n], self._resp[lo:n], *counts,
                            self._kid[lo:n], strict=False))
        return _Batch(n, key_count, keys, rows, wide)

    def _write(self) -> int:
        """Writer thread: copy pending rows to SQLite; returns how many were written."""
        batch = self._snapshot()
        if batch.rows or batch.updated:
            try:
                db = self._connect()
                with db:  # one transaction: all of it, or nothing (and a retry)
                    db.executemany(_INSERT_KEY, batch.keys)
                    db.executemany(_INSERT_ROW, batch.rows)
                    db.executemany(_INSERT_WIDE, batch.updated)
            except (sqlite3.Error, OSError) as exc:
                if not self._failing:  # once per streak, not every interval
                    log.warning("pool_notebook history: cannot write %s (%s); rows are kept "
                                "and retried", self.path, exc)
                self._failing = True
                with self._lock:
                    self._dirty.update(row[0] for row in batch.updated)
                return 0
            self._keys_sent = batch.key_count
        self._failing = False
        self._flushed = batch.row_count
        return len(batch.rows) + len(batch.updated)

    def _run_writer(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            with self._lock:
                requests, self._requests = self._requests, []
            try:
                written = self._write()
            except Exception:  # nobody would see it raise here: keep the writer alive
                log.exception("pool_notebook history: writing %s failed", self.path)
                written = 0
            for request in requests:
                request.written = written
                request.done.set()
            if self._stop.is_set():
                return

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._run_writer, daemon=True,
                                        name="pool_notebook-history")
        self._writer.start()
        _live.add(self)
        atexit.register(self.close)
        _install_sigterm_flush()

    def flush(self, *, wait: bool = True, timeout: float = 30.0) -> int:
        """Write pending rows now; with ``wait``, returns how many rows that write wrote."""
        if self.path is None:
            self._flushed = len(self)
            return 0
        if self._writer is None or not self._writer.is_alive():
            if not len(self) and not self._dirty:
                return 0
            self._start_writer()
        request = _FlushRequest()
        with self._lock:
            self._requests.append(request)
        self._wake.set()
        if wait and not request.done.wait(timeout):
            raise HistoryError(f"the history writer did not finish within {timeout:g}s "
                               f"(database {self.path} locked by another process?)")
        return request.written

    def close(self) -> None:
        """Write everything still pending and stop the writer (safe to call twice)."""
        writer = self._writer
        if writer is not None and writer.is_alive():
            self._stop.set()
            self._wake.set()
            if writer is not threading.current_thread():
                writer.join(30.0)
        self._writer = None
        self._stop.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        _live.discard(self)
        if self._db is not None:
            self._db.close()
            self._db = None
            self._keys_sent = 0  # the temp table went with the connection


_live: weakref.WeakSet[History] = weakref.WeakSet()
_previous_sigterm: Any = None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Flush every history, then terminate as the previous handler would."""
    for history in list(_live):
        history.close()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_flush() -> None:
    """Once, from the main thread: flush histories on SIGTERM (unless it is ignored)."""
    global _previous_sigterm
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm or current in (signal.SIG_IGN, None):
        return
    _previous_sigterm = current
    signal.signal(signal.SIGTERM, _on_sigterm)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Count, error rate and p50/p95/p99 latency (ms) per connection and op."""
    grouped = df.groupby(["connection", "op"], observed=True)
    out = grouped["latency_ms"].describe(percentiles=[0.5, 0.95, 0.99])
    out = out.rename(columns={"50%": "p50_ms", "95%": "p95_ms", "99%": "p99_ms"})
    out["count"] = out["count"].astype("int64")
    errors = grouped["outcome"].apply(lambda s: float((s != "ok").mean()))
    out["error_rate"] = errors
    table: pd.DataFrame = out[["count", "error_rate", "p50_ms", "p95_ms", "p99_ms"]]
    return table


class _HistoryModule(types.ModuleType):
    """This module, callable: ``pool_notebook.history()`` is the kernel's DataFrame.

    Importing a submodule binds it as the package attribute of the same name, so
    a plain function ``pool_notebook.history`` would be hidden by this module as
    soon as anything imports it; a callable module is both.
    """

    def __call__(self, *, all_sessions: bool = False) -> pd.DataFrame:
        """Every request made through pool_notebook, as a DataFrame."""
        from .connections import manager

        return manager.history.frame(all_sessions=all_sessions)


sys.modules[__name__].__class__ = _HistoryModule
