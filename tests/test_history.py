"""History: one row per request, dtypes, late-reply updates, counts, durable SQLite."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pool_notebook.history import (
    COLUMNS,
    Counts,
    History,
    Outcome,
    counts_from_metrics,
    counts_from_usage,
    summary,
)

_clock = iter(range(1_700_000_000_000_000_000, 1_800_000_000_000_000_000, 1000))


def _add(h: History, op: str = "status", outcome: Outcome = Outcome.OK, latency: float = 1.0,
         counts: Counts | None = None, replayed: bool | None = None) -> int:
    return h.record(connection="w0", socket="/s.sock", worker_pid=42, worker_version="0.1.0",
                    op=op, session_id="s-1", sent_ns=next(_clock), latency_ms=latency,
                    outcome=outcome, request_bytes=16, response_bytes=100, counts=counts,
                    replayed=replayed)


def _sql_rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT seq, op, outcome, llm_calls FROM requests ORDER BY seq"
                          ).fetchall()


def test_outcome_is_a_string_enum() -> None:
    assert Outcome("late_reply") is Outcome.LATE_REPLY
    assert Outcome.OK == "ok" and str(Outcome.OK) == "ok" and f"{Outcome.TIMEOUT}" == "timeout"
    assert {"ok": 1}[Outcome.OK] == 1  # hashes as its value: usable as a dict key for "ok"


def test_frame_dtypes_and_values() -> None:
    h = History(None, kernel_session="k1")
    assert _add(h) == 0 and _add(h, "run", Outcome.WORKER_ERROR, 3.0) == 1
    df = h.frame()
    assert list(df.columns) == list(COLUMNS)
    assert str(df["sent_at"].dtype) == "datetime64[ns, UTC]"
    assert df["sent_at"][0] < df["sent_at"][1]
    assert df["sent_at"][0].year == 2023
    for name in ("op", "outcome", "connection", "kernel_session", "feed_state"):
        assert isinstance(df[name].dtype, pd.CategoricalDtype), name
    assert df["latency_ms"].tolist() == [1.0, 3.0] and df["seq"].tolist() == [0, 1]
    assert df["op"].tolist() == ["status", "run"] and df["feed_state"].isna().all()
    assert df["outcome"].tolist() == ["ok", "worker_error"]
    assert type(df["outcome"].cat.categories[0]) is str  # plain strings, not the enum
    assert str(df["llm_calls"].dtype) == "Int64" and df["llm_calls"].isna().all()
    assert h.frame().shape == (2, len(COLUMNS)) and History(None).frame().empty
    table = summary(df)
    assert table.loc[("w0", "run"), "error_rate"] == 1.0
    assert table.loc[("w0", "status"), "count"] == 1


def test_counts_from_both_metrics_shapes_and_usage() -> None:
    algocline = {"auto": {"elapsed_ms": 12, "llm_calls": 3, "pauses": 2, "rounds": 2,
                          "prompt_tokens": {"tokens": 40, "source": "estimated"},
                          "response_tokens": {"tokens": 9, "source": "provided"},
                          "total_tokens": {"tokens": 49, "source": "estimated"}},
                 "custom": {"score": 1}}
    assert counts_from_metrics(algocline) == Counts(3, 2, 40, 9)
    older = {"wall_ms": 5.0, "llm_rounds": 1, "llm_queries": 2,
             "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    assert counts_from_metrics(older) == Counts(2, 1, 7, 3)
    assert counts_from_metrics({"wall_ms": 1.0}) == Counts()  # nothing reported
    assert counts_from_metrics({}) is None and counts_from_usage(None) is None
    assert counts_from_usage({"prompt_tokens": 5, "completion_tokens": None}) == \
        Counts(prompt_tokens=5)
    assert counts_from_usage({"prompt_tokens": True, "completion_tokens": -4}) == Counts()
    h = History(None)
    _add(h, "continue", counts=counts_from_metrics(algocline))
    _add(h)
    df = h.frame()
    assert df["llm_calls"].tolist() == [3, pd.NA] and df["completion_tokens"].tolist() == \
        [9, pd.NA]
    assert h.row(0)["prompt_tokens"] == 40 and h.row(1)["rounds"] is None


def test_replayed_answers_are_marked_in_memory_and_in_sqlite(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite", kernel_session="k")
    _add(h, "continue", replayed=True)
    _add(h, "continue", replayed=False)
    _add(h, "continue")  # typed by a person
    for df in (h.frame(), h.frame(all_sessions=True)):
        assert str(df["replayed"].dtype) == "boolean"
        assert df["replayed"].tolist() == [True, False, pd.NA]
    assert [h.row(i)["replayed"] for i in range(3)] == [True, False, None]
    h.close()


def test_late_reply_updates_the_same_row(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite", kernel_session="k1")
    seq = _add(h, "run", Outcome.TIMEOUT, 50.0)
    assert h.flush() == 1
    h.update(seq, latency_ms=900.0, outcome=Outcome.LATE_REPLY, response_bytes=77,
             feed_state="completed", counts=Counts(llm_calls=1))
    assert len(h) == 1 and h.row(seq)["outcome"] == "late_reply"
    assert h.flush() == 1  # the flushed row is rewritten, not duplicated
    df = h.frame(all_sessions=True)
    assert df["outcome"].tolist() == ["late_reply"] and df["response_bytes"].tolist() == [77]
    assert df["llm_calls"].tolist() == [1]
    h.close()


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
    assert str(everything["llm_calls"].dtype) == "Int64"
    second.close()
    assert History(None).flush() == 0  # persistence off: nothing written


def test_rows_with_new_keys_recorded_while_the_writer_snapshots_all_reach_sqlite(
        tmp_path: Path) -> None:
    """A key interned while the writer takes its snapshot must still be sent (once lost,
    every later row with that key was silently dropped by the INSERT's join)."""
    path = tmp_path / "h.sqlite"
    h = History(path, interval=0.0005)  # the writer snapshots all the time
    n = 20_000
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # and the two threads interleave as finely as they can
    try:
        for i in range(n):
            h.record(connection="w0", socket="/s.sock", worker_pid=42,
                     worker_version="0.31.0", op="status", session_id=f"s-{i}",
                     sent_ns=next(_clock), latency_ms=1.0, outcome=Outcome.OK)  # new key each
    finally:
        sys.setswitchinterval(switch)
    h.flush()
    assert len(h.frame(all_sessions=True)) == n
    h.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(DISTINCT session_id) FROM requests").fetchone() == (n,)


def test_recording_goes_on_after_close_with_every_string_in_place(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite", kernel_session="k")
    _add(h, "run")
    _add(h, "status")
    h.close()  # the writer and its connection go; the next record starts them again
    _add(h, "status")  # a key written before the close
    _add(h, "shutdown", Outcome.CLIENT_ERROR)  # a new one
    h.close()
    with sqlite3.connect(tmp_path / "h.sqlite") as db:
        rows = db.execute("SELECT seq, kernel_session, connection, socket, op, outcome, "
                          "session_id FROM requests ORDER BY seq").fetchall()
    assert rows == [(0, "k", "w0", "/s.sock", "run", "ok", "s-1"),
                    (1, "k", "w0", "/s.sock", "status", "ok", "s-1"),
                    (2, "k", "w0", "/s.sock", "status", "ok", "s-1"),
                    (3, "k", "w0", "/s.sock", "shutdown", "client_error", "s-1")]


def test_file_from_an_older_version_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the table as the previous release created it
        db.execute("CREATE TABLE requests (seq INTEGER, kernel_session TEXT, op TEXT, "
                   "sent_ns INTEGER, PRIMARY KEY (kernel_session, seq))")
        db.execute("INSERT INTO requests VALUES (0, 'old', 'status', 1)")
    h = History(path, kernel_session="new")
    _add(h, "run", counts=Counts(2, 1, 10, 5))
    df = h.frame(all_sessions=True)
    assert df["kernel_session"].tolist() == ["old", "new"]
    assert df["llm_calls"].tolist() == [pd.NA, 2] and df["replayed"].isna().all()
    h.close()


def test_rows_are_kept_while_the_database_cannot_be_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "sub"
    blocker.write_text("a file where the history's directory should be")
    h = History(blocker / "h.sqlite", kernel_session="k")
    _add(h)
    _add(h, "run")
    assert h.flush() == 0 and h.flush() == 0  # cannot write: nothing lost, nothing written
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1
    blocker.unlink()
    _add(h, "shutdown")
    assert h.flush() == 3  # the kept rows go out with the new one
    assert [op for _seq, op, _outcome, _calls in _sql_rows(blocker / "h.sqlite")] == \
        ["status", "run", "shutdown"]
    h.close()


_SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    import pool_notebook

    async def main(n):
        conn = await pool_notebook.connect()
        for _ in range(n):
            await conn.send("status")
        print("done", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main(int(sys.argv[1])))
""")

_EXIT_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    import pool_notebook

    async def main(n):
        conn = await pool_notebook.connect()
        for _ in range(n):
            await conn.send("status")
        await conn.shutdown()

    asyncio.run(main(int(sys.argv[1])))
""")


def _start(script: str, n: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", script, str(n)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "done\n", "the script did not finish its requests"
    return proc


def _status_rows(path: Path) -> int:
    return sum(1 for _seq, op, outcome, _ in _sql_rows(path) if op == "status" and
               outcome == "ok")


@pytest.mark.usefixtures("pool_home")
def test_sigkill_after_a_quiet_second_loses_nothing() -> None:
    path = Path(os.environ["POOL_NOTEBOOK_HISTORY"])
    proc = _start(_SCRIPT, 300)
    time.sleep(1.2)  # >= 1 s without requests: every row must be in SQLite by now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _status_rows(path) == 300


@pytest.mark.usefixtures("pool_home")
def test_sigterm_right_after_the_requests_loses_nothing() -> None:
    path = Path(os.environ["POOL_NOTEBOOK_HISTORY"])
    proc = _start(_SCRIPT, 300)
    proc.send_signal(signal.SIGTERM)  # no quiet time: the handler must flush
    assert proc.wait() == -signal.SIGTERM  # and still die of SIGTERM
    assert _status_rows(path) == 300


@pytest.mark.usefixtures("pool_home")
def test_interpreter_exit_loses_nothing() -> None:
    path = Path(os.environ["POOL_NOTEBOOK_HISTORY"])
    subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, "500"], check=True)
    rows = _sql_rows(path)
    assert _status_rows(path) == 500 and rows[-1][1] == "shutdown" and len(rows) == 501
