"""The extension in a real ipykernel (jupyter_client), as JupyterLab drives it."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

pytestmark = [pytest.mark.kernel]


@pytest.fixture
def kernel(pool_home: Path) -> Iterator[Any]:
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env={**os.environ, "POOL_NOTEBOOK_WIDGETS": "1"})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        yield km, kc
    finally:
        kc.execute("%pool_disconnect --all --shutdown", store_history=False)
        time.sleep(0.5)
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _collect(kc: Any, msg_ids: list[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Outputs and execute_reply status per msg_id, until every cell went idle."""
    results = {m: {"stdout": "", "data": [], "error": None, "status": None} for m in msg_ids}
    pending = set(msg_ids)
    deadline = time.monotonic() + timeout
    while pending:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"kernel stopped answering; cells never finished: {pending}") from None
        parent = msg["parent_header"].get("msg_id")
        if parent not in results:
            continue
        kind, content = msg["msg_type"], msg["content"]
        r = results[parent]
        if kind == "stream":
            r["stdout"] += content["text"]
        elif kind in ("execute_result", "display_data"):
            r["data"].append(content["data"])
        elif kind == "error":
            r["error"] = f"{content['ename']}: {content['evalue']}"
            r["traceback"] = content["traceback"]
        elif kind == "status" and content["execution_state"] == "idle":
            pending.discard(parent)
    return results


def _exec(kc: Any, code: str, timeout: float = 60) -> dict[str, Any]:
    msg_id = kc.execute(code)
    return _collect(kc, [msg_id], timeout)[msg_id]


def test_run_all_queued_cells_all_run_in_order(kernel: Any) -> None:
    _km, kc = kernel
    setup = _exec(kc, "import pool_notebook\n%load_ext pool_notebook\nc = %pool_connect --name k\n"
                      "print(c.version == pool_notebook.PROTOCOL_VERSION)")
    assert setup["error"] is None, setup
    assert setup["stdout"].strip() == "True"
    cells = [f"r = %pool_send status\nprint({i}, r.outcome, r.seq)" for i in range(8)]
    ids = [kc.execute(code) for code in cells]  # queued at once, as "Run All" does
    results = _collect(kc, ids, timeout=90)
    outs = [results[m]["stdout"].split() for m in ids]
    assert [o[0] for o in outs] == [str(i) for i in range(8)]
    assert all(o[1] == "ok" for o in outs)
    assert [int(o[2]) for o in outs] == list(range(8))


def test_interrupt_during_slow_request_then_connection_works(kernel: Any) -> None:
    km, kc = kernel
    assert _exec(kc, "%load_ext pool_notebook\n%pool_connect --name k")["error"] is None
    slow = kc.execute("%%pool_run\nlocal t = os.clock() while os.clock() - t < 1.5 do end\n"
                      "return 'slow done'")
    time.sleep(0.6)
    km.interrupt_kernel()
    result = _collect(kc, [slow])[slow]
    assert result["error"] is not None and "KeyboardInterrupt" in result["error"]
    after = _exec(kc, "r = %pool_send status\nprint(r.outcome)\n"
                      "df = %pool_history\nprint(list(df.outcome), df.feed_state.iloc[0])")
    assert after["error"] is None, after
    lines = after["stdout"].splitlines()
    assert lines[0] == "ok"
    assert lines[1] == "['late_reply', 'ok'] completed"


def test_widget_send_click_as_comm_message_continues_the_worker(kernel: Any) -> None:
    _km, kc = kernel
    assert _exec(kc, "%load_ext pool_notebook\n%pool_connect --name k")["error"] is None
    cell = _exec(kc, "%%pool_run --out session\nreturn 'got ' .. alc.llm('ping?')")
    assert cell["error"] is None, cell
    assert any("application/vnd.jupyter.widget-view+json" in d for d in cell["data"])
    probe = _exec(kc, "view = _\ntxt, btn = view.answer_widgets('q-0')\n"
                      "print(btn.model_id, txt.model_id)")
    assert probe["error"] is None, probe
    button_id, text_id = probe["stdout"].split()
    # what the browser sends: a state update for the textarea, then a click event
    kc.session.send(kc.shell_channel.socket, "comm_msg", {
        "comm_id": text_id, "data": {"method": "update", "state": {"value": "pong"},
                                     "buffer_paths": []}})
    kc.session.send(kc.shell_channel.socket, "comm_msg", {
        "comm_id": button_id, "data": {"method": "custom", "content": {"event": "click"}}})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = _exec(kc, "print(session.result)")
        if out["stdout"].strip() == "got pong":
            break
        time.sleep(0.2)
    assert out["stdout"].strip() == "got pong"


def test_failed_lua_and_history_plot_as_the_kernel_sends_them(kernel: Any) -> None:
    _km, kc = kernel
    assert _exec(kc, "%load_ext pool_notebook\n%pool_connect --name k")["error"] is None
    failed = _exec(kc, "%%pool_run\nlocal x = 1\nerror('boom from Lua')")
    assert failed["error"] is None, failed  # the request worked; the Lua failed, shown as such
    page = next(d["text/html"] for d in failed["data"] if "text/html" in d)
    head, _, rest = page.partition("boom from Lua")
    assert "failed" in head and ">ok<" not in head
    assert "line 3:" in rest.split("<details>")[0] and "xpcall" not in rest.split("<details>")[0]
    plot = _exec(kc, "%pool_history --plot;")
    assert plot["error"] is None, plot
    assert sum("image/png" in d for d in plot["data"]) == 1
    missing = _exec(kc, "%pool_send --to nope status")  # a library error: one line + hint
    assert missing["error"].startswith("ConnectionNotFound: no connection named 'nope'")
    shown = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in missing["traceback"]]
    assert len(shown) == 2 and shown[1].startswith("hint: %pool_connections")


def test_background_send_while_other_cells_run(kernel: Any) -> None:
    _km, kc = kernel
    assert _exec(kc, "%load_ext pool_notebook\n%pool_connect --name k")["error"] is None
    bg = _exec(kc, "%%pool_run --out v\nlocal t = os.clock() while os.clock() - t < 0.2 do end\n"
                   "return 1")
    assert bg["error"] is None
    ids = [kc.execute("t = %pool_send --background --out task status"),
           kc.execute("print('other cell ran', task.done())"),
           kc.execute("import asyncio\nr = await task\nprint(r.outcome)")]
    results = _collect(kc, ids)
    assert results[ids[1]]["stdout"].startswith("other cell ran")
    assert results[ids[2]]["stdout"].strip() == "ok"


def _wait_for_rows(db: Path, n: int, limit: float = 15.0) -> None:
    """Until the history's background writer has put ``n`` rows into SQLite."""
    import sqlite3

    deadline = time.monotonic() + limit
    count = 0
    while time.monotonic() < deadline:
        if db.exists():
            with contextlib.closing(sqlite3.connect(db, timeout=5)) as con, \
                    contextlib.suppress(sqlite3.OperationalError):  # no table yet
                count = con.execute("SELECT count(*) FROM requests").fetchone()[0]
        if count >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} of {n} history rows reached {db}")


def test_kernel_restart_keeps_history_and_paused_session(kernel: Any, tmp_path: Path) -> None:
    km, kc = kernel
    first = _exec(kc, "%load_ext pool_notebook\nc = %pool_connect --name k\n"
                      "%pool_send status\nprint(c.worker_sid)")
    assert first["error"] is None, first
    paused = _exec(kc, "%%pool_run\nreturn 'after restart: ' .. alc.llm('still paused?')")
    assert paused["error"] is None, paused
    sid = first["stdout"].split()[-1]
    _wait_for_rows(Path(os.environ["POOL_NOTEBOOK_HISTORY"]), 2)  # durable within a second
    km.restart_kernel(now=True)  # SIGKILL: only what reached SQLite survives
    kc.wait_for_ready(timeout=60)
    again = _exec(kc, f"%load_ext pool_notebook\nc = %pool_connect --sid {sid} --name k2\n"
                      "st = %pool_status\n"
                      "done = await c.continue_(st.session_id, 'yes')\nprint(done.result)\n"
                      "df = %pool_history --all-sessions\n"
                      "print(df.kernel_session.nunique(), list(df.op))")
    assert again["error"] is None, again
    lines = again["stdout"].splitlines()
    assert lines[0] == "after restart: yes"
    assert lines[1] == "2 ['status', 'run', 'status', 'continue']"
