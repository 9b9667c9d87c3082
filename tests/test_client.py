"""PoolClient against fake workers on real Unix sockets: every failure mode, typed."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import pytest

from pool_notebook import (
    PROTOCOL_VERSION,
    ClientClosed,
    ConnectError,
    ConnectionBroken,
    ConnectionClosed,
    HandshakeError,
    HandshakeTimeout,
    InsecureSocketError,
    PoolClient,
    RawRequest,
    RequestTimeout,
    ResponseParseError,
    ResponseTooLarge,
    Status,
    UnsolicitedResponse,
    VersionMismatch,
    WorkerError,
)
from pool_notebook import protocol as proto
from pool_notebook.client import LateReply
from pool_notebook.errors import ConnectTimeout
from pool_notebook.security import check_peer
from pool_notebook.spawn import spawn_and_connect
from tests.fakes import CLOSE, HANG, Dribble, FakeWorker, err, ok

Runner = Callable[[Any], Any]  # the conftest ``run`` fixture: asyncio, then uvloop


def test_seed_scenario_handshake_run_continue_shutdown(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker() as w, await PoolClient.connect(w.sock_path) as c:
            assert c.server_version == w.version
            feed = await c.run("return alc.llm('2+2?')", ctx={"a": 1}, lib_paths=["/x"])
            assert isinstance(feed.feed_result, proto.Paused)
            assert feed.feed_result.queries[0].prompt == "2+2?"
            done = await c.continue_(feed.session_id, "4", query_id="q-0")
            assert isinstance(done.feed_result, proto.Finished)
            assert done.feed_result.outcome == proto.Completed("4")
            assert isinstance(await c.shutdown(), proto.ShutdownData)
            assert c.closed
            assert [r["op"] for r in w.requests] == [
                "handshake", "run", "continue", "shutdown"]
            assert w.requests[1] == {"op": "run", "code": "return alc.llm('2+2?')",
                                     "ctx": {"a": 1}, "lib_paths": ["/x"]}
    run(main())


def test_version_mismatch_rejected_by_worker(run: Runner) -> None:
    def reject(req: dict) -> list | None:
        if req["op"] == "handshake":
            return [err(f"version mismatch: client={req['version']}, server=0.31.0")]
        return None

    async def main() -> None:
        async with FakeWorker(reject) as w:
            with pytest.raises(VersionMismatch) as info:
                await PoolClient.connect(w.sock_path, version="0.30.0")
            assert (info.value.client, info.value.server) == ("0.30.0", "0.31.0")
            assert "version='0.31.0'" in str(info.value)
    run(main())


def test_wrong_echoed_version_refused_by_client(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(version="9.9.9") as w:
            with pytest.raises(VersionMismatch) as info:
                await PoolClient.connect(w.sock_path)
            assert info.value.server == "9.9.9"
            c = await PoolClient.connect(w.sock_path, version="9.9.9")
            assert c.server_version == "9.9.9"
            c.close()
    run(main())


def test_handshake_garbage_and_early_close(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(lambda r: [b"hello there\n"]) as w:
            with pytest.raises(HandshakeError, match="not valid"):
                await PoolClient.connect(w.sock_path)
        async with FakeWorker(lambda r: [b'{"ok":tr', CLOSE]) as w:
            with pytest.raises(HandshakeError, match="closed"):
                await PoolClient.connect(w.sock_path)
        async with FakeWorker(lambda r: [ok({"kind": "status"})]) as w:
            with pytest.raises(HandshakeError, match="kind='status'"):
                await PoolClient.connect(w.sock_path)
    run(main())


def test_handshake_timeout_when_worker_never_answers(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(lambda r: [HANG]) as w:
            with pytest.raises(HandshakeTimeout) as info:
                await PoolClient.connect(w.sock_path, handshake_timeout=0.2)
            assert isinstance(info.value, TimeoutError)
            assert "handshake recv timeout (0.2s)" in str(info.value)
    run(main())


def test_handshake_timeout_when_worker_never_accepts(tmp_path, run: Runner) -> None:
    path = str(tmp_path / "n.sock")
    os.chmod(tmp_path, 0o700)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(0)  # never accept()

    async def main() -> None:
        with pytest.raises(HandshakeTimeout):
            await PoolClient.connect(path, handshake_timeout=0.2)
    try:
        run(main())
    finally:
        srv.close()


def test_connect_errors_and_path_checks(tmp_path, run: Runner) -> None:
    os.chmod(tmp_path, 0o700)

    async def main() -> None:
        with pytest.raises(ConnectError, match="no such socket file") as info:
            await PoolClient.connect(tmp_path / "missing.sock")
        assert isinstance(info.value.__cause__, FileNotFoundError)
        regular = tmp_path / "file"
        regular.write_text("x")
        with pytest.raises(InsecureSocketError, match="not a socket"):
            await PoolClient.connect(regular)
        # a socket file nobody listens on: connect() itself fails
        dead = tmp_path / "dead.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(dead))
        s.close()
        with pytest.raises(ConnectError, match="refused") as info2:
            await PoolClient.connect(dead)
        assert isinstance(info2.value.__cause__, OSError)

        async with FakeWorker() as w:
            directory = os.path.dirname(w.sock_path)
            os.chmod(directory, 0o777)
            with pytest.raises(InsecureSocketError, match="writable by group or others"):
                await PoolClient.connect(w.sock_path)
            c = await PoolClient.connect(w.sock_path, allow_insecure=True)
            c.close()
            os.chmod(directory, 0o700)
            link = tmp_path / "link"
            link.symlink_to(directory)
            with pytest.raises(InsecureSocketError, match="symlink"):
                await PoolClient.connect(link / "w.sock")
    run(main())


def test_peer_of_another_user_is_refused(monkeypatch) -> None:
    a, b = socket.socketpair()
    try:
        assert check_peer(a, "p") is not None  # same user: fine
        monkeypatch.setattr("pool_notebook.security.os.geteuid", lambda: 4242)
        with pytest.raises(InsecureSocketError, match="runs as uid"):
            check_peer(a, "p")
        assert check_peer(a, "p", allow_insecure=True) is not None
    finally:
        a.close()
        b.close()


def test_dribbled_reply_and_typed_worker_error(run: Runner) -> None:
    def script(req: dict) -> list | None:
        if req["op"] == "status":
            return [Dribble(ok({"kind": "status", "has_session": True, "session_id": "s"}))]
        if req["op"] == "run":
            return [err("worker already has an active session")]
        return None

    async def main() -> None:
        async with FakeWorker(script) as w, await PoolClient.connect(w.sock_path) as c:
            st = await c.status()
            assert st.has_session and st.session_id == "s"
            raw = await c.send_request(proto.Run("x"))
            assert raw.ok is False and raw.error == "worker already has an active session"
            with pytest.raises(WorkerError) as info:
                await c.run("x")
            assert info.value.op == "run" and "active session" in info.value.message
            assert (await c.status()).has_session  # still usable
    run(main())


@pytest.mark.parametrize(
    "garbage",
    [b"not json\n", b"\xff\xfe\n", b'{"ok":1}\n', b'{"ok":true,"data":{"kind":"x","v":NaN}}\n',
     b"\xef\xbb\xbf{}\n"],
)
def test_garbage_reply_is_a_parse_error_and_connection_survives(
    garbage: bytes, run: Runner
) -> None:
    def script(req: dict) -> list | None:
        return [garbage] if req.get("token") == "bad" else None

    async def main() -> None:
        async with FakeWorker(script) as w, await PoolClient.connect(w.sock_path) as c:
            with pytest.raises(ResponseParseError) as info:
                await c.send_request(RawRequest({"op": "echo", "token": "bad"}))
            assert info.value.data == garbage.rstrip(b"\n")
            r = await c.send_request(RawRequest({"op": "echo", "token": 7}))
            assert r.raw["data"]["token"] == 7
    run(main())


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        ([b'{"ok":true,"da', CLOSE], ConnectionClosed),
        ([CLOSE], ConnectionClosed),
        ([b"x" * 5000 + b"\n"], ResponseTooLarge),
    ],
)
def test_stream_failures_break_the_connection_sticky(
    steps: list, error: type, run: Runner
) -> None:
    async def main() -> None:
        async with FakeWorker(lambda r: steps if r["op"] == "status" else None) as w:
            c = await PoolClient.connect(w.sock_path, max_line_bytes=4096)
            with pytest.raises(error) as info:
                await c.status()
            if error is ConnectionClosed:
                assert "closed the connection" in str(info.value)
            assert c.broken is not None
            with pytest.raises(ConnectionBroken, match="close it and connect again"):
                await c.status()
            c.close()
            c.close()  # twice is fine
            with pytest.raises(ClientClosed):
                await c.status()
    run(main())


def test_too_large_names_the_limit(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(lambda r: [b"y" * 10000] if r["op"] == "status" else None) as w:
            c = await PoolClient.connect(w.sock_path, max_line_bytes=4096)
            with pytest.raises(ResponseTooLarge) as info:
                await c.status()
            assert "max_line_bytes=4096" in str(info.value)
            assert c.broken is not None
            c.close()
    run(main())


def test_two_replies_at_once_is_detected_not_misdelivered(run: Runner) -> None:
    def script(req: dict) -> list | None:
        if req.get("token") == 1:
            return [ok({"kind": "echo", "token": 1}) + ok({"kind": "echo", "token": "extra"})]
        return None

    async def main() -> None:
        async with FakeWorker(script) as w, await PoolClient.connect(w.sock_path) as c:
            r = await c.send_request(RawRequest({"op": "echo", "token": 1}))
            assert r.raw["data"]["token"] == 1
            with pytest.raises(UnsolicitedResponse, match="nobody asked for"):
                await c.send_request(RawRequest({"op": "echo", "token": 2}))
            with pytest.raises(ConnectionBroken):
                await c.send_request(RawRequest({"op": "echo", "token": 3}))
    run(main())


def test_unsolicited_line_while_idle_is_detected(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(
            lambda r: [ok({"kind": "handshake", "version": r["version"]}),
                       ok({"kind": "surprise"})] if r["op"] == "handshake" else None
        ) as w, await PoolClient.connect(w.sock_path) as c:
            await asyncio.sleep(0.05)
            with pytest.raises(UnsolicitedResponse, match="nobody asked for"):
                await c.status()
    run(main())


def test_timeout_keeps_connection_usable_and_reports_late_reply(run: Runner) -> None:
    def script(req: dict) -> list | None:
        if req.get("token") == "slow":
            return [0.3, ok({"kind": "echo", "token": "slow"})]
        return None

    async def main() -> None:
        late: list[LateReply] = []
        async with FakeWorker(script) as w, await PoolClient.connect(
            w.sock_path, on_late_reply=late.append
        ) as c:
            with pytest.raises(RequestTimeout) as info:
                await c.send_request(RawRequest({"op": "echo", "token": "slow"}), timeout=0.05)
            assert isinstance(info.value, TimeoutError) and info.value.op == "echo"
            assert c.owed_replies == 1
            r = await c.send_request(RawRequest({"op": "echo", "token": "next"}), timeout=2)
            assert r.raw["data"]["token"] == "next"
            assert len(late) == 1 and late[0].response is not None
            assert late[0].response.raw["data"]["token"] == "slow"
            assert late[0].latency_ns >= 250_000_000
    run(main())


def test_polls_only_for_kinds_of_request_that_answer_within_the_window(run: Runner) -> None:
    """After a write the client polls (spins) for a kind of request only while its
    replies come within ``spin_seconds``; a kind that outlasted the window is re-measured
    every 16th time, so one slow reply does not stop the polling for good."""
    slow = {"status": True}

    def script(req: dict) -> list | None:
        if req["op"] == "status" and slow["status"]:
            return [0.02, ok({"kind": "status", "has_session": False, "session_id": None})]
        return None  # the default reply, at once (run: a pause)

    async def main() -> None:
        async with FakeWorker(script) as w, await PoolClient.connect(
                w.sock_path, spin_seconds=0.005) as c:
            polled: list[tuple[str, bool]] = []
            next_event = c._next_event

            async def recording(spin: float):  # type: ignore[no-untyped-def]
                polled.append((kind, spin > 0))
                return await next_event(spin)

            c._next_event = recording  # type: ignore[method-assign]
            kind = "status"
            for _ in range(20):
                await c.send_request(proto.Status())
            assert [p for _k, p in polled] == [True] + [False] * 15 + [True] + [False] * 3
            polled.clear()
            kind = "run"
            await c.send_request(proto.Run("return 1"))  # another kind: polled on its own
            slow["status"] = False
            kind = "status"
            for _ in range(13):
                await c.send_request(proto.Status())
            # 12 more unpolled, then the re-measure (fast now): polled from there on
            assert [p for _k, p in polled] == [True] + [False] * 12 + [True]
            await c.send_request(proto.Status())
            assert polled[-1] == ("status", True)
    run(main())


def test_new_request_times_out_clearly_while_late_reply_is_outstanding(run: Runner) -> None:
    def script(req: dict) -> list | None:
        return [HANG] if req.get("token") == "never" else None

    async def main() -> None:
        async with FakeWorker(script) as w, await PoolClient.connect(w.sock_path) as c:
            with pytest.raises(RequestTimeout):
                await c.send_request(RawRequest({"op": "echo", "token": "never"}), timeout=0.05)
            with pytest.raises(RequestTimeout, match="late reply of an earlier 'echo'"):
                await c.status(timeout=0.1)
            assert c.broken is None
    run(main())


def test_fifo_callers_each_get_their_own_reply(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(lambda r: [Dribble(ok({"kind": "echo", "token": r["token"]}))]
                              if r["op"] == "echo" else None) as w, \
                await PoolClient.connect(w.sock_path) as c:
            tasks = [asyncio.create_task(c.send_request(RawRequest({"op": "echo", "token": i})))
                     for i in range(40)]
            results = await asyncio.gather(*tasks)
            assert [r.raw["data"]["token"] for r in results] == list(range(40))
            assert [r["token"] for r in w.requests[1:]] == list(range(40))
    run(main())


def test_close_wakes_queued_callers(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(lambda r: [HANG] if r["op"] == "status" else None) as w:
            c = await PoolClient.connect(w.sock_path)
            first = asyncio.create_task(c.status())
            second = asyncio.create_task(c.status())
            await asyncio.sleep(0.05)
            c.close()
            for t in (first, second):
                with pytest.raises(ClientClosed):
                    await t
    run(main())


def test_write_is_bounded_when_worker_stops_reading(run: Runner) -> None:
    """A request larger than the socket buffers, to a worker that never reads it."""
    async def main() -> None:
        def script(req: dict) -> list | None:
            return [HANG] if req["op"] == "status" else None
        async with FakeWorker(script) as w, await PoolClient.connect(w.sock_path) as c:
            with pytest.raises(RequestTimeout):
                await c.status(timeout=0.05)  # the worker now hangs forever: reads nothing
            with pytest.raises(RequestTimeout):
                await c.run("x" * 8_000_000, timeout=0.2)
            assert c.broken is None
    run(main())


def test_cancellation_is_never_wrapped(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(lambda r: [HANG] if r["op"] == "status" else None) as w, \
                await PoolClient.connect(w.sock_path) as c:
            t = asyncio.create_task(c.status())
            await asyncio.sleep(0.02)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            assert c.owed_replies == 1 and c.broken is None
    run(main())


def test_encoded_request_size_matches_line() -> None:
    assert proto.encode_request(Status()) == b'{"op":"status"}\n'
    assert json.loads(proto.encode_request(RawRequest({"op": "x"}))) == {"op": "x"}


def test_connect_timeout_when_the_worker_is_not_accepting(tmp_path, run: Runner) -> None:
    """A full listen backlog: connect() never completes, which is not a handshake timeout."""
    path = str(tmp_path / "full.sock")
    os.chmod(tmp_path, 0o700)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(0)
    queued = []
    try:
        while True:  # fill the backlog with connections nobody accepts
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            queued.append(s)
            try:
                s.connect(path)
            except BlockingIOError:
                break

        async def main() -> None:
            with pytest.raises(ConnectTimeout) as info:
                await PoolClient.connect(path, connect_timeout=0.2)
            assert isinstance(info.value, TimeoutError) and isinstance(info.value, ConnectError)
            assert "did not complete within 0.2s" in str(info.value)
            assert "handshake" not in str(info.value)
        run(main())
    finally:
        for s in queued:
            s.close()
        srv.close()


def _strict_worker(version: str) -> Callable[[dict], list | None]:
    """algocline's handshake rule: exact match, else the mismatch error (connection stays)."""
    def script(req: dict) -> list | None:
        if req["op"] == "handshake" and req["version"] != version:
            return [err(f"version mismatch: client={req['version']}, server={version}")]
        return None
    return script


def test_auto_version_handshakes_again_on_the_same_connection(run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(_strict_worker("0.32.0"), version="0.32.0") as w:
            c = await PoolClient.connect(w.sock_path, version="auto")
            assert c.server_version == "0.32.0" and w.connections == 1
            assert [r["version"] for r in w.requests] == [PROTOCOL_VERSION, "0.32.0"]
            assert (await c.status()).has_session is False
            c.close()
            with pytest.raises(VersionMismatch):  # the exact-match default stays
                await PoolClient.connect(w.sock_path)
        async with FakeWorker() as w, await PoolClient.connect(w.sock_path, version="auto") as c:
            assert c.server_version == PROTOCOL_VERSION and len(w.requests) == 1
    run(main())


def test_auto_version_with_a_worker_that_hangs_up_after_a_mismatch(run: Runner) -> None:
    def hang_up(req: dict) -> list | None:
        if req["op"] == "handshake" and req["version"] != "0.32.0":
            return [err(f"version mismatch: client={req['version']}, server=0.32.0"), CLOSE]
        return None

    async def main() -> None:
        async with FakeWorker(hang_up, version="0.32.0") as w:
            with pytest.raises(VersionMismatch, match=r"version='0\.32\.0'") as info:
                await PoolClient.connect(w.sock_path, version="auto")
            assert info.value.server == "0.32.0"
            c = await PoolClient.connect(w.sock_path, version=info.value.server)
            assert c.server_version == "0.32.0"
            c.close()
    run(main())


def test_auto_version_gives_up_after_one_retry(run: Runner) -> None:
    def moving_target(req: dict) -> list | None:
        if req["op"] == "handshake":
            return [err(f"version mismatch: client={req['version']}, server=x{req['version']}")]
        return None

    async def main() -> None:
        async with FakeWorker(moving_target) as w:
            with pytest.raises(VersionMismatch) as info:
                await PoolClient.connect(w.sock_path, version="auto")
            assert info.value.server == "xx" + PROTOCOL_VERSION and len(w.requests) == 2
    run(main())


def test_late_reply_carries_the_callers_token_even_for_one_request_object(run: Runner) -> None:
    """The same request object sent twice: each late reply names its own send."""
    def script(req: dict) -> list | None:
        return [0.2, ok({"kind": "echo", "n": req["n"]})] if req.get("op") == "slow" else None

    async def main() -> None:
        late: list[LateReply] = []
        async with FakeWorker(script) as w, await PoolClient.connect(
            w.sock_path, on_late_reply=late.append
        ) as c:
            request = RawRequest({"op": "slow", "n": 1})
            first, second = object(), object()
            with pytest.raises(RequestTimeout):
                await c.send_request(request, timeout=0.02, token=first)
            with pytest.raises(RequestTimeout):  # still waiting for the first's late reply
                await c.send_request(request, timeout=0.02, token=second)
            await c.settle(timeout=5)
            assert [lr.token for lr in late] == [first]
            assert late[0].request is request and late[0].response is not None
            assert [r["op"] for r in w.requests] == ["handshake", "slow"]
            with pytest.raises(RequestTimeout):
                await c.send_request(request, timeout=0.02, token=second)
            await c.settle(timeout=5)
            assert [lr.token for lr in late] == [first, second] and c.owed_replies == 0
    run(main())


def test_fan_out_to_sixteen_workers_concurrently(run: Runner) -> None:
    """One loop, sixteen connections, all requests in flight together: each its own reply."""
    async def main() -> None:
        workers = [FakeWorker(lambda r, i=i: [Dribble(ok({"kind": "echo", "worker": i,
                                                        "token": r["token"]}))]
                              if r["op"] == "echo" else None) for i in range(16)]
        for w in workers:
            await w.__aenter__()
        try:
            clients = await asyncio.gather(*(PoolClient.connect(w.sock_path) for w in workers))
            for round_ in range(5):
                replies = await asyncio.gather(*(
                    c.send_request(RawRequest({"op": "echo", "token": round_ * 100 + i}))
                    for i, c in enumerate(clients)))
                assert [(r.raw["data"]["worker"], r.raw["data"]["token"]) for r in replies] == [
                    (i, round_ * 100 + i) for i in range(16)]
            for c in clients:
                c.close()
        finally:
            for w in workers:
                await w.__aexit__()
    run(main())


def test_auto_version_against_a_real_worker_of_another_version(pool_home, run: Runner) -> None:
    """The bundled worker speaking 0.30.0: algocline's mismatch text, then a second handshake."""
    command = (f"{sys.executable} -m pool_notebook.worker --sid {{sid}} --sock {{sock}} "
               "--protocol-version 0.30.0")

    async def main() -> None:
        with pytest.raises(VersionMismatch) as info:
            await spawn_and_connect(command)
        assert (info.value.client, info.value.server) == (PROTOCOL_VERSION, "0.30.0")
        client, _worker = await spawn_and_connect(command, version="auto")
        async with client:
            assert client.server_version == "0.30.0"
            assert (await client.status()).has_session is False
            await client.shutdown()
    run(main())
