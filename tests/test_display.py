"""What the view renders: Lua errors from a real worker, and the history plot."""

from __future__ import annotations

import html
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pool_notebook import protocol as proto
from pool_notebook.display import history_figure, parse_lua_error
from pool_notebook.spawn import spawn_and_connect
from tests.fakes import run

pytestmark = pytest.mark.usefixtures("pool_home")

#: What the runtime adds to every traceback and the user never wrote.
_RUNTIME_NOISE = ("[C]", "xpcall", "<python>", "tail calls", "stack traceback")

SYNTAX = "local x = 1\nreturn 1 +"
BOOM = "local x = 1\nerror('boom from Lua')\nreturn x"
NESTED = "local function f()\n  local t = nil\n  return t.x\nend\nreturn f()"
BAD_ARG = "local n = 5\nlocal answer = alc.llm_batch(n)\nreturn answer"


def _errors_from_worker(*codes: str) -> list[str]:
    """The Failed error text a real bundled worker gives for each chunk."""
    async def main() -> list[str]:
        client, _worker = await spawn_and_connect()
        out = []
        async with client:
            for code in codes:
                data = await client.run(code)
                feed = data.feed_result
                assert isinstance(feed, proto.Finished), feed
                assert isinstance(feed.outcome, proto.Failed), feed.outcome
                out.append(feed.outcome.error)
            await client.shutdown()
        return out
    result: list[str] = run(main())
    return result


@pytest.fixture(scope="module")
def worker_errors() -> Iterator[dict[str, str]]:
    """One real worker for the module, in its own home (pool_home is per test)."""
    codes = (SYNTAX, BOOM, NESTED, BAD_ARG)
    home = tempfile.mkdtemp(prefix="pn-", dir="/tmp")  # short: sun_path is 108 bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POOL_NOTEBOOK_HOME", home)
        yield dict(zip(codes, _errors_from_worker(*codes), strict=True))
    shutil.rmtree(home, ignore_errors=True)


def _clean(text: str) -> None:
    for noise in _RUNTIME_NOISE:
        assert noise not in text, (noise, text)
    assert "\\n" not in text and "\\t" not in text


def test_runtime_error_maps_to_the_cell_line_and_quotes_it(worker_errors: dict[str, str]) -> None:
    raw = worker_errors[BOOM]
    assert "xpcall" in raw  # the worker does send the runtime's frames
    err = parse_lua_error(raw, BOOM, first_line=2)  # a %%pool_run cell: line 1 is the magic
    assert err.message == "boom from Lua"
    assert (err.line, err.source) == (3, "error('boom from Lua')")
    assert err.frames == ()  # only "main chunk" at the same line: nothing more to say
    _clean(err.text())
    assert err.text().splitlines()[:2] == ["boom from Lua", "  line 3: error('boom from Lua')"]
    assert err.raw == raw


def test_syntax_error_quotes_the_offending_line(worker_errors: dict[str, str]) -> None:
    err = parse_lua_error(worker_errors[SYNTAX], SYNTAX)
    assert "unexpected symbol near <eof>" in err.message
    assert (err.line, err.source) == (2, "return 1 +")
    _clean(err.text())


def test_nested_function_frames_keep_only_user_code(worker_errors: dict[str, str]) -> None:
    err = parse_lua_error(worker_errors[NESTED], NESTED, first_line=2)
    assert err.message == "attempt to index a nil value (local 't')"
    assert (err.line, err.source) == (4, "  return t.x")
    # the function frame says where the function starts, in cell lines too
    assert [(f.line, f.text) for f in err.frames] == [(4, "in function <line 2>")]
    _clean(err.text())


def test_error_raised_inside_alc_points_at_the_users_call(worker_errors: dict[str, str]) -> None:
    err = parse_lua_error(worker_errors[BAD_ARG], BAD_ARG)
    assert err.message.startswith("alc.llm_batch:") and "array" in err.message
    assert (err.line, err.source) == (2, "local answer = alc.llm_batch(n)")
    assert all(f.line == 2 for f in err.frames)  # alc's own glue frames are gone
    _clean(err.text())


def test_error_html_leads_with_the_message_and_escapes(worker_errors: dict[str, str]) -> None:
    page = parse_lua_error(worker_errors[BOOM], BOOM, first_line=2).html()
    visible = page.split("<details>")[0]  # the raw error is kept, folded, after it
    assert visible.index("boom from Lua") < visible.index("line 3")
    assert "#cf222e" in visible.split("boom from Lua")[0]  # the message is red
    _clean(html.unescape(re.sub("<[^>]+>", " ", visible)))
    assert "error(&#x27;boom from Lua&#x27;)" in visible


def test_sandbox_frames_are_runtime_frames() -> None:
    raw = ("run:2: module 'nope' not found\nstack traceback:\n\t[C]: in function 'error'\n"
           "\t<sandbox>:276: in function 'require'\n\trun:2: in main chunk\n"
           "\t[C]: in function 'xpcall'")
    err = parse_lua_error(raw, "local x = 1\nlocal m = require('nope')")
    assert (err.message, err.line, err.source) == ("module 'nope' not found", 2,
                                                   "local m = require('nope')")
    assert err.frames == () and "sandbox" not in err.text()


def test_unknown_shapes_are_kept_whole() -> None:
    err = parse_lua_error("session start failed: out of memory")
    assert err.message == "session start failed: out of memory"
    assert err.line is None and err.frames == ()
    assert parse_lua_error("x:1: y", None).line == 1  # no code: line known, no quote
    assert parse_lua_error("x:1: y", None).source is None


def _history(n_fast: int = 600, n_slow: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    t0 = pd.Timestamp("2026-01-01T10:00:00Z")
    parts = []
    for conn in ("w0", "w1"):
        for op, n, base in (("status", n_fast, 0.08), ("run", n_slow, 2.0)):
            parts.append(pd.DataFrame({
                "connection": conn, "op": op,
                "sent_at": t0 + pd.to_timedelta(np.sort(rng.uniform(5, 9, n)), unit="s"),
                "latency_ms": rng.lognormal(np.log(base), 0.4, n)}))
    df = pd.concat(parts, ignore_index=True)
    for column in ("connection", "op"):
        df[column] = df[column].astype("category")
    return df


def test_history_figure_reads_at_a_glance(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    df = _history()
    fig = history_figure(df)
    assert plt.get_fignums() == before  # not a pyplot figure: nothing draws it a second time
    time_ax, pct_ax = fig.axes
    assert time_ax.get_xlabel() == "seconds since the first request"
    assert time_ax.get_yscale() == "log" and pct_ax.get_yscale() == "log"
    assert pct_ax.get_xscale() == "log"
    starts = [line.get_xdata()[0] for line in time_ax.get_lines()]
    assert min(starts) == pytest.approx(df["sent_at"].sub(df["sent_at"].min())
                                        .dt.total_seconds().min())
    assert max(max(line.get_xdata()) for line in time_ax.get_lines()) < 5  # seconds, from 0
    fig.canvas.draw()
    labels = [t.get_text() for t in pct_ax.get_xticklabels()]
    assert {"p50", "p90", "p99", "p99.9"} <= set(labels)
    # one colour per connection, one line style per op
    curves = pct_ax.get_lines()
    assert len(curves) == 4
    by_conn: dict[str, set[Any]] = {}
    for line, (conn, op) in zip(curves, df.groupby(["connection", "op"], observed=True)
                                .groups, strict=True):
        by_conn.setdefault(conn, set()).add(line.get_color())
        assert line.get_linestyle() == {"run": "-", "status": "--"}[op]
    assert all(len(colours) == 1 for colours in by_conn.values())
    assert by_conn["w0"] != by_conn["w1"]
    # the p99 of a curve is the data's p99
    status_w0 = df[(df.connection == "w0") & (df.op == "status")]["latency_ms"]
    xs, ys = curves[1].get_data()
    at_p99 = np.interp(100.0, xs, ys)
    assert at_p99 == pytest.approx(np.quantile(status_w0, 0.99), rel=0.05)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["w0", "w1", "run", "status"]
    png = fig._repr_png_()  # type: ignore[attr-defined]
    assert png.startswith(b"\x89PNG")
    (tmp_path / "history.png").write_bytes(png)


def test_history_figure_of_an_empty_history() -> None:
    df = _history().iloc[:0]
    fig = history_figure(df)
    assert fig._repr_png_().startswith(b"\x89PNG")  # type: ignore[attr-defined]
    assert fig.legends == []


def test_status_conversation_history_in_algoclines_shape() -> None:
    """What an ``alc pool-worker`` answers to status with include_history (shape from
    algocline-core metrics.rs ``TranscriptEntry::to_history_json``), rendered as a table."""
    from pool_notebook.connections import ConnectionManager
    from pool_notebook.display import reply_html, reply_text
    from pool_notebook.history import History
    from tests.fakes import FakeWorker, ok

    history = [
        {"query_id": "q-0", "prompt": "first?", "response": "one", "prompt_tokens": 2,
         "response_tokens": 1, "started_at": 1764140000000, "completed_at": 1764140000100},
        {"query_id": "q-1", "prompt": "<b>second?</b>", "response": None,
         "prompt_tokens": 3, "response_tokens": None, "started_at": 1764140000200,
         "completed_at": None}]

    def script(req: dict[str, Any]) -> list[Any] | None:
        if req["op"] == "status":
            return [ok({"kind": "status", "has_session": True, "session_id": "s-1",
                        "conversation_history": history})]
        return None

    async def main() -> Any:
        async with FakeWorker(script) as worker:
            manager = ConnectionManager(History(None))
            conn = await manager.connect(worker.sock_path)
            reply = await conn.status(include_history=True)
            manager.close_all()
            return reply

    reply = run(main())
    page = reply_html(reply)
    table = page.split("conversation history (2)")[1]
    assert re.findall(r"<td[^>]*>([^<]*)</td>", table) == [
        "first?", "one", "&lt;b&gt;second?&lt;/b&gt;", "(pending)"]
    assert page.count("first?") == 1  # the list is shown once, as the table
    assert "has_session" in page
    assert '"conversation_history"' in reply_text(reply)


def test_progress_and_log_of_a_session_are_shown() -> None:
    """Progress and log lines the worker sends with its replies (extra keys on the feed
    replies, and the final metrics: the server's shapes), in the session view and text."""
    from pool_notebook.connections import ConnectionManager
    from pool_notebook.display import session_html, session_log, session_progress, session_text
    from pool_notebook.history import History
    from tests.fakes import FakeWorker, ok

    started = {"ts": 1, "level": "info", "source": "alc.log", "message": "started <now>"}
    low = {"ts": 2, "level": "warn", "source": "alc.log", "message": "low score"}

    def script(req: dict[str, Any]) -> list[Any] | None:
        if req["op"] == "run":
            paused = {"Paused": {"queries": [{"id": "q-0", "prompt": "go on?", "system": None,
                                              "max_tokens": 1024}]}}
            return [ok({"kind": "feed", "session_id": "s-1", "feed_result": paused,
                        "progress": {"step": 1, "total": 4, "message": "reading"},
                        "recent_logs": [started]})]
        if req["op"] == "continue":  # the final metrics carry the whole recent log
            failed = {"Finished": {"state": {"Failed": {"error": "run:3: gave up"}},
                                   "metrics": {"auto": {"llm_calls": 1},
                                               "recent_logs": [started, low],
                                               "progress": {"step": 3, "total": 4,
                                                            "message": "judging"}}}}
            return [ok({"kind": "feed", "session_id": "s-1", "feed_result": failed})]
        return None

    async def main() -> tuple[str, str, str, Any, list[str]]:
        async with FakeWorker(script) as worker:
            manager = ConnectionManager(History(None))
            conn = await manager.connect(worker.sock_path)
            session = await conn.run("local a = 1\nlocal b = alc.llm('go on?')\nerror('gave up')")
            paused = session_html(session)
            await session.answer("yes")
            manager.close_all()
            return paused, session_html(session), session_text(session), \
                session_progress(session), session_log(session)

    paused, failed, text, progress, log = run(main())
    assert "<progress value='1' max='4'>" in paused and "1/4 reading" in paused
    assert "started &lt;now&gt;" in paused and "<details class='pool-log'>" in paused
    assert progress == (3, 4, "judging")  # the final metrics are the latest word
    assert log == ["[info] started <now>", "[warn] low score"]  # each line once
    assert "<details class='pool-log' open>" in failed  # a failed run shows its log
    assert failed.index("gave up") < failed.index("pool-progress")  # the error first
    assert "<b>llm_calls</b>" in failed and "<b>progress</b>" not in failed  # not twice
    assert "  progress 3/4 judging" in text and "  log [warn] low score" in text


def test_the_library_never_imports_the_view() -> None:
    """The view imports the library, never the reverse (no import circle); importing it
    loads neither ipywidgets nor matplotlib (built on first use)."""
    import subprocess
    import sys

    code = ("import sys, asyncio\n"
            "import pool_notebook.connections, pool_notebook.session, pool_notebook.history\n"
            "assert 'pool_notebook.display' not in sys.modules, 'library imported the view'\n"
            "import pool_notebook.display\n"
            "assert 'ipywidgets' not in sys.modules and 'matplotlib' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
