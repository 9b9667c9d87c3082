"""The magics in an in-process InteractiveShell (private loop), against real workers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import pool_notebook
from pool_notebook import Connection, Reply, errors
from pool_notebook import protocol as proto
from pool_notebook.connections import manager
from pool_notebook.display import SessionView
from pool_notebook.history import History
from pool_notebook.session import Session

pytestmark = pytest.mark.usefixtures("pool_home")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
            except errors.PoolError:
                manager.disconnect(conn.name)
    shell.run_line_magic("unload_ext", "pool_notebook")


def _cell(ip: InteractiveShell, code: str) -> tuple[Any, str, list[dict[str, Any]]]:
    """Run a cell as a user would: its result, what it printed, what it displayed."""
    with capture_output() as captured:
        result = ip.run_cell(code, store_history=False)
    return result, _ANSI.sub("", captured.stdout + captured.stderr), \
        [o.data for o in captured.outputs]


def test_connect_send_run_respond_history(ip: InteractiveShell) -> None:
    conn = ip.run_line_magic("pool_connect", "--name a")
    assert isinstance(conn, Connection) and conn.version == pool_notebook.PROTOCOL_VERSION
    reply = ip.run_cell_magic("pool_send", "--out r", "status")
    assert isinstance(reply, Reply) and reply.ok and ip.user_ns["r"] is reply
    shown = ip.display_formatter.format(reply)[0]  # what a cell shows: HTML, text in terminals
    assert shown["text/plain"].startswith("a:status ok (")
    assert ">ok</span>" in shown["text/html"] and "has_session" in shown["text/html"]
    assert "worker version" in ip.display_formatter.format(conn)[0]["text/html"]
    assert ip.run_line_magic("pool_send", '{"op":"status","include_history":true}').ok
    bad = ip.run_cell_magic("pool_send", "", '{"op": "continue", "sid": "x", "response": "y"}')
    assert bad.outcome == "worker_error" and "no paused session" in bad.payload
    ip.user_ns["answers"] = {"2+2?": "4", "x?": "yes", "y?": "no"}
    view = ip.run_cell_magic(
        "pool_run", "--respond 'lambda q: answers[q.prompt]' --ctx \"{'n':2}\" --out s",
        "local a = alc.llm('2+2?')\n"
        "local b = alc.llm_batch({{prompt = 'x?'}, {prompt = 'y?'}})\n"
        "return {a = a, b = b, n = ctx.n}")
    assert isinstance(view, SessionView)
    session = ip.user_ns["s"]
    assert isinstance(session, Session) and view.session is session
    assert session.result == {"a": "4", "b": ["yes", "no"], "n": 2}
    assert "completed" in view.html() and "pool-result" in view.html()
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


def test_paused_session_answered_from_code_in_any_order(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "")
    view = ip.run_cell_magic("pool_run", "--out s",
                             "local r = alc.llm_batch({{prompt = 'p1'}, {prompt = 'p2'}})\n"
                             "return r[1] .. '+' .. r[2]")
    session = ip.user_ns["s"]
    assert [q.prompt for q in session.pending] == ["p1", "p2"]
    page = view.html()
    assert "p1" in page and "paused" in page and "(2 pending)" in page
    pool_notebook.loop.runner.run(session.answer("B", "q-1"))
    assert [q.id for q in session.pending] == ["q-0"]
    assert "p2" not in view.html().split("pool-transcript")[0]  # answered: no longer asked
    pool_notebook.loop.runner.run(session.answer("A", "q-0"))
    assert session.result == "A+B" and session.pending == []
    assert "completed" in view.html()


async def _until(condition: Any, limit: float = 20.0) -> None:
    """Let the loop run (tasks scheduled by widgets) until ``condition()`` holds."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        assert loop.time() < deadline, "the session never got there"
        await asyncio.sleep(0.01)


def test_widget_send_answers_through_the_session(ip: InteractiveShell,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_NOTEBOOK_WIDGETS", "1")
    ip.run_line_magic("pool_connect", "")
    view = ip.run_cell_magic("pool_run", "--out s",
                             "local r = alc.llm_batch({{prompt = 'p1'}, {prompt = 'p2'}})\n"
                             "return r[1] .. '+' .. r[2]")
    session = ip.user_ns["s"]
    assert "application/vnd.jupyter.widget-view+json" in view._repr_mimebundle_()
    text0, send0 = view.answer_widgets("q-0")
    text1, send1 = view.answer_widgets("q-1")
    text0.value = "typed, not sent yet"
    text1.value = "B"
    send1.click()
    assert send1.disabled and send1.description == "Sending…"
    pool_notebook.loop.runner.run(_until(lambda: [q.id for q in session.pending] == ["q-0"]
                                         and session.state == "paused"))
    assert view.answer_widgets("q-0") == (text0, send0)  # redrawn, typed text kept
    assert text0.value == "typed, not sent yet"
    with pytest.raises(KeyError):
        view.answer_widgets("q-1")
    text0.value = "A"
    send0.click()
    pool_notebook.loop.runner.run(_until(lambda: session.done))
    assert session.result == "A+B"
    assert "completed" in view.widget.children[0].value
    failed = ip.run_cell_magic("pool_run", "", "error('boom from Lua')")
    assert "boom from Lua" in failed.widget.children[0].value


def test_ask_buttons_answer_through_the_session(ip: InteractiveShell,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from pool_notebook.session import Answer

    monkeypatch.setenv("POOL_NOTEBOOK_WIDGETS", "1")
    ip.run_line_magic("pool_connect", "")
    calls: list[str] = []

    def recorded(query: proto.Query) -> Answer:
        calls.append(query.prompt)
        if query.prompt == "boom?":
            raise RuntimeError("provider down")
        return Answer(query.prompt.upper(), replayed=query.prompt == "p1")

    ip.user_ns["recorded"] = recorded
    view = ip.run_cell_magic(
        "pool_run", "--respond recorded --manual --out s",
        "local r = alc.llm_batch({{prompt = 'p1'}, {prompt = 'p2'}, {prompt = 'boom?'}})\n"
        "return r[1] .. r[2] .. alc.llm('p3')")
    session = ip.user_ns["s"]
    assert session.state == "paused" and calls == []  # --manual: nothing answered yet
    assert view.ask_button("q-0").description == "ask recorded"
    view.ask_button("q-0").click()
    run = pool_notebook.loop.runner.run
    run(_until(lambda: [q.id for q in session.pending] == ["q-1", "q-2"]))
    assert calls == ["p1"]
    assert "answered q-0 (replayed): P1" in view.widget.children[-1].value
    failing = view.ask_button("q-2")
    failing.click()
    run(_until(lambda: view.errors != []))
    assert "ResponderError" in view.errors[0] and not failing.disabled  # try again later
    assert [q.id for q in session.pending] == ["q-1", "q-2"]
    view.answer_widgets("q-2")[0].value = "typed"
    view.answer_widgets("q-2")[1].click()
    run(_until(lambda: [q.id for q in session.pending] == ["q-1"]))
    view.ask_button().click()  # ask for all: drives the session to its end
    run(_until(lambda: session.done))
    assert session.result == "P1P2P3" and calls[-2:] == ["p2", "p3"]


def test_failed_lua_leads_with_the_error_mapped_to_the_cell(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "")
    result, _, _ = _cell(ip, "%%pool_run --out s\nlocal x = 1\nerror('boom from Lua')\n")
    assert result.success  # the request worked; the Lua code failed, as shown
    assert ip.user_ns["s"].state == "failed"
    page = result.result._repr_mimebundle_()["text/html"]
    head = page.split("boom from Lua")[0]
    assert "failed" in head and ">ok<" not in head and "#cf222e" in head
    visible = page.split("<details>")[0]
    assert "line 3:" in visible and "error(&#x27;boom from Lua&#x27;)" in visible
    assert "xpcall" not in visible and "&lt;python&gt;" not in visible and "\\n" not in visible
    text = result.result._repr_mimebundle_()["text/plain"]
    assert text.splitlines()[1:3] == ["boom from Lua", "  line 3: error('boom from Lua')"]
    syntax = ip.run_cell_magic("pool_run", "", "return 1 +")
    plain = syntax._repr_mimebundle_()["text/plain"]
    assert "failed" in plain.splitlines()[0] and "line 2: return 1 +" in plain


def test_library_errors_are_one_line_with_the_magics_hint(ip: InteractiveShell) -> None:
    result, out, _ = _cell(ip, "%pool_send --to nope status")
    assert isinstance(result.error_in_exec, errors.ConnectionNotFound)
    assert out.strip().splitlines() == [
        "ConnectionNotFound: no connection named 'nope' (open: none open); open one with "
        "pool_notebook.connect()",
        "hint: %pool_connections lists open connections; %pool_connect opens one"]
    result, out, _ = _cell(ip, "%pool_connect /nonexistent/dir/w.sock")
    assert isinstance(result.error_in_exec, errors.ConnectError)
    assert "Traceback" not in out and "hint: %pool_workers lists known workers" in out
    result, out, _ = _cell(ip, "%pool_connect --protocol-version 9.9 --name y")
    assert isinstance(result.error_in_exec, errors.VersionMismatch)
    server = result.error_in_exec.server
    assert f"--protocol-version {server} (or --protocol-version auto)" in out
    assert len(out.strip().splitlines()) == 2
    ip.run_line_magic("config", "PoolMagics.show_tracebacks = True")
    try:
        _, out, _ = _cell(ip, "%pool_send --to nope status")
    finally:
        ip.run_line_magic("config", "PoolMagics.show_tracebacks = False")
    assert "Traceback" in out and "hint:" not in out


def test_protocol_version_auto_speaks_the_workers_version(ip: InteractiveShell) -> None:
    ip.user_ns["old"] = ("{python} -m pool_notebook.worker --sid {sid} --sock {sock} "
                         "--protocol-version 0.30.0")
    result, out, _ = _cell(ip, '%pool_connect --spawn "$old" --name strict')
    assert isinstance(result.error_in_exec, errors.VersionMismatch)
    assert "--protocol-version 0.30.0 (or --protocol-version auto)" in out
    conn = ip.run_line_magic("pool_connect", '--spawn "$old" --protocol-version auto --name a')
    assert conn.version == "0.30.0"
    assert ip.run_line_magic("pool_send", "status").ok


def test_usage_errors_only_for_the_magic_line(ip: InteractiveShell,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="unrecognized arguments"):
        ip.run_line_magic("pool_connect", "--bogus")
    ip.run_line_magic("pool_connect", "--name x")
    with pytest.raises(UsageError, match="needs Lua code"):
        ip.run_cell_magic("pool_run", "", "  ")
    with pytest.raises(UsageError, match="--respond 'undefined_name' failed: NameError"):
        ip.run_cell_magic("pool_run", "--respond undefined_name", "return 1")
    with pytest.raises(errors.MalformedRequest, match="JSON object"):
        ip.run_cell_magic("pool_send", "", "{not json")
    with pytest.raises(errors.InvalidArgument, match="already open"):
        ip.run_line_magic("pool_connect", "--name x")

    def broken(*_a: Any, **_k: Any) -> Any:
        raise ValueError("a bug in the library")

    monkeypatch.setattr(manager, "connect", broken)
    result, out, _ = _cell(ip, "%pool_connect --name z")
    assert isinstance(result.error_in_exec, ValueError)  # not hidden as a UsageError
    assert "Traceback" in out and "a bug in the library" in out


def test_respond_as_spec_string_and_config_default(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "")
    result, out, _ = _cell(ip, "%%pool_run --respond nosuch:model\nreturn alc.llm('q')")
    assert isinstance(result.error_in_exec, errors.InvalidArgument)
    assert "unknown responder 'nosuch:model'" in out and "Traceback" not in out
    ip.user_ns["shout"] = lambda q: q.prompt.upper()
    ip.run_line_magic("config", "PoolMagics.respond = 'shout'")
    try:
        view = ip.run_cell_magic("pool_run", "", "return alc.llm('a') .. alc.llm('b')")
    finally:
        ip.run_line_magic("config", "PoolMagics.respond = ''")
    assert view.session.result == "AB"


def test_responder_failure_shows_the_paused_session(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "")

    def flaky(query: proto.Query) -> str:
        raise RuntimeError(f"no answer for {query.prompt}")

    ip.user_ns["flaky"] = flaky
    result, out, shown = _cell(ip, "%%pool_run --respond flaky --out s\n"
                                   "return alc.llm('first?')")
    assert isinstance(result.error_in_exec, errors.ResponderError)
    assert "hint: the session is still paused" in out
    assert any("first?" in d.get("text/html", "") for d in shown)  # where it stopped
    session = ip.user_ns["s"]
    assert session.state == "paused"
    pool_notebook.loop.runner.run(session.answer("fine"))
    assert session.result == "fine"


def test_fan_out_background_connections_workers_disconnect(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "--name a")
    ip.run_line_magic("pool_connect", "--name b")
    replies = ip.run_cell_magic("pool_send", "--all", "status")
    assert sorted(r.connection for r in replies) == ["a", "b"] and all(r.ok for r in replies)
    table = ip.run_line_magic("pool_connections", "")
    assert table["name"].tolist() == ["a", "b"] and table["current"].tolist() == ["", "*"]
    workers = ip.run_line_magic("pool_workers", "")
    assert len(workers) == 2 and workers["alive"].all()
    assert ip.run_line_magic("pool_disconnect", "--all --shutdown") == ["a", "b"]
    assert manager.connections == {}


def test_background_send_where_no_loop_runs_between_cells_is_refused(
        ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "--name a")
    result, out, _ = _cell(ip, "t = %pool_send --background --out task status")
    assert isinstance(result.error_in_exec, errors.LoopError)
    assert "Traceback" not in out and "background" in out
    assert "hint: without --background the magic waits for the reply" in out
    assert "task" not in ip.user_ns
    assert ip.run_line_magic("pool_send", "status").ok  # nothing left half-sent


def test_terminal_ipython_background_send_then_await(pool_home: Any) -> None:
    """In terminal IPython the task runs while the prompt waits, and ``await task`` works."""
    import os
    import sys
    import time

    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "IPython", "--no-banner", "--colors=nocolor",
                                           "--no-confirm-exit"],
                          env={**os.environ, "TERM": "xterm"}, encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
    try:
        for number, line in enumerate(["%load_ext pool_notebook", "%pool_connect --name t",
                                       "_ = %pool_send --background --out task status"], 1):
            child.expect(rf"In \[{number}\]:")
            child.sendline(line)
        done = "False"
        for number in range(4, 40):  # the prompt, not a cell, runs the loop in between
            child.expect(rf"In \[{number}\]:")
            if done == "True":
                break
            time.sleep(0.1)
            child.sendline("print('DONE', task.done())")
            child.expect(r"DONE (\w+)")
            done = child.match.group(1)
        assert done == "True"
        child.sendline("reply = await task; print('REPLY', reply.op, reply.outcome)")
        child.expect(r"REPLY (\w+) (\w+)")
        assert (child.match.group(1), child.match.group(2)) == ("status", "ok")
        child.sendline("%pool_disconnect --all --shutdown")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_reconnect_by_sid_picks_up_paused_session(ip: InteractiveShell) -> None:
    conn = ip.run_line_magic("pool_connect", "--name first")
    view = ip.run_cell_magic("pool_run", "", "return 'ok: ' .. alc.llm('resume me')")
    sid = conn.worker_sid
    ip.run_line_magic("pool_disconnect", "first")  # like a kernel restart
    again = ip.run_line_magic("pool_connect", f"--sid {sid} --name second")
    status = ip.run_line_magic("pool_status", "--to second")
    assert status.session_id == view.session.id
    done = pool_notebook.loop.runner.run(again.continue_(status.session_id, "yes"))
    assert done.result == "ok: yes"


def test_timeout_then_late_reply_recorded_once(ip: InteractiveShell) -> None:
    conn = ip.run_line_magic("pool_connect", "")
    result, out, _ = _cell(ip, "%%pool_run --timeout 0.2\n"
                               "local t = os.clock() while os.clock() - t < 0.6 do end return 1")
    assert isinstance(result.error_in_exec, errors.RequestTimeout)
    assert "hint: the connection stays usable" in out
    assert ip.run_line_magic("pool_status", "").ok  # waits for the late reply first
    df = ip.run_line_magic("pool_history", "")
    assert df["op"].tolist() == ["run", "status"]
    assert df["outcome"].tolist() == ["late_reply", "ok"]
    assert df["feed_state"].tolist()[0] == "completed"
    assert conn.client.owed_replies == 0


def test_progress_line_for_long_respond_runs(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "")
    ip.run_line_magic("config", "PoolMagics.progress_after = 0")
    try:
        with capture_output() as captured:
            view = ip.run_cell_magic("pool_run", "--respond 'lambda q: q.prompt.upper()'",
                                     "return alc.llm('a') .. alc.llm('b')")
    finally:
        ip.run_line_magic("config", "PoolMagics.progress_after = 2.0")
    assert view.session.result == "AB"
    shown = "\n".join(str(o.data.get("text/plain", "")) for o in captured.outputs) + \
        captured.stdout
    assert "pause 1, answering 1 query" in shown
    assert "completed, 2 pauses answered" in shown


def test_status_history_shows_the_conversation(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "")
    ip.run_cell_magic("pool_run", "--out s", "local a = alc.llm('first?')\n"
                      "return a .. alc.llm('second?')")
    pool_notebook.loop.runner.run(ip.user_ns["s"].answer("one"))
    reply = ip.run_line_magic("pool_status", "--history")
    assert reply.ok, reply.payload
    page = ip.display_formatter.format(reply)[0]["text/html"]  # as the cell shows it
    table = page.split("conversation history")[1]
    rows = re.findall(r"<tr><td><code>(q-\d+)</code></td><td[^>]*>([^<]*)</td><td[^>]*>([^<]*)",
                      table)
    assert [(p, r) for _q, p, r in rows] == [("first?", "one"), ("second?", "(pending)")]


def test_progress_and_log_from_the_worker_in_the_view(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "")
    view = ip.run_cell_magic("pool_run", "--out s", "alc.log('info', 'starting')\n"
                             "print('printed')\nalc.progress(1, 3, 'asking')\n"
                             "local a = alc.llm('q?')\nalc.progress(3, 3, 'done')\n"
                             "alc.log('warn', 'finishing')\nreturn a")
    paused = view.html()
    assert "<progress value='1' max='3'>" in paused and "1/3 asking" in paused
    assert "[info] starting\n[info] printed" in paused
    pool_notebook.loop.runner.run(ip.user_ns["s"].answer("yes"))
    done = view.html()
    assert "3/3 done" in done
    assert "[info] starting\n[info] printed\n[warn] finishing</pre>" in done


def test_history_plot_is_drawn_once_with_or_without_semicolon(ip: InteractiveShell) -> None:
    ip.run_line_magic("pool_connect", "")
    for _ in range(5):
        ip.run_line_magic("pool_send", "status")
    for line in ("%pool_history --plot;", "%pool_history --plot"):
        result, _, shown = _cell(ip, line)
        assert result.success, result.error_in_exec
        assert sum("image/png" in d for d in shown) == 1, line
        assert result.result is None


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
    assert lua.session.result == 2
    assert "--respond" in ip.find_line_magic("pool_run").__doc__
    assert re.search(r"unless it holds a paused\s+session", ip.find_line_magic(
        "pool_disconnect").__doc__)
    event = SimpleNamespace(line="%%pool_send --to ", symbol="", text_until_cursor="")
    assert complete_names(ip, event) == ["exp", "status", "shutdown"]
    assert complete_names(ip, SimpleNamespace(line="%pool_status --to e")) == ["exp"]
