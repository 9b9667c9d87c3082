"""Request history: one row per request, in compact columns, persisted to SQLite.

Recording is on the request path, so it only appends to typed arrays
(``array.array``; a row's strings are interned as one key): about a microsecond
and ~44 bytes per request. Rows reach SQLite (WAL) in batches, off the request path:
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
#: The string fields of a row, stored together as one interned "row key".
_KEY_COLUMNS = ("connection", "socket", "worker_version", "op", "session_id", "query_id",
                "outcome", "error_type", "error_message", "feed_state")
_CAT_COLUMNS = ("kernel_session", *_KEY_COLUMNS)
#: Column order of the DataFrame and of the SQLite table.
COLUMNS = ("seq", "kernel_session", "connection", "socket", "worker_pid", "worker_version", "op",
           "session_id", "query_id", "sent_at", "latency_ms", "outcome", "error_type",
           "error_message", "request_bytes", "response_bytes", "feed_state")
_SQL_COLUMNS = tuple("sent_ns" if c == "sent_at" else c for c in COLUMNS)
_RESULT_FIELDS = tuple(_KEY_COLUMNS.index(c) for c in
                       ("outcome", "feed_state", "error_type", "error_message"))

_RowKey = tuple[str | None, ...]


def default_path() -> Path | None:
    """``$POOL_NOTEBOOK_HISTORY`` (empty or ``off`` disables), else ``<home>/history.sqlite``."""
    value = os.environ.get("POOL_NOTEBOOK_HISTORY")
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value)
    return home() / "history.sqlite"


class History:
    """This kernel's request history, and the SQLite file shared by all kernels.

    Numbers go to ``array.array`` columns; a row's strings form one tuple that is
    interned (requests of a session repeat it), so a row costs one dict lookup
    and six appends to record, and about 44 bytes to keep.
    """

    def __init__(self, path: Path | None = None, *, kernel_session: str | None = None) -> None:
        self.path = path
        self.kernel_session = kernel_session or uuid.uuid4().hex[:12]
        self._pid = array.array("q")
        self._sent = array.array("q")
        self._req = array.array("q")
        self._resp = array.array("q")
        self._latency = array.array("d")
        self._kid = array.array("i")
        self._keys: list[_RowKey] = []
        self._key_ids: dict[_RowKey, int] = {}
        self._flushed = 0
        self._dirty: set[int] = set()
        self._db: sqlite3.Connection | None = None

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
        key = (connection, socket, worker_version, op, session_id, query_id, outcome,
               error_type, error_message, feed_state)
        kid = self._key_ids.get(key)
        if kid is None:
            kid = self._intern(key)
        seq = len(self._latency)
        self._kid.append(kid)
        self._pid.append(worker_pid)
        self._sent.append(sent_ns)
        self._req.append(request_bytes)
        self._resp.append(response_bytes)
        self._latency.append(latency_ms)
        return seq

    def update(self, seq: int, *, latency_ms: float, outcome: str, response_bytes: int,
               feed_state: str | None, error_type: str | None = None,
               error_message: str | None = None) -> None:
        """Rewrite the result of row ``seq`` (a late reply to a request that gave up)."""
        key = list(self._keys[self._kid[seq]])
        for index, value in zip(_RESULT_FIELDS, (outcome, feed_state, error_type,
                                                 error_message), strict=True):
            key[index] = value
        self._kid[seq] = self._intern(tuple(key))
        self._latency[seq] = latency_ms
        self._resp[seq] = response_bytes
        if seq < self._flushed:
            self._dirty.add(seq)

    def row(self, seq: int) -> dict[str, Any]:
        """One row as a dict (for display, SQLite and tests)."""
        out: dict[str, Any] = dict(zip(_KEY_COLUMNS, self._keys[self._kid[seq]], strict=True))
        out.update(seq=seq, kernel_session=self.kernel_session, worker_pid=self._pid[seq],
                   sent_ns=self._sent[seq], request_bytes=self._req[seq],
                   response_bytes=self._resp[seq], latency_ms=self._latency[seq])
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

        def ints(column: array.array[int]) -> Any:
            return np.frombuffer(column, dtype=np.int64, count=n).copy()

        kids = np.frombuffer(self._kid, dtype=np.int32, count=n)
        data: dict[str, Any] = {
            "seq": np.arange(n, dtype=np.int64),
            "kernel_session": pd.Categorical.from_codes(
                np.zeros(n, dtype=np.int8), categories=pd.Index([self.kernel_session])),
            "worker_pid": ints(self._pid),
            "sent_at": pd.DatetimeIndex(ints(self._sent).view("datetime64[ns]"), tz="UTC"),
            "latency_ms": np.frombuffer(self._latency, dtype=np.float64, count=n).copy(),
            "request_bytes": ints(self._req),
            "response_bytes": ints(self._resp),
        }
        for j, name in enumerate(_KEY_COLUMNS):
            per_key, categories = pd.factorize(
                pd.Series([key[j] for key in self._keys], dtype=object), use_na_sentinel=True)
            codes = per_key[kids] if len(per_key) else np.zeros(0, dtype=np.int64)
            data[name] = pd.Categorical.from_codes(codes, categories=pd.Index(categories),
                                                   validate=False)
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
