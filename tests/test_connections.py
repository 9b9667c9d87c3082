"""Connections: late replies land on their own row, algocline's one-session refusal."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from pool_notebook import protocol as proto
from pool_notebook.connections import Connection, ConnectionManager, ConnectionState, _Ticket
from pool_notebook.errors import (
    InvalidArgument,
    RequestTimeout,
    SessionError,
    SessionRefused,
    WorkerError,
)
from pool_notebook.history import History, Outcome
from pool_notebook.session import SessionState
from tests.fakes import FakeWorker, ok

pytestmark = pytest.mark.usefixtures("pool_home")


def _slow_echo(delays: list[float]) -> Any:
    """Fake-worker script: the n-th echo is answered after delays[n] seconds."""
    def script(req: dict[str, Any]) -> Any:
        if req.get("op") != "echo":
            return None
        return [delays.pop(0), ok({"kind": "echo", "token": req.get("token")})]
    return script


def _exit_code(pid: int) -> int:
    """Wait for our child ``pid`` to exit; its exit code."""
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_one_request_object_sent_twice_keeps_each_late_reply_on_its_row(
        run: Callable[[Any], Any]) -> None:
    async def main() -> None:
        async with FakeWorker(_slow_echo([1.0, 0.0])) as fake:
            manager = ConnectionManager(History(None))
            conn = await manager.connect(fake.sock_path)
            request = proto.RawRequest({"op": "echo", "token": "t"})
            with pytest.raises(RequestTimeout):  # sent; its reply comes after 1 s
                await conn.send(request, timeout=0.05)
            with pytest.raises(RequestTimeout, match="before it was sent"):
                await conn.send(request, timeout=0.1)  # the same object, never sent
            await conn.client.settle(timeout=10)
            rows = conn.history.frame()
            assert rows["outcome"].tolist() == ["late_reply", "timeout"]
            assert rows["response_bytes"].tolist()[0] > 0
            assert rows["latency_ms"].tolist()[0] >= 1000.0 > rows["latency_ms"].tolist()[1]
            third = await conn.send(request, timeout=5)  # and the connection still works
            assert third.ok and third.seq == 2 and third.payload["token"] == "t"
            manager.close_all()

    run(main())  # on asyncio and on uvloop


def test_requests_given_up_before_sending_leave_nothing_behind(run: Callable[[Any], Any]) -> None:
    async def main() -> None:
        async with FakeWorker(_slow_echo([0.5])) as fake:
            manager = ConnectionManager(History(None))
            conn = await manager.connect(fake.sock_path)
            first = asyncio.ensure_future(conn.send({"op": "echo"}))
            await asyncio.sleep(0.05)
            for _ in range(200):  # a storm of cancellations while the line is busy
                task = asyncio.ensure_future(conn.send(proto.Status()))
                await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert (await first).ok and conn.client.owed_replies == 0
            gc.collect()  # no per-request bookkeeping survives its request
            assert not [o for o in gc.get_objects() if isinstance(o, _Ticket)]
            outcomes = conn.history.frame()["outcome"].value_counts()
            assert outcomes["cancelled"] == 200 and outcomes["ok"] == 1
            manager.close_all()

    run(main())  # on asyncio and on uvloop


def test_connection_state_and_argument_errors() -> None:
    async def main() -> None:
        async with FakeWorker() as fake:
            manager = ConnectionManager(History(None))
            conn = await manager.connect(fake.sock_path, name="a")
            assert conn.state is ConnectionState.OPEN and conn.state == "open"
            with pytest.raises(InvalidArgument, match="already open") as info:
                await manager.connect(fake.sock_path, name="a")
            assert isinstance(info.value, ValueError)
            with pytest.raises(InvalidArgument, match="without sock or sid"):
                await manager.connect(fake.sock_path, spawn="worker {sid} {sock}")
            with pytest.raises(InvalidArgument, match="did not spawn"):
                await conn.respawn()
            reply = await conn.send("status")
            assert reply.outcome is Outcome.OK and f"{reply.outcome}" == "ok"
            manager.disconnect("a")
            assert conn.state is ConnectionState.CLOSED

    asyncio.run(main())


def test_a_refused_run_on_a_worker_we_did_not_spawn_says_what_to_do() -> None:
    def one_session(req: dict[str, Any]) -> Any:
        if req.get("op") == "run":  # algocline: src/pool_worker.rs refuses a second run
            return [b'{"ok":false,"data":null,"error":"worker already has an active session"}\n']
        return None

    async def main() -> None:
        async with FakeWorker(one_session) as fake:
            manager = ConnectionManager(History(None))
            conn = await manager.connect(fake.sock_path)
            with pytest.raises(SessionRefused, match="one session per process") as info:
                await conn.run("return 1")
            assert isinstance(info.value, WorkerError) and info.value.op == "run"
            assert conn.history.frame()["outcome"].tolist() == ["worker_error"]
            manager.close_all()

    asyncio.run(main())


#: A worker that serves one session per process, as algocline's does (no braces:
#: the spawn command template formats every argument).
_ONE_SESSION_WORKER = textwrap.dedent("""
    import json, os, socket, sys
    path = sys.argv[sys.argv.index("--sock") + 1]
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    runs = 0
    while True:
        conn, _ = server.accept()
        stream = conn.makefile("rwb")
        for line in stream:
            req = json.loads(line)
            op = req.get("op")
            out = dict(ok=False, data=None, error="unknown op")
            if op == "handshake":
                out = dict(ok=True, data=dict(kind="handshake", version=req["version"]),
                           error=None)
            elif op == "run" and runs:
                out["error"] = "worker already has an active session"
            elif op == "run":
                runs = 1
                done = dict(Finished=dict(state=dict(Completed=dict(result=os.getpid())),
                                          metrics=dict()))
                out = dict(ok=True, data=dict(kind="feed", session_id="s-1",
                                              feed_result=done), error=None)
            elif op == "shutdown":
                out = dict(ok=True, data=dict(kind="shutdown"), error=None)
            stream.write(json.dumps(out).encode() + b"\\n")
            stream.flush()
            if op == "shutdown":
                os.unlink(path)
                sys.exit(0)
""")


def test_a_spawned_one_session_worker_is_replaced_for_the_next_run() -> None:
    command = [sys.executable, "-c", _ONE_SESSION_WORKER, "--sid", "{sid}", "--sock", "{sock}"]

    async def main() -> None:
        manager = ConnectionManager(History(None))
        conn: Connection = await manager.connect(spawn=command)
        first = await conn.run("return 1")
        old = conn.worker
        assert first.state is SessionState.COMPLETED and old is not None
        assert first.result == old.pid
        second = await conn.run("return 1")  # refused, so a fresh worker runs it
        assert conn.worker is not None and conn.worker.pid != old.pid
        assert second.result == conn.worker.pid and conn.pid == conn.worker.pid
        rows = conn.history.frame()
        assert rows["op"].tolist() == ["run"] * 3
        assert rows["outcome"].tolist() == ["ok", "worker_error", "ok"]
        assert _exit_code(old.pid) == 0  # the old worker was shut down, not left behind
        await conn.shutdown()
        manager.close_all()

    asyncio.run(main())


def test_respawn_replaces_the_bundled_worker_and_leaves_no_files_behind() -> None:
    async def main() -> None:
        manager = ConnectionManager(History(None))
        conn = await manager.connect()
        old = conn.worker
        assert old is not None and os.path.exists(old.log_path)
        await conn.respawn()
        assert conn.worker is not None and conn.worker.pid != old.pid
        assert (await conn.send("status")).ok and conn.pid == conn.worker.pid
        assert _exit_code(old.pid) == 0  # asked to shut down, and it did
        assert not os.path.exists(old.log_path) and not os.path.exists(old.sock)
        await conn.shutdown()
        manager.close_all()

    asyncio.run(main())


def test_resume_a_paused_session_after_reconnecting_by_sid() -> None:
    async def main() -> None:
        manager = ConnectionManager(History(None))
        first = await manager.connect(name="before")
        assert await first.resume() is None  # no session yet
        session = await first.run("local r = alc.llm_batch({{prompt = 'a?'}, {prompt = 'b?'}, "
                                  "{prompt = 'c?'}})\nreturn table.concat(r, ' ')")
        await session.answer("A")
        sid = first.worker_sid
        manager.disconnect("before")  # like a kernel restart: the paused worker stays
        again = await manager.connect(sid=sid, name="after")
        resumed = await again.resume()
        assert resumed is not None and again.session is resumed
        assert resumed.id == session.id and resumed.state is SessionState.PAUSED
        assert [q.prompt for q in resumed.pending] == ["b?", "c?"]
        await resumed.answer_all(lambda query: query.prompt.upper())
        assert resumed.result == "A B? C?"
        assert await again.resume() is None  # finished: nothing to resume
        await again.shutdown()
        manager.close_all()

    asyncio.run(main())


def test_resume_needs_a_worker_that_reports_its_conversation() -> None:
    def no_transcript(req: dict[str, Any]) -> Any:
        if req.get("op") == "status":
            return [ok({"kind": "status", "has_session": True, "session_id": "s-1"})]
        return None

    async def main() -> None:
        async with FakeWorker(no_transcript) as fake:
            manager = ConnectionManager(History(None))
            conn = await manager.connect(fake.sock_path)
            with pytest.raises(SessionError, match="does not report its conversation"):
                await conn.resume()
            manager.close_all()

    asyncio.run(main())
