"""Request history: one row per request, in compact columns, persisted to SQLite.

Recording is on the request path, so it only appends to typed arrays
(``array.array``; strings become category codes): about a microsecond and ~90
bytes per request. Rows reach SQLite (WAL) in batches, off the request path:
after each cell and at exit. A row is written once per request whatever its
outcome; a late reply updates its request's row instead of adding another.
"""

from __future__ import annotations

import array
import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import home

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMNS", "OUTCOMES", "History"]

#: Outcomes a row can have.
OUTCOMES = ("ok", "worker_error", "client_error", "timeout", "cancelled", "late_reply")

_INT_COLUMNS = ("seq", "worker_pid", "sent_ns", "request_bytes", "response_bytes")
_CAT_COLUMNS = ("kernel_session", "connection", "socket", "worker_version", "op", "session_id",
                "query_id", "outcome", "error_type", "error_message", "feed_state")
#: Column order of the DataFrame and of the SQLite table.
COLUMNS = ("seq", "kernel_session", "connection", "socket", "worker_pid", "worker_version", "op",
           "session_id", "query_id", "sent_at", "latency_ms", "outcome", "error_type",
           "error_message", "request_bytes", "response_bytes", "feed_state")
_SQL_COLUMNS = tuple("sent_ns" if c == "sent_at" else c for c in COLUMNS)


class _Codes:
    """A string column as int codes plus its categories (None is code -1)."""

    __slots__ = ("categories", "codes", "index")

    def __init__(self) -> None:
        self.codes = array.array("i")
        self.index: dict[str, int] = {}
        self.categories: list[str] = []

    def code(self, value: str | None) -> int:
        if value is None:
            return -1
        code = self.index.get(value)
        if code is None:
            code = self.index[value] = len(self.categories)
            self.categories.append(value)
        return code

    def value(self, i: int) -> str | None:
        code = self.codes[i]
        return None if code < 0 else self.categories[code]


def default_path() -> Path | None:
    """``$POOL_NOTEBOOK_HISTORY`` (empty or ``off`` disables), else ``<home>/history.sqlite``."""
    value = os.environ.get("POOL_NOTEBOOK_HISTORY")
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value)
    return home() / "history.sqlite"


class History:
    """This kernel's request history, and the SQLite file shared by all kernels."""

    def __init__(self, path: Path | None = None, *, kernel_session: str | None = None) -> None:
        self.path = path
        self.kernel_session = kernel_session or uuid.uuid4().hex[:12]
        self._ints = {name: array.array("q") for name in _INT_COLUMNS}
        self._latency = array.array("d")
        self._cats = {name: _Codes() for name in _CAT_COLUMNS}
        self._session_code = self._cats["kernel_session"].code(self.kernel_session)
        self._flushed = 0
        self._dirty: set[int] = set()
        self._db: sqlite3.Connection | None = None

    def __len__(self) -> int:
        return len(self._latency)

    def record(
        self,
        connection: str,
        socket: str,
        worker_pid: int,
        worker_version: str | None,
        op: str,
        session_id: str | None,
        query_id: str | None,
        sent_ns: int,
        latency_ms: float,
        outcome: str,
        error_type: str | None,
        error_message: str | None,
        request_bytes: int,
        response_bytes: int,
        feed_state: str | None,
    ) -> int:
        """Append one request's row; returns its sequence number (its row index)."""
        seq = len(self._latency)
        ints, cats = self._ints, self._cats
        ints["seq"].append(seq)
        ints["worker_pid"].append(worker_pid)
        ints["sent_ns"].append(sent_ns)
        ints["request_bytes"].append(request_bytes)
        ints["response_bytes"].append(response_bytes)
        self._latency.append(latency_ms)
        cats["kernel_session"].codes.append(self._session_code)
        for name, value in (("connection", connection), ("socket", socket),
                            ("worker_version", worker_version), ("op", op),
                            ("session_id", session_id), ("query_id", query_id),
                            ("outcome", outcome), ("error_type", error_type),
                            ("error_message", error_message), ("feed_state", feed_state)):
            column = cats[name]
            column.codes.append(column.code(value))
        return seq

    def update(self, seq: int, *, latency_ms: float, outcome: str, response_bytes: int,
               feed_state: str | None, error_type: str | None = None,
               error_message: str | None = None) -> None:
        """Rewrite the result of row ``seq`` (a late reply to a request that gave up)."""
        self._latency[seq] = latency_ms
        self._ints["response_bytes"][seq] = response_bytes
        for name, value in (("outcome", outcome), ("feed_state", feed_state),
                            ("error_type", error_type), ("error_message", error_message)):
            column = self._cats[name]
            column.codes[seq] = column.code(value)
        if seq < self._flushed:
            self._dirty.add(seq)

    def row(self, seq: int) -> dict[str, Any]:
        """One row as a dict (for display and tests)."""
        out: dict[str, Any] = {name: col[seq] for name, col in self._ints.items()}
        out["latency_ms"] = self._latency[seq]
        out.update({name: col.value(seq) for name, col in self._cats.items()})
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
        data: dict[str, Any] = {}
        for name in COLUMNS:
            if name == "sent_at":
                ns = np.frombuffer(self._ints["sent_ns"], dtype=np.int64, count=n)
                data[name] = pd.to_datetime(ns, unit="ns", utc=True)
            elif name == "latency_ms":
                data[name] = np.frombuffer(self._latency, dtype=np.float64, count=n).copy()
            elif name in self._ints:
                data[name] = np.frombuffer(self._ints[name], dtype=np.int64, count=n).copy()
            else:
                col = self._cats[name]
                codes = np.frombuffer(col.codes, dtype=np.int32, count=n).copy()
                data[name] = pd.Categorical.from_codes(codes, categories=pd.Index(col.categories))
        frame: pd.DataFrame = pd.DataFrame(data, columns=list(COLUMNS))
        return frame

    def _from_sql(self) -> pd.DataFrame:
        import pandas as pd

        db = self._connect()
        df = pd.read_sql_query(f"SELECT {', '.join(_SQL_COLUMNS)} FROM requests "
                               "ORDER BY sent_ns, seq", db)
        df.insert(COLUMNS.index("sent_at"), "sent_at",
                  pd.to_datetime(df.pop("sent_ns").astype("int64"), unit="ns", utc=True))
        for name in _CAT_COLUMNS:
            df[name] = df[name].astype("category")
        df["latency_ms"] = df["latency_ms"].astype("float64")
        ordered: pd.DataFrame = df[list(COLUMNS)]
        return ordered

    # ----------------------------------------------------------------- SQLite

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            assert self.path is not None
            # mkdir, not ensure_private_dir: the user may point this into a shared dir
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(self.path, timeout=10)
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
            db.execute("PRAGMA journal_mode=WAL")
            cols = ", ".join(
                f"{c} {'REAL' if c == 'latency_ms' else 'INTEGER' if c in _INT_COLUMNS else 'TEXT'}"
                for c in _SQL_COLUMNS)
            db.execute(f"CREATE TABLE IF NOT EXISTS requests ({cols}, "
                       "PRIMARY KEY (kernel_session, seq))")
            self._db = db
        return self._db

    def _sql_rows(self, seqs: Iterable[int]) -> list[tuple[Any, ...]]:
        return [tuple(row[c] for c in _SQL_COLUMNS) for row in map(self.row, seqs)]

    def flush(self) -> int:
        """Write rows recorded (or updated) since the last flush; returns how many."""
        if self.path is None:
            self._flushed = len(self)
            return 0
        seqs = sorted(self._dirty | set(range(self._flushed, len(self))))
        if not seqs:
            return 0
        db = self._connect()
        marks = ", ".join("?" * len(_SQL_COLUMNS))
        with db:
            db.executemany(f"INSERT OR REPLACE INTO requests ({', '.join(_SQL_COLUMNS)}) "
                           f"VALUES ({marks})", self._sql_rows(seqs))
        self._flushed = len(self)
        self._dirty.clear()
        return len(seqs)

    def close(self) -> None:
        """Flush and close the database."""
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None


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


def plot(df: pd.DataFrame) -> Any:
    """Latency over time and its distribution (needs matplotlib: ``pip install matplotlib``)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting history needs matplotlib: pip install "
                          "'pool-notebook[plot]'") from exc
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
    for (conn, op), group in df.groupby(["connection", "op"], observed=True):
        ax1.plot(group["sent_at"], group["latency_ms"], ".", ms=3, label=f"{conn}:{op}")
        ax2.hist(group["latency_ms"], bins=40, alpha=0.6, label=f"{conn}:{op}")
    ax1.set(title="latency over time", ylabel="ms")
    ax2.set(title="latency distribution", xlabel="ms")
    ax1.legend(fontsize="small")
    fig.tight_layout()
    return fig
