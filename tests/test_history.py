"""History: one row per request, dtypes, late-reply updates, SQLite across kernels."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd

from pool_notebook.history import COLUMNS, History, summary

_clock = iter(range(1_700_000_000_000_000_000, 1_800_000_000_000_000_000, 1000))


def _add(h: History, op: str = "status", outcome: str = "ok", latency: float = 1.0) -> int:
    return h.record("w0", "/s.sock", 42, "0.1.0", op, "s-1", None, next(_clock),
                    latency, outcome, None, None, 16, 100, None)


def test_frame_dtypes_and_values() -> None:
    h = History(None, kernel_session="k1")
    assert _add(h) == 0 and _add(h, "run", "worker_error", 3.0) == 1
    df = h.frame()
    assert list(df.columns) == list(COLUMNS)
    assert str(df["sent_at"].dtype) == "datetime64[ns, UTC]"
    assert df["sent_at"][0] < df["sent_at"][1]
    assert df["sent_at"][0].year == 2023
    for name in ("op", "outcome", "connection", "kernel_session", "feed_state"):
        assert isinstance(df[name].dtype, pd.CategoricalDtype), name
    assert df["latency_ms"].tolist() == [1.0, 3.0] and df["seq"].tolist() == [0, 1]
    assert df["op"].tolist() == ["status", "run"] and df["feed_state"].isna().all()
    assert h.frame().shape == (2, len(COLUMNS)) and History(None).frame().empty
    table = summary(df)
    assert table.loc[("w0", "run"), "error_rate"] == 1.0
    assert table.loc[("w0", "status"), "count"] == 1


def test_late_reply_updates_the_same_row(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite", kernel_session="k1")
    seq = _add(h, "run", "timeout", 50.0)
    assert h.flush() == 1
    h.update(seq, latency_ms=900.0, outcome="late_reply", response_bytes=77,
             feed_state="completed")
    assert len(h) == 1 and h.row(seq)["outcome"] == "late_reply"
    assert h.flush() == 1  # the flushed row is rewritten, not duplicated
    df = h.frame(all_sessions=True)
    assert df["outcome"].tolist() == ["late_reply"] and df["response_bytes"].tolist() == [77]


def test_sqlite_keeps_every_kernel_session(tmp_path: Path) -> None:
    path = tmp_path / "hist" / "h.sqlite"
    first = History(path, kernel_session="before")
    _add(first)
    _add(first, "run")
    first.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = History(path, kernel_session="after")  # a restarted kernel
    _add(second, "shutdown")
    assert second.frame()["op"].tolist() == ["shutdown"]
    everything = second.frame(all_sessions=True)
    assert everything["kernel_session"].tolist() == ["before", "before", "after"]
    assert everything["op"].tolist() == ["status", "run", "shutdown"]
    assert str(everything["sent_at"].dtype) == "datetime64[ns, UTC]"
    assert isinstance(everything["op"].dtype, pd.CategoricalDtype)
    assert History(None).flush() == 0  # persistence off: nothing written
