"""The extension in a real ipykernel (jupyter_client), as JupyterLab drives it."""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import kernel_outputs, run_cell

pytestmark = [pytest.mark.kernel]


def test_run_all_queued_cells_all_run_in_order(kernel: Any) -> None:
    _km, kc = kernel
    setup = run_cell(kc, "import pool_notebook\n%load_ext pool_notebook\n"
                     "c = %pool_connect --name k\n"
                     "print(c.version == pool_notebook.PROTOCOL_VERSION)")
    assert setup["error"] is None, setup
    assert setup["stdout"].strip() == "True"
    cells = [f"r = %pool_send status\nprint({i}, r.outcome, r.seq)" for i in range(8)]
    ids = [kc.execute(code) for code in cells]  # queued at once, as "Run All" does
    results = kernel_outputs(kc, ids, timeout=90)
    outs = [results[m]["stdout"].split() for m in ids]
    assert [o[0] for o in outs] == [str(i) for i in range(8)]
    assert all(o[1] == "ok" for o in outs)
    assert [int(o[2]) for o in outs] == list(range(8))


def test_interrupt_during_slow_request_then_connection_works(kernel: Any) -> None:
    km, kc = kernel
    assert run_cell(kc, "%load_ext pool_notebook\n%pool_connect --name k")["error"] is None
    slow = kc.execute("%%pool_run\nlocal t = os.clock() while os.clock() - t < 1.5 do end\n"
                      "return 'slow done'")
    time.sleep(0.6)
    km.interrupt_kernel()
    result = kernel_outputs(kc, [slow])[slow]
    assert result["error"] is not None and "KeyboardInterrupt" in result["error"]
    after = run_cell(kc, "r = %pool_send status\nprint(r.outcome)\n"
                     "df = %pool_history\nprint(list(df.outcome), df.feed_state.iloc[0])")
    assert after["error"] is None, after
    lines = after["stdout"].splitlines()
    assert lines[0] == "ok"
    assert lines[1] == "['late_reply', 'ok'] completed"


def test_widget_send_click_as_comm_message_continues_the_worker(kernel: Any) -> None:
    _km, kc = kernel
    assert run_cell(kc, "%load_ext pool_notebook\n%pool_connect --name k")["error"] is None
    cell = run_cell(kc, "%%pool_run --out session\nreturn 'got ' .. alc.llm('ping?')")
    assert cell["error"] is None, cell
    assert any("application/vnd.jupyter.widget-view+json" in d for d in cell["data"])
    probe = run_cell(kc, "view = _\ntxt, btn = view.answer_widgets('q-0')\n"
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
        out = run_cell(kc, "print(session.result)")
        if out["stdout"].strip() == "got pong":
            break
        time.sleep(0.2)
    assert out["stdout"].strip() == "got pong"


def test_failed_lua_and_history_plot_as_the_kernel_sends_them(kernel: Any) -> None:
    _km, kc = kernel
    assert run_cell(kc, "%load_ext pool_notebook\n%pool_connect --name k")["error"] is None
    failed = run_cell(kc, "%%pool_run\nlocal x = 1\nerror('boom from Lua')")
    assert failed["error"] is None, failed  # the request worked; the Lua failed, shown as such
    page = next(d["text/html"] for d in failed["data"] if "text/html" in d)
    head, _, rest = page.partition("boom from Lua")
    assert "failed" in head and ">ok<" not in head
    assert "line 3:" in rest.split("<details>")[0] and "xpcall" not in rest.split("<details>")[0]
    plot = run_cell(kc, "%pool_history --plot;")
    assert plot["error"] is None, plot
    assert sum("image/png" in d for d in plot["data"]) == 1
    missing = run_cell(kc, "%pool_send --to nope status")  # a library error: one line + hint
    assert missing["error"].startswith("ConnectionNotFound: no connection named 'nope'")
    shown = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in missing["traceback"]]
    assert len(shown) == 2 and shown[1].startswith("hint: %pool_connections")


def test_background_send_while_other_cells_run(kernel: Any) -> None:
    _km, kc = kernel
    assert run_cell(kc, "%load_ext pool_notebook\n%pool_connect --name k")["error"] is None
    bg = run_cell(kc, "%%pool_run --out v\nlocal t = os.clock() while os.clock() - t < 0.2 do end\n"
                  "return 1")
    assert bg["error"] is None
    ids = [kc.execute("t = %pool_send --background --out task status"),
           kc.execute("print('other cell ran', task.done())"),
           kc.execute("import asyncio\nr = await task\nprint(r.outcome)")]
    results = kernel_outputs(kc, ids)
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
    first = run_cell(kc, "%load_ext pool_notebook\nc = %pool_connect --name k\n"
                     "%pool_send status\nprint(c.worker_sid)")
    assert first["error"] is None, first
    paused = run_cell(kc, "%%pool_run\nreturn 'after restart: ' .. alc.llm('still paused?')")
    assert paused["error"] is None, paused
    sid = first["stdout"].split()[-1]
    _wait_for_rows(Path(os.environ["POOL_NOTEBOOK_HISTORY"]), 2)  # durable within a second
    km.restart_kernel(now=True)  # SIGKILL: only what reached SQLite survives
    kc.wait_for_ready(timeout=60)
    again = run_cell(kc, f"%load_ext pool_notebook\nc = %pool_connect --sid {sid} --name k2\n"
                     "st = %pool_status\n"
                     "done = await c.continue_(st.session_id, 'yes')\nprint(done.result)\n"
                     "df = %pool_history --all-sessions\n"
                     "print(df.kernel_session.nunique(), list(df.op))")
    assert again["error"] is None, again
    lines = again["stdout"].splitlines()
    assert lines[0] == "after restart: yes"
    assert lines[1] == "2 ['status', 'run', 'status', 'continue']"
