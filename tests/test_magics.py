"""The magics in an in-process InteractiveShell (private loop), against real workers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import pool_notebook
from pool_notebook import Connection, Reply
from pool_notebook import protocol as proto
from pool_notebook.connections import manager
from pool_notebook.display import PausedSessionView
from pool_notebook.history import History

pytestmark = pytest.mark.usefixtures("pool_home")


@pytest.fixture
def ip(pool_home: Any) -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    manager.history = History(None)
    shell.run_line_magic("load_ext", "pool_notebook")
    shell.run_line_magic("load_ext", "pool_notebook")  # twice is harmless
    yield shell
    for conn in list(manager.connections.values()):
        if conn.state == "open":
            try:
                shell.run_line_magic("pool_disconnect", f"{conn.name} --shutdown")
            except UsageError:
                manager.disconnect(conn.name)
    shell.run_line_magic("unload_ext", "pool_notebook")


def test_connect_send_run_respond_history(ip: InteractiveShell) -> None:
    conn = ip.run_line_magic("pool_connect", "--name a")
    assert isinstance(conn, Connection) and conn.version == pool_notebook.__version__
    assert "worker version" in conn._repr_html_() and conn.version in conn._repr_html_()
    reply = ip.run_cell_magic("pool_send", "--out r", "status")
    assert isinstance(reply, Reply) and reply.ok and ip.user_ns["r"] is reply
    assert ip.run_line_magic("pool_send", '{"op":"status","include_history":true}').ok
    bad = ip.run_cell_magic("pool_send", "", '{"op": "continue", "sid": "x", "response": "y"}')
    assert bad.outcome == "worker_error" and "no paused session" in bad.payload
    ip.user_ns["answers"] = iter(["4", "yes", "no"])
    view = ip.run_cell_magic(
        "pool_run", "--respond 'lambda q: next(answers)' --ctx \"{'n':2}\"",
        "local a = alc.llm('2+2?')\nlocal b = alc.llm_batch({'x?', 'y?'})\n"
        "return {a = a, b = b, n = ctx.n}")
    assert isinstance(view, PausedSessionView)
    assert view.last.result == {"a": "4", "b": ["yes", "no"], "n": 2}
    assert "completed" in view.html()
    df = ip.run_line_magic("pool_history", "")
    assert list(df["op"]) == ["status", "status", "continue", "run", "continue", "continue",
                              "continue"]
    assert str(df["sent_at"].dtype) == "datetime64[ns, UTC]"
    assert isinstance(df["op"].dtype, pd.CategoricalDtype)
    assert df["latency_ms"].dtype == "float64"
    assert list(df["outcome"])[2] == "worker_error"
    assert list(df["feed_state"])[3:] == ["paused", "paused", "accepted", "completed"]
    summary = ip.run_line_magic("pool_history", "--summary")
    assert summary.loc[("a", "run"), "count"] == 1
    assert ip.run_line_magic("pool_history", "--op run --last 1")["op"].tolist() == ["run"]


def test_paused_view_answers_in_any_order(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "")
    view = ip.run_cell_magic("pool_run", "", "local r = alc.llm_batch({'p1', 'p2'})\n"
                             "return r[1] .. '+' .. r[2]")
    assert [q.prompt for q in view.pending] == ["p1", "p2"]
    assert "p1" in view.html() and "paused" in view.html()
    pool_notebook.loop.runner.run(view.answer("B", "q-1"))
    assert [q.id for q in view.pending] == ["q-0"]
    pool_notebook.loop.runner.run(view.answer("A", "q-0"))
    assert view.last.result == "A+B" and view.pending == []


def test_usage_errors_are_one_line(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="no connection named"):
        ip.run_cell_magic("pool_send", "--to nope", "status")
    ip.run_line_magic("pool_connect", "--name x")
    with pytest.raises(UsageError, match="JSON object"):
        ip.run_cell_magic("pool_send", "", "{not json")
    with pytest.raises(UsageError, match="needs Lua code"):
        ip.run_cell_magic("pool_run", "", "  ")
    with pytest.raises(UsageError, match="--respond"):
        ip.run_cell_magic("pool_run", "--respond undefined_name", "return 1")
    with pytest.raises(UsageError, match="already open"):
        ip.run_line_magic("pool_connect", "--name x")
    with pytest.raises(UsageError, match="ConnectError"):
        ip.run_line_magic("pool_connect", "/nonexistent/dir/w.sock")
    with pytest.raises(UsageError, match=r"VersionMismatch.*--protocol-version 0\.1\.0"):
        ip.run_line_magic("pool_connect", "--protocol-version 9.9 --name y")


def test_fan_out_background_connections_workers_disconnect(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "--name a")
    ip.run_line_magic("pool_connect", "--name b")
    replies = ip.run_cell_magic("pool_send", "--all", "status")
    assert sorted(r.connection for r in replies) == ["a", "b"] and all(r.ok for r in replies)
    task = ip.run_cell_magic("pool_send", "--to a --background --out t", "status")
    reply = pool_notebook.loop.runner.run(task)
    assert reply.ok and ip.user_ns["t"] is task
    table = ip.run_line_magic("pool_connections", "")
    assert table["name"].tolist() == ["a", "b"] and table["current"].tolist() == ["", "*"]
    workers = ip.run_line_magic("pool_workers", "")
    assert len(workers) == 2 and workers["alive"].all()
    assert ip.run_line_magic("pool_disconnect", "--all --shutdown") == ["a", "b"]
    assert manager.connections == {}


def test_reconnect_by_sid_picks_up_paused_session(ip: InteractiveShell) -> None:
    conn = ip.run_line_magic("pool_connect", "--name first")
    view = ip.run_cell_magic("pool_run", "", "return 'ok: ' .. alc.llm('resume me')")
    sid = conn.worker_sid
    ip.run_line_magic("pool_disconnect", "first")  # like a kernel restart
    again = ip.run_line_magic("pool_connect", f"--sid {sid} --name second")
    status = ip.run_line_magic("pool_status", "--to second")
    assert status.session_id == view.last.session_id
    done = pool_notebook.loop.runner.run(again.continue_(status.session_id, "yes"))
    assert done.result == "ok: yes"


def test_timeout_then_late_reply_recorded_once(ip: InteractiveShell) -> None:
    conn = ip.run_line_magic("pool_connect", "")
    with pytest.raises(UsageError, match="RequestTimeout"):
        ip.run_cell_magic("pool_run", "--timeout 0.2",
                          "local t = os.clock() while os.clock() - t < 0.6 do end return 1")
    assert ip.run_line_magic("pool_status", "").ok  # waits for the late reply first
    df = ip.run_line_magic("pool_history", "")
    assert df["op"].tolist() == ["run", "status"]
    assert df["outcome"].tolist() == ["late_reply", "ok"]
    assert df["feed_state"].tolist()[0] == "completed"
    assert conn.client.owed_replies == 0


def test_request_parsing() -> None:
    from pool_notebook.connections import parse_request

    assert parse_request(" status ") == proto.Status()
    assert parse_request('{"op":"run","code":"x"}') == proto.Run("x")
    assert parse_request('{"op":"custom","a":1}') == proto.RawRequest({"op": "custom", "a": 1})


def test_progress_line_for_long_respond_runs(ip: InteractiveShell) -> None:
    from IPython.utils.capture import capture_output

    ip.run_line_magic("pool_connect", "")
    ip.run_line_magic("config", "PoolMagics.progress_after = 0")
    try:
        with capture_output() as captured:
            view = ip.run_cell_magic("pool_run", "--respond 'lambda q: q.prompt.upper()'",
                                     "return alc.llm('a') .. alc.llm('b')")
    finally:
        ip.run_line_magic("config", "PoolMagics.progress_after = 2.0")
    assert view.last.result == "AB"
    shown = "\n".join(str(o.data.get("text/plain", "")) for o in captured.outputs) + \
        captured.stdout
    assert "pause 1, answering 1 query" in shown
    assert "ok, 2 pauses answered" in shown


def test_var_expansion_help_and_completion(ip: InteractiveShell) -> None:
    from types import SimpleNamespace

    from pool_notebook.magics import complete_names

    ip.run_line_magic("pool_connect", "--name exp")
    ip.user_ns["flag"] = "true"
    reply = ip.run_cell_magic("pool_send", "", '{"op": "status", "include_history": {flag}}')
    assert reply.ok and reply.request == proto.Status(include_history=True)
    target = "exp"
    assert ip.run_line_magic("pool_status", f"--to {target}").ok
    lua = ip.run_cell_magic("pool_run", "", "local t = {1, 2} return #t")  # braces untouched
    assert lua.last.result == 2
    assert "--respond" in ip.find_line_magic("pool_run").__doc__
    event = SimpleNamespace(line="%%pool_send --to ", symbol="", text_until_cursor="")
    assert complete_names(ip, event) == ["exp", "status", "shutdown"]
    assert complete_names(ip, SimpleNamespace(line="%pool_status --to e")) == ["exp"]
