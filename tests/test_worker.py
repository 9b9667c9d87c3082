"""The bundled worker as a real subprocess, driven through PoolClient."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from pool_notebook import (
    Completed,
    Failed,
    Finished,
    Paused,
    PoolClient,
    VersionMismatch,
    WorkerError,
    WriteError,
)
from pool_notebook import protocol as proto
from pool_notebook._version import PROTOCOL_VERSION
from pool_notebook.registry import Registry, pid_alive
from pool_notebook.spawn import spawn_and_connect, spawn_worker
from tests.fakes import run, wait_dead

pytestmark = pytest.mark.usefixtures("pool_home")


COT_LIB = {
    "cot/init.lua": """
        local util = require("cot.util")
        local M = {}
        function M.run(opts)
          local steps = {}
          for i = 1, opts.depth do
            steps[i] = util.ask("Step " .. i .. " of " .. opts.task)
          end
          local checks = alc.parallel(steps, function(s) return "check: " .. s end)
          local verdict = alc.vote(checks)
          return { steps = steps, verdict = verdict, score = alc.parse_score(checks[1], 0),
                   empty = {}, none = alc.array({}), ctx = ctx }
        end
        return M
    """,
    "cot/util.lua": """
        local U = {}
        function U.ask(prompt) return alc.llm(prompt, { system = "be brief", max_tokens = 64 }) end
        return U
    """,
}


def test_multi_step_program_with_single_and_batch_pauses(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    for name, src in COT_LIB.items():
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        (lib / name).write_text(textwrap.dedent(src))

    async def main() -> None:
        c, w = await spawn_and_connect()
        async with c:
            feed = await c.run('return require("cot").run({task = "2+2", depth = 2})',
                               ctx={"user": "ada", "tags": []}, lib_paths=[str(lib)])
            sid = feed.session_id
            for i in (1, 2):
                assert isinstance(feed.feed_result, Paused)
                (q,) = feed.feed_result.queries
                assert (q.id, q.prompt, q.system, q.max_tokens) == (
                    "q-0", f"Step {i} of 2+2", "be brief", 64)
                feed = await c.continue_(sid, f"answer {i}")
            assert isinstance(feed.feed_result, Paused)
            assert [q.prompt for q in feed.feed_result.queries] == [
                "check: answer 1", "check: answer 2"]
            st = await c.status(include_history=True)
            assert st.has_session and st.session_id == sid
            history = st.extra["conversation_history"]  # answered ones, then the pending
            assert [(e["query_id"], e["response"]) for e in history] == [
                ("q-0", "answer 1"), ("q-0", "answer 2"), ("q-0", None), ("q-1", None)]
            accepted = await c.continue_(sid, "Score 9", query_id="q-1")
            assert accepted.feed_result == proto.Accepted(1)
            done = await c.continue_(sid, "Score 9", query_id="q-0")
            assert isinstance(done.feed_result, Finished)
            assert isinstance(done.feed_result.outcome, Completed)
            assert done.feed_result.outcome.result == {
                "steps": ["answer 1", "answer 2"],
                "verdict": {"winner": "Score 9", "count": 2, "total": 2}, "score": 9,
                "empty": {}, "none": [], "ctx": {"user": "ada", "tags": []}}
            auto = done.feed_result.metrics["auto"]  # algocline's shape
            assert (auto["rounds"], auto["llm_calls"], auto["pauses"]) == (3, 4, 3)
            assert auto["elapsed_ms"] >= 0
            await c.shutdown()
        assert wait_dead(w.pid)
    run(main())


def test_failed_run_error_replies_and_malformed_lines() -> None:
    async def main() -> None:
        c, _w = await spawn_and_connect()
        async with c:
            failed = await c.run("local function f() error('deep boom') end f()")
            assert isinstance(failed.feed_result, Finished)
            assert isinstance(failed.feed_result.outcome, Failed)
            assert "deep boom" in failed.feed_result.outcome.error
            assert "stack traceback" in failed.feed_result.outcome.error
            with pytest.raises(WorkerError, match="no paused session to continue"):
                await c.continue_("s-x", "hi")
            paused = await c.run("return alc.llm('a') .. alc.llm('b')")
            with pytest.raises(WorkerError, match="worker already has an active session"):
                await c.run("return 1")
            with pytest.raises(WorkerError, match="unknown session id"):
                await c.continue_("s-wrong", "x")
            with pytest.raises(WorkerError, match="unknown query_id"):
                await c.continue_(paused.session_id, "x", query_id="q-9")
            bad = await c.send_request(proto.RawRequest({"op": "fly"}))
            assert not bad.ok and bad.error.startswith("malformed request:")
            bad2 = await c.send_request(proto.RawRequest({"op": "run"}))
            assert not bad2.ok and "malformed request" in bad2.error
            assert (await c.status()).has_session  # still serving
            await c.shutdown()
    run(main())


def test_raw_malformed_bytes_then_good_lines(tmp_path: Path) -> None:
    async def main() -> None:
        worker = await spawn_worker()
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(worker.sock)
        f = sock.makefile("rwb")
        f.write(json.dumps({"op": "handshake", "version": PROTOCOL_VERSION}).encode() + b"\n")
        f.flush()
        assert json.loads(f.readline())["ok"]
        for garbage in (b"not json\n", b"\xff\xfe\n", b"[1]\n", b'{"op":"status"\n'):
            f.write(garbage)
            f.write(b'{"op":"status"}\n')
            f.flush()
            reply = json.loads(f.readline())
            assert reply["ok"] is False and reply["error"].startswith("malformed request:")
            assert json.loads(f.readline())["data"]["kind"] == "status"
        f.write(b'{"op":"shutdown"}\n')
        f.flush()
        assert json.loads(f.readline())["data"]["kind"] == "shutdown"
        sock.close()
        assert wait_dead(worker.pid)
    run(main())


def test_handshake_version_and_first_message_rules() -> None:
    async def main() -> None:
        worker = await spawn_worker(
            "{python} -m pool_notebook.worker --sid {sid} --sock {sock} "
            "--protocol-version 0.32.0 --idle-timeout 30")
        with pytest.raises(VersionMismatch) as info:
            await PoolClient.connect(worker.sock)
        assert (info.value.client, info.value.server) == (PROTOCOL_VERSION, "0.32.0")
        c = await PoolClient.connect(worker.sock, version="0.32.0")
        await c.shutdown()
    run(main())


def test_socket_modes_and_oversized_line(pool_home: Path) -> None:
    async def main() -> None:
        c, w = await spawn_and_connect()
        assert stat.S_IMODE(os.stat(w.sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(w.sock)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(Registry.default().path).st_mode) == 0o600
        # the worker refuses the line past 16 MiB and closes: the rest cannot be written
        with pytest.raises((WriteError, WorkerError)):
            await c.run("x" * (17 * 1024 * 1024))
        c.close()
        c2 = await PoolClient.connect(w.sock)  # worker survived the oversized line
        assert not (await c2.status()).has_session
        await c2.shutdown()
    run(main())


def test_reconnect_to_paused_session_after_disconnect() -> None:
    async def main() -> None:
        c, w = await spawn_and_connect()
        feed = await c.run("return 'got ' .. alc.llm('still there?')")
        c.close()  # the kernel "restarts": the paused worker must wait for us
        await asyncio.sleep(0.2)
        assert pid_alive(w.pid)
        entry = Registry.default().find(w.sid)
        assert entry is not None and entry.sock == w.sock
        c2 = await PoolClient.connect(entry.sock)
        st = await c2.status()
        assert st.has_session and st.session_id == feed.session_id
        done = await c2.continue_(feed.session_id, "yes")
        assert done.feed_result.outcome == Completed("got yes")
        c2.close()  # not paused any more: the worker exits and deregisters itself
        assert wait_dead(w.pid)
        assert Registry.default().find(w.sid) is None
    run(main())


def test_idle_timeout_exit() -> None:
    async def main() -> None:
        c, w = await spawn_and_connect(env={"POOL_WORKER_IDLE_TIMEOUT": "0.5"})
        await c.run("return alc.llm('wait')")  # paused: disconnect alone would not exit
        c.close()
        assert wait_dead(w.pid, 10)
        assert Registry.default().find(w.sid) is None
        assert not os.path.exists(w.sock)
        assert not os.path.exists(w.log_path)  # a clean exit removes its log
    run(main())


@pytest.mark.parametrize("code", ["return alc.llm('x')", "while true do end"])
def test_sigterm_exit_with_registry_cleanup(code: str) -> None:
    async def main() -> None:
        c, w = await spawn_and_connect()
        task = asyncio.create_task(c.run(code))
        await asyncio.sleep(0.3)  # paused, or spinning in an endless Lua loop
        os.kill(w.pid, signal.SIGTERM)
        assert wait_dead(w.pid, 10)
        assert Registry.default().find(w.sid) is None
        assert not os.path.exists(w.sock)
        task.cancel()
        c.close()
    run(main())


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("os.execute('touch /tmp/pwned')", "execute"),
        ("return io.popen('id')", "io"),
        ("os.exit(3)", "exit"),
        ("return package.loadlib('x', 'y')", "loadlib"),
        ("local f = io.open('/tmp/pwned', 'w')", "io"),
        ("return python.eval('1')", "python"),
        ("return load(string.dump(print))", "dump"),
    ],
)
def test_sandbox_refusals(code: str, message: str) -> None:
    async def main() -> None:
        c, _w = await spawn_and_connect()
        async with c:
            feed = await c.run(code)
            assert isinstance(feed.feed_result, Finished)
            assert isinstance(feed.feed_result.outcome, Failed)
            assert message in feed.feed_result.outcome.error
            await c.shutdown()
    run(main())


def test_memory_cap() -> None:
    async def main() -> None:
        c, _w = await spawn_and_connect(
            "{python} -m pool_notebook.worker --sid {sid} --sock {sock} --max-memory-mb 32")
        async with c:
            feed = await c.run("local t = {} for i = 1, 1e8 do t[i] = ('x'):rep(64) .. i end")
            assert isinstance(feed.feed_result.outcome, Failed)
            assert "memory cap of 32 MiB" in feed.feed_result.outcome.error
            ok = await c.run("return 1 + 1")  # the worker survives
            assert ok.feed_result.outcome == Completed(2)
            await c.shutdown()
    run(main())


def test_algocline_argument_order_and_console_script() -> None:
    async def main() -> None:
        script = os.path.join(os.path.dirname(sys.executable), "pool-notebook-worker")
        c, _w = await spawn_and_connect(
            [script, "pool-worker", "--sid", "{sid}", "--sock", "{sock}"])
        assert (await c.run("return ctx.n * 2", ctx={"n": 21})).feed_result.outcome == \
            Completed(42)
        await c.shutdown()
    run(main())


def test_idle_timeout_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pool_notebook.worker.server import idle_timeout_from_env

    monkeypatch.delenv("POOL_WORKER_IDLE_TIMEOUT", raising=False)
    monkeypatch.delenv("ALC_POOL_IDLE_TIMEOUT", raising=False)
    assert idle_timeout_from_env() == 1800.0
    monkeypatch.setenv("ALC_POOL_IDLE_TIMEOUT", "0")
    assert idle_timeout_from_env() == 0.0  # algocline's variable, 0 disables
    monkeypatch.setenv("POOL_WORKER_IDLE_TIMEOUT", "12.5")
    assert idle_timeout_from_env() == 12.5  # ours wins
    for bad in ("soon", "nan", "inf", "-1"):
        monkeypatch.setenv("POOL_WORKER_IDLE_TIMEOUT", bad)
        assert idle_timeout_from_env() == 1800.0  # refused with a warning: the default


def test_paused_replies_carry_progress_and_new_log_lines() -> None:
    async def main() -> None:
        c, _w = await spawn_and_connect()
        async with c:
            code = """
                alc.log("info", "first")
                alc.progress(1, 2, "asking")
                local a = alc.llm("one?")
                alc.log("warn", "second")
                return alc.llm("two?") .. a
            """
            first = await c.run(code)
            assert [e["message"] for e in first.extra["recent_logs"]] == ["first"]
            assert first.extra["progress"] == {"step": 1, "total": 2, "message": "asking"}
            second = await c.continue_(first.session_id, "1")
            assert [(e["level"], e["message"]) for e in second.extra["recent_logs"]] == [
                ("warn", "second")]  # only lines new since the previous reply
            done = await c.continue_(first.session_id, "2")
            assert isinstance(done.feed_result, Finished)
            assert "recent_logs" not in done.extra  # Finished: they are in the metrics
            assert [e["message"] for e in done.feed_result.metrics["recent_logs"]] == [
                "first", "second"]
            await c.shutdown()
    run(main())
