"""Wire parity with algocline's ``alc pool-worker``: one test per row of docs/wire-parity.md.

Every test drives the bundled worker over a real socket and compares with the
value algocline's worker produces, written here with its source (file and
function in github.com/ynishi/algocline; ``pool_worker.rs`` is ``src/pool_worker.rs``,
``protocol.rs``/``registry.rs`` are in ``crates/algocline-app/src/pool/``).
Where we deliberately differ, the test says so and checks our behaviour.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pool_notebook import PoolClient
from pool_notebook._version import PROTOCOL_VERSION
from pool_notebook.protocol import Paused
from pool_notebook.registry import Registry
from pool_notebook.spawn import spawn_and_connect
from tests.conftest import RawConnection, WorkerProc
from tests.fakes import run, wait_dead

StartWorker = Callable[..., WorkerProc]
V = PROTOCOL_VERSION

ASK = 'return alc.llm("2+2?")'
BATCH = 'local r = alc.llm_batch({{prompt = "a"}, {prompt = "b", system = "s"}}) return r'


def _run(conn: RawConnection, code: str) -> dict:
    return conn.ask({"op": "run", "code": code, "ctx": None, "lib_paths": []})


def _continue(conn: RawConnection, sid: str, response: str, query_id: str | None = None,
              usage: dict | None = None) -> dict:
    return conn.ask({"op": "continue", "sid": sid, "response": response,
                     "query_id": query_id, "usage": usage})


def _exit_status(worker: WorkerProc) -> int:
    return worker.wait(10)


# ------------------------------------------------------------------- envelope


def test_envelope_keys_in_order_with_nulls(start_worker: StartWorker) -> None:
    # protocol.rs PoolResponse {ok, data: Option, error: Option} (serde field order, None
    # -> null): success(...) and failure(...).
    worker = start_worker()
    conn = RawConnection(worker.sock)
    conn.send({"op": "handshake", "version": V})
    line = conn.file.readline()
    assert line == (b'{"ok":true,"data":{"kind":"handshake","version":"' + V.encode()
                    + b'"},"error":null}\n')
    conn.send(b'{"op":"nope"}\n')
    assert list(json.loads(conn.file.readline())) == ["ok", "data", "error"]


# ------------------------------------------------------------------ handshake


def test_handshake_mismatch_text_and_connection_stays_open(start_worker: StartWorker) -> None:
    # pool_worker.rs dispatch(Handshake): failure(format!("version mismatch: client={version},
    # server={worker_version}")); the read loop goes on (no break): the same connection can
    # handshake again.
    worker = start_worker()
    conn = RawConnection(worker.sock)
    assert conn.hello("0.0.1") == {
        "ok": False, "data": None, "error": f"version mismatch: client=0.0.1, server={V}"}
    assert conn.hello() == {"ok": True, "data": {"kind": "handshake", "version": V},
                            "error": None}
    assert conn.ask({"op": "status"})["ok"] is True


def test_auto_version_rehandshakes_on_the_same_connection(start_worker: StartWorker) -> None:
    # Because a mismatch keeps the connection open (row above), PoolClient's
    # version="auto" answers a worker of another release on the same connection.
    worker = start_worker("--protocol-version", "0.40.2")

    async def main() -> None:
        client = await PoolClient.connect(worker.sock, version="auto")
        async with client:
            assert client.server_version == "0.40.2"
            assert (await client.status()).has_session is False
            await client.shutdown()

    run(main())
    assert _exit_status(worker) == 0


def test_a_second_handshake_is_answered_again(start_worker: StartWorker) -> None:
    # pool_worker.rs dispatch(Handshake) has no "already greeted" state: it answers again.
    conn = start_worker().connect()
    assert conn.hello()["data"] == {"kind": "handshake", "version": V}


def test_request_before_handshake_is_refused_ours_stricter(start_worker: StartWorker) -> None:
    # algocline: dispatch() serves any request, handshake or not (protocol.rs says the
    # handshake "must be the first message sent", the worker does not check). OURS (stricter,
    # protects a client of the wrong version from running code): refused, connection open.
    conn = RawConnection(start_worker().sock)
    reply = conn.ask({"op": "run", "code": "return 1", "ctx": None, "lib_paths": []})
    assert reply["ok"] is False and reply["error"].startswith("expected a handshake first")
    assert conn.hello()["ok"] is True


# --------------------------------------------------------------- connections


def test_second_client_waits_and_is_served_when_the_first_leaves(
        start_worker: StartWorker) -> None:
    # pool_worker.rs run(): one connection at a time in the accept loop; a client that
    # connects meanwhile is accepted by the kernel and served after the first disconnects
    # (when the session is paused). No "worker busy" reply.
    worker = start_worker()
    first = worker.connect()
    paused = _run(first, ASK)["data"]
    second = RawConnection(worker.sock)  # connect() succeeds at once
    second.send({"op": "handshake", "version": V})
    first.close()
    assert second.recv()["ok"] is True
    assert second.ask({"op": "status"})["data"]["session_id"] == paused["session_id"]


def test_disconnect_without_a_paused_session_ends_the_worker(start_worker: StartWorker) -> None:
    # pool_worker.rs run(): after EOF, WorkerPhase::Idle | Finished => break 'outer (exit).
    worker = start_worker()
    conn = worker.connect()
    assert _run(conn, "return 1")["ok"] is True
    conn.close()
    assert _exit_status(worker) == 0
    assert not os.path.exists(worker.sock)


def test_disconnect_with_a_paused_session_waits_for_a_reconnect(
        start_worker: StartWorker) -> None:
    # pool_worker.rs run(): WorkerPhase::Paused => continue 'outer (accept the next client).
    worker = start_worker()
    conn = worker.connect()
    sid = _run(conn, ASK)["data"]["session_id"]
    conn.close()
    again = worker.connect()
    done = _continue(again, sid, "4")
    assert done["data"]["feed_result"]["Finished"]["state"] == {"Completed": {"result": "4"}}


def test_socket_is_0600(start_worker: StartWorker) -> None:
    # pool_worker.rs run(): set_permissions(&sock, 0o600) right after bind.
    worker = start_worker()
    worker.connect(greet=False).close()
    assert stat.S_IMODE(os.stat(worker.sock).st_mode) == 0o600


# ----------------------------------------------------------------------- run


def test_session_id_format(start_worker: StartWorker) -> None:
    # algocline-engine session.rs gen_session_id(): format!("s-{ts:x}-{random:016x}"),
    # ts = nanoseconds since the epoch.
    conn = start_worker().connect()
    before = time.time_ns()
    sid = _run(conn, "return 1")["data"]["session_id"]
    match = re.fullmatch(r"s-([0-9a-f]+)-([0-9a-f]{16})", sid)
    assert match is not None
    assert abs(int(match.group(1), 16) - before) < 60 * 10**9


def test_paused_query_shape_with_system_null(start_worker: StartWorker) -> None:
    # algocline-core query.rs LlmQuery {id, prompt, system: Option, max_tokens} (serde:
    # system None -> null; grounded/underspecified skipped when false); QueryId::single()
    # is "q-0"; default max_tokens 1024 (bridge llm).
    conn = start_worker().connect()
    data = _run(conn, ASK)["data"]
    assert data["kind"] == "feed"
    assert data["feed_result"] == {"Paused": {"queries": [
        {"id": "q-0", "prompt": "2+2?", "system": None, "max_tokens": 1024}]}}


def test_run_while_paused_is_refused(start_worker: StartWorker) -> None:
    # pool_worker.rs dispatch(Run): failure("worker already has an active session").
    conn = start_worker().connect()
    _run(conn, ASK)
    assert _run(conn, "return 1") == {"ok": False, "data": None,
                                      "error": "worker already has an active session"}


def test_run_after_a_finished_session_starts_a_new_one_ours_friendlier(
        start_worker: StartWorker) -> None:
    # algocline: dispatch(Run) refuses unless WorkerPhase::Idle, so after a Finished
    # session every run answers "worker already has an active session" (one session per
    # process). OURS (KEEP, documented): a new session with a new id; no algocline client
    # breaks, and notebooks save a spawn per run.
    conn = start_worker().connect()
    first = _run(conn, "return 1")["data"]
    second = _run(conn, "return 2")["data"]
    assert second["feed_result"]["Finished"]["state"] == {"Completed": {"result": 2}}
    assert second["session_id"] != first["session_id"]


def test_malformed_line_answered_and_the_worker_goes_on(start_worker: StartWorker) -> None:
    # pool_worker.rs run(): serde error -> failure(format!("malformed request: {e}")),
    # continue. (serde's own wording after the prefix differs from ours.)
    conn = start_worker().connect()
    reply = conn.ask(b"{nope\n")
    assert reply["ok"] is False and reply["error"].startswith("malformed request: ")
    assert conn.ask({"op": "status"})["ok"] is True


# ------------------------------------------------------------------ continue


def test_continue_without_a_paused_session(start_worker: StartWorker) -> None:
    # pool_worker.rs dispatch(Continue): failure("no paused session to continue").
    conn = start_worker().connect()
    assert _continue(conn, "s-x", "hi") == {"ok": False, "data": None,
                                            "error": "no paused session to continue"}


def test_continue_unknown_query_id(start_worker: StartWorker) -> None:
    # pool_worker.rs dispatch(Continue): failure(format!("continue failed: {e}")) with
    # algocline-core state.rs FeedError::UnknownQuery -> "unknown query_id: {0}".
    conn = start_worker().connect()
    sid = _run(conn, ASK)["data"]["session_id"]
    assert _continue(conn, sid, "4", "q-7") == {
        "ok": False, "data": None, "error": "continue failed: unknown query_id: q-7"}
    assert _continue(conn, sid, "4")["ok"] is True  # still paused, still answerable


def test_batch_accepted_then_already_responded(start_worker: StartWorker) -> None:
    # engine FeedResult::Accepted {remaining}; core state.rs FeedError::AlreadyResponded ->
    # "already responded to query_id: {0}", prefixed "continue failed: " by dispatch.
    conn = start_worker().connect()
    sid = _run(conn, BATCH)["data"]["session_id"]
    assert _continue(conn, sid, "A", "q-0")["data"]["feed_result"] == {
        "Accepted": {"remaining": 1}}
    assert _continue(conn, sid, "again", "q-0") == {
        "ok": False, "data": None,
        "error": "continue failed: already responded to query_id: q-0"}
    done = _continue(conn, sid, "B", "q-1")["data"]["feed_result"]["Finished"]
    assert done["state"] == {"Completed": {"result": ["A", "B"]}}


def test_continue_null_query_id_means_q0(start_worker: StartWorker) -> None:
    # pool_worker.rs dispatch(Continue): QueryId::parse(query_id.unwrap_or("q-0")).
    conn = start_worker().connect()
    sid = _run(conn, BATCH)["data"]["session_id"]
    assert _continue(conn, sid, "A", None)["data"]["feed_result"] == {
        "Accepted": {"remaining": 1}}
    refused = _continue(conn, sid, "A2", None)
    assert refused["error"] == "continue failed: already responded to query_id: q-0"


def test_continue_with_a_wrong_session_id_ours_stricter(start_worker: StartWorker) -> None:
    # algocline: dispatch(Continue) ignores the request's sid (`sid: _req_sid`) and feeds
    # the paused session. OURS (stricter: an answer meant for another session must not
    # resume this one): refused, the session stays paused.
    conn = start_worker().connect()
    sid = _run(conn, ASK)["data"]["session_id"]
    reply = _continue(conn, "s-other", "4")
    assert reply["ok"] is False and "unknown session id 's-other'" in reply["error"]
    assert _continue(conn, sid, "4")["ok"] is True


# -------------------------------------------------------------------- status


def test_status_idle_paused_finished(start_worker: StartWorker) -> None:
    # pool_worker.rs dispatch(Status): Idle -> (false, None); Paused -> (true, Some(id));
    # Finished -> (false, None). Keys kind, has_session, session_id (then our extras).
    conn = start_worker().connect()
    idle = conn.ask({"op": "status"})["data"]
    assert list(idle)[:3] == ["kind", "has_session", "session_id"]
    assert (idle["has_session"], idle["session_id"]) == (False, None)
    sid = _run(conn, ASK)["data"]["session_id"]
    paused = conn.ask({"op": "status"})["data"]
    assert (paused["has_session"], paused["session_id"]) == (True, sid)
    assert "conversation_history" not in paused  # only with include_history
    _continue(conn, sid, "4")
    done = conn.ask({"op": "status"})["data"]
    assert (done["has_session"], done["session_id"]) == (False, None)


def test_status_include_history_last_ten_oldest_first_with_pending(
        start_worker: StartWorker) -> None:
    # algocline-core metrics.rs snapshot(include_history): the last <=10 transcript entries
    # in chronological order (transcript.len().saturating_sub(10)), each
    # TranscriptEntry::to_history_json(): {query_id, prompt, response, prompt_tokens,
    # response_tokens, started_at, completed_at}; the pending query's entry has
    # response null and completed_at null. pool_worker.rs: only while a session is active.
    conn = start_worker().connect()
    code = 'for i = 1, 12 do alc.llm("p" .. i) end return "done"'
    sid = _run(conn, code)["data"]["session_id"]
    for i in range(1, 12):
        _continue(conn, sid, f"r{i}")
    history = conn.ask({"op": "status", "include_history": True})["data"][
        "conversation_history"]
    assert [e["prompt"] for e in history] == [f"p{i}" for i in range(3, 13)]
    assert [e["response"] for e in history] == [f"r{i}" for i in range(3, 12)] + [None]
    keys = ["query_id", "prompt", "response", "prompt_tokens", "response_tokens",
            "started_at", "completed_at"]
    assert all(list(e) == keys for e in history)
    assert history[-1]["completed_at"] is None and isinstance(history[0]["completed_at"], int)
    assert all(e["started_at"] <= time.time() * 1000 for e in history)
    _continue(conn, sid, "r12")
    finished = conn.ask({"op": "status", "include_history": True})["data"]
    assert finished["has_session"] is False and "conversation_history" not in finished


def test_status_history_texts_are_bounded(start_worker: StartWorker) -> None:
    # algocline does not cut texts (its replies have no line limit). OURS (protects the
    # client's 16 MiB line limit): each prompt/response is cut to 65536 characters (a note
    # says how many more there were), so a status reply always fits.
    conn = start_worker().connect()
    code = 'alc.llm(string.rep("p", 200000)) return alc.llm("second")'
    sid = _run(conn, code)["data"]["session_id"]
    _continue(conn, sid, "r" * 3 * 2**20)
    conn.send({"op": "status", "include_history": True})
    line = conn.file.readline()
    assert len(line) < 2**20
    first = json.loads(line)["data"]["conversation_history"][0]
    assert first["prompt"] == "p" * 65536 + "... [134464 more characters not kept]"
    assert first["response"].startswith("r" * 65536) and len(first["response"]) < 65536 + 100


# ------------------------------------------------------------------ shutdown


def test_shutdown_reply_exit_and_registry_entry_removed(start_worker: StartWorker) -> None:
    # pool_worker.rs: dispatch(Shutdown) -> success(Shutdown) = {"kind":"shutdown"}; the
    # reply is written, then graceful_shutdown() removes our registry entry, then exit.
    worker = start_worker()
    reg = Registry(worker.dir / "registry.json")
    from pool_notebook.registry import WorkerEntry
    reg.add(WorkerEntry(worker.sid, worker.proc.pid, worker.sock, V, ""))
    conn = worker.connect()
    assert conn.ask({"op": "shutdown"}) == {"ok": True, "data": {"kind": "shutdown"},
                                            "error": None}
    assert conn.at_eof()
    assert _exit_status(worker) == 0
    assert reg.find(worker.sid) is None


def test_idle_timeout_from_algoclines_variable(start_worker: StartWorker) -> None:
    # pool_worker.rs run(): ALC_POOL_IDLE_TIMEOUT seconds (default 1800, 0 disables);
    # a value that does not parse is warned about and the default is used.
    quick = start_worker(env={"ALC_POOL_IDLE_TIMEOUT": "1", "POOL_WORKER_IDLE_TIMEOUT": ""})
    assert _exit_status(quick) == 0
    assert "idle for 1s" in quick.output()
    bad = start_worker(env={"ALC_POOL_IDLE_TIMEOUT": "soon", "POOL_WORKER_IDLE_TIMEOUT": ""})
    assert bad.connect().ask({"op": "status"})["ok"] is True
    assert "ignoring ALC_POOL_IDLE_TIMEOUT='soon'" in bad.output()


# ------------------------------------------------------- registry and reconnect


def test_reconnect_by_sid_from_the_registry(pool_home: Path) -> None:
    # registry.rs PoolSessionEntry {sid, pid, sock, version, created_at}; a restarted
    # client finds the worker by sid in registry.json and reconnects to its paused session
    # (pool_worker.rs: paused sessions survive client reconnects).
    async def main() -> None:
        client, worker = await spawn_and_connect()
        async with client:
            feed = await client.run(ASK)
            assert isinstance(feed.feed_result, Paused)
        entry = Registry.default().find(worker.sid)
        assert entry is not None and entry.pid == worker.pid and entry.sock == worker.sock
        assert re.fullmatch(r"p-[0-9a-f]+-[0-9a-f]{16}", entry.sid)
        again = await PoolClient.connect(entry.sock)
        async with again:
            status = await again.status()
            assert (status.has_session, status.session_id) == (True, feed.session_id)
            done = await again.continue_(feed.session_id, "4")
            assert done.feed_result is not None
            await again.shutdown()
        assert wait_dead(worker.pid)
        assert Registry.default().find(worker.sid) is None

    run(main())


@pytest.mark.parametrize("code,kind", [("return {a = 1}", "Completed"),
                                       ("error('boom')", "Failed")])
def test_finished_shape(start_worker: StartWorker, code: str, kind: str) -> None:
    # engine FeedResult::Finished {state: TerminalState, metrics}; TerminalState is
    # externally tagged: {"Completed": {"result": ...}} | {"Failed": {"error": "..."}};
    # metrics = ExecutionMetrics::to_json(): {"auto": {...}, "custom": {...}}.
    conn = start_worker().connect()
    fin = _run(conn, code)["data"]["feed_result"]["Finished"]
    assert list(fin) == ["state", "metrics"]
    assert list(fin["state"]) == [kind]
    if kind == "Completed":
        assert fin["state"]["Completed"] == {"result": {"a": 1}}
    else:
        assert "boom" in fin["state"]["Failed"]["error"]
    assert set(fin["metrics"]) >= {"auto", "custom"}
