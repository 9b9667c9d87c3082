"""Named connections with history: the plain-Python API behind the magics.

``conn = await pool_notebook.connect()`` spawns the bundled worker (or attaches
to a socket, or finds a worker by sid in the registries), ``await conn.send("status")``
sends a request, ``session = await conn.run(code, respond=...)`` drives a Lua
session, and every request lands in :func:`history` exactly once whatever its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import protocol as proto
from ._enums import StrEnum
from ._version import PROTOCOL_VERSION
from .client import LateReply, PoolClient
from .errors import (
    ConnectError,
    ConnectionNotFound,
    InvalidArgument,
    MalformedRequest,
    PoolError,
    RequestTimeout,
    SessionError,
    SessionRefused,
)
from .history import Counts, History, Outcome, counts_from_metrics, counts_from_usage, default_path
from .registry import Registry, WorkerEntry
from .session import PauseResponder, Responder, Session, SessionState, resolve_responder
from .spawn import WorkerProcess, spawn_and_connect

__all__ = ["Connection", "ConnectionManager", "ConnectionState", "Reply", "find_worker",
           "manager", "parse_request"]

_BARE_OPS = ("shutdown", "status")
#: How algocline's worker refuses a second ``run`` (one session per process).
_REFUSAL = "already has an active session"
#: The request path's outcomes (an enum member lookup costs ~0.1 µs on Python 3.11).
_OK, _WORKER_ERROR = Outcome.OK, Outcome.WORKER_ERROR


def parse_request(text: str) -> proto.Request:
    """A cell body as a request: a bare op name (``status``) or one JSON object."""
    body = text.strip()
    if body == "status":
        return proto.Status()
    if body == "shutdown":
        return proto.Shutdown()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        raise MalformedRequest(
            f"the request must be a JSON object or one of {sorted(_BARE_OPS)}: {exc.msg} "
            f"at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise MalformedRequest("the request must be a JSON object like {\"op\": \"status\"}")
    try:
        return proto.decode_request(json.dumps(obj).encode())
    except MalformedRequest:
        return proto.RawRequest(obj)  # unknown ops and extensions go out as written


class ConnectionState(StrEnum):
    """Whether a connection can be used."""

    OPEN = "open"
    BROKEN = "broken"
    CLOSED = "closed"



@dataclasses.dataclass
class Reply:
    """The outcome of one request made through a Connection."""

    connection: str
    request: proto.Request
    seq: int
    outcome: Outcome
    latency_ms: float
    response: proto.Response | None = None
    error: BaseException | None = None

    @property
    def op(self) -> str:
        return self.request.op

    @property
    def ok(self) -> bool:
        return self.outcome is _OK

    @property
    def feed(self) -> proto.FeedResult | None:
        return self.response.feed if self.response else None

    @property
    def session_id(self) -> str | None:
        return _session_id(self.response)

    @property
    def result(self) -> Any:
        """The completed result of a finished run (None otherwise)."""
        feed = self.feed
        if isinstance(feed, proto.Finished) and isinstance(feed.outcome, proto.Completed):
            return feed.outcome.result
        return None

    @property
    def payload(self) -> Any:
        """What to show: the response's data, the worker error, or the client error."""
        if self.response is not None:
            return self.response.raw.get("data") if self.response.ok else self.response.error
        return str(self.error) if self.error else None

    def __repr__(self) -> str:
        return (f"<Reply #{self.seq} {self.connection}:{self.op} {self.outcome} "
                f"{self.latency_ms:.3f} ms>")


def _request_size(request: proto.Request) -> int:
    """Bytes of ``request`` on the wire, for rows without a response (errors only)."""
    try:
        return len(proto.encode_request(request))
    except MalformedRequest:
        return 0


def _session_id(response: proto.Response | None) -> str | None:
    data = response.data if response else None
    return data.session_id if isinstance(data, (proto.FeedData, proto.StatusData)) else None


def _feed_state(response: proto.Response | None) -> str | None:
    feed = response.feed if response else None
    return feed.state if feed is not None else None


def _counts(request: proto.Request, response: proto.Response | None) -> Counts | None:
    """A finished session's totals on the row that finished it, else the usage sent."""
    feed = response.feed if response else None
    if isinstance(feed, proto.Finished) and feed.metrics:
        return counts_from_metrics(feed.metrics)
    return counts_from_usage(request.usage) if isinstance(request, proto.Continue) else None


class _Ticket:
    """Names one send of a request, so its late reply finds that send's history row."""

    __slots__ = ("late", "seq")

    def __init__(self) -> None:
        self.seq: int | None = None
        self.late: LateReply | None = None


class Connection:
    """One named connection to a worker, recording each request in the history."""

    def __init__(self, name: str, client: PoolClient, history: History, *,
                 worker: WorkerProcess | None = None, worker_sid: str | None = None,
                 respawn: tuple[str | Sequence[str] | None, Mapping[str, Any]] | None = None
                 ) -> None:
        self.name = name
        self.history = history
        self._respawn = respawn
        self.session: Session | None = None
        self._attach(client, worker, worker_sid)

    def _attach(self, client: PoolClient, worker: WorkerProcess | None,
                worker_sid: str | None) -> None:
        self.client = client
        self.worker = worker
        self.worker_sid = worker_sid or (worker.sid if worker else None)
        self.pid = client.peer.pid if client.peer else (worker.pid if worker else 0)
        client.on_late_reply = self._late

    @property
    def sock_path(self) -> str:
        return self.client.sock_path

    @property
    def version(self) -> str | None:
        return self.client.server_version

    @property
    def state(self) -> ConnectionState:
        if self.client.closed:
            return ConnectionState.CLOSED
        return ConnectionState.BROKEN if self.client.broken else ConnectionState.OPEN

    def _record(self, request: proto.Request, sent_ns: int, latency_ms: float,
                outcome: Outcome, response: proto.Response | None,
                error: BaseException | None, replayed: bool | None) -> int:
        sid = _session_id(response)
        if sid is None and isinstance(request, proto.Continue):
            sid = request.sid
        return self.history.record(
            connection=self.name, socket=self.sock_path, worker_pid=self.pid,
            worker_version=self.version, op=request.op, session_id=sid,
            query_id=request.query_id if isinstance(request, proto.Continue) else None,
            sent_ns=sent_ns, latency_ms=latency_ms, outcome=outcome,
            error_type=type(error).__name__ if error is not None else None,
            error_message=(str(error) if error is not None
                           else response.error if response else None),
            request_bytes=response.request_size if response else _request_size(request),
            response_bytes=response.size if response else 0,
            feed_state=_feed_state(response),
            counts=_counts(request, response), replayed=replayed,
        )

    async def send(self, request: proto.Request | str | dict[str, Any], *,
                   timeout: float | None = None, replayed: bool | None = None) -> Reply:
        """Send one request; worker errors come back as a Reply, client errors raise.

        Either way the request is recorded once in the history; a reply that
        arrives after a timeout or cancellation updates that request's row.
        ``replayed`` goes to the row (responder answers: was it a replay?).
        """
        if isinstance(request, str):
            request = parse_request(request)
        elif isinstance(request, dict):
            request = proto.RawRequest(request)
        ticket = _Ticket()
        sent_ns = time.time_ns()
        start = time.perf_counter()
        try:
            response = await self.client.send_request(request, timeout=timeout, token=ticket)
        except asyncio.CancelledError as exc:
            self._gave_up(ticket, request, sent_ns, start, Outcome.CANCELLED, exc, replayed)
            raise
        except PoolError as exc:
            outcome = Outcome.TIMEOUT if isinstance(exc, RequestTimeout) else Outcome.CLIENT_ERROR
            self._gave_up(ticket, request, sent_ns, start, outcome, exc, replayed)
            raise
        latency = _ms(start)
        outcome = _OK if response.ok else _WORKER_ERROR
        seq = self._record(request, sent_ns, latency, outcome, response, None, replayed)
        return Reply(self.name, request, seq, outcome, latency, response)

    def _gave_up(self, ticket: _Ticket, request: proto.Request, sent_ns: int, start: float,
                 outcome: Outcome, error: BaseException, replayed: bool | None) -> None:
        ticket.seq = self._record(request, sent_ns, _ms(start), outcome, None, error, replayed)
        if ticket.late is not None:  # the reply came in before the row existed
            self._late(ticket.late)

    def _late(self, late: LateReply) -> None:
        """The client read the reply of a request whose caller gave up: update its row."""
        ticket = late.token
        if not isinstance(ticket, _Ticket):
            return  # a request sent on the client directly, not through this connection
        if ticket.seq is None:
            ticket.late = late
            return
        self.history.update(
            ticket.seq, latency_ms=late.latency_ns / 1e6, outcome=Outcome.LATE_REPLY,
            response_bytes=late.response.size if late.response else 0,
            feed_state=_feed_state(late.response),
            error_type=type(late.error).__name__ if late.error else None,
            error_message=str(late.error) if late.error else None,
            counts=_counts(late.request, late.response),
        )

    async def status(self, *, include_history: bool = False,
                     timeout: float | None = None) -> Reply:
        return await self.send(proto.Status(include_history), timeout=timeout)

    async def continue_(self, sid: str, response: str, *, query_id: str | None = None,
                        usage: Mapping[str, Any] | None = None, timeout: float | None = None,
                        replayed: bool | None = None) -> Reply:
        return await self.send(proto.Continue(sid, response, query_id, usage), timeout=timeout,
                               replayed=replayed)

    async def run(self, code: str, *, ctx: Any = None, lib_paths: Sequence[str] = (),
                  respond: Responder | PauseResponder | str | None = None,
                  timeout: float | None = None) -> Session:
        """Run Lua code; returns its :class:`Session` (paused or ended).

        With ``respond`` (a callable or a string such as ``"openai:MODEL"``) every
        pause is answered until the session ends. A worker that serves one session
        per process (algocline's) refuses a second run: a connection that spawned
        its worker then spawns a fresh one and runs there; otherwise
        ``SessionRefused`` says what to do.
        """
        responder = resolve_responder(respond)
        request = proto.Run(code, ctx, tuple(lib_paths))
        reply = await self.send(request, timeout=timeout)
        if _refused(reply):
            await self._replace_refusing_worker(reply)
            reply = await self.send(request, timeout=timeout)
            if _refused(reply):
                raise SessionRefused(str(reply.payload))
        session = self.session = Session(self, reply)
        if responder is not None and session.state is SessionState.PAUSED:
            await session.answer_all(responder, timeout=timeout)
        return session

    async def _replace_refusing_worker(self, refusal: Reply) -> None:
        message = str(refusal.payload)
        if self._respawn is None:
            raise SessionRefused(message)
        if self.session is not None and self.session.state is SessionState.PAUSED:
            raise SessionRefused(f"{message} (session {self.session.id} on this connection "
                                 "is paused: answer it first, or connect to another worker)")
        await self.respawn()

    async def respawn(self) -> None:
        """Replace this connection's worker by a fresh one, spawned as the first was.

        The old worker is asked to shut down. Only for connections that spawned
        their worker (``connect()`` without a socket or sid).
        """
        if self._respawn is None:
            raise InvalidArgument(f"connection {self.name!r} did not spawn its worker "
                                  f"({self.sock_path}), so it cannot start a new one")
        command, options = self._respawn
        client, worker = await spawn_and_connect(command, **options)
        old = self.client
        with contextlib.suppress(PoolError):
            await old.shutdown(timeout=5.0)
        old.close()
        self._attach(client, worker, None)

    async def resume(self, *, timeout: float | None = None) -> Session | None:
        """The worker's paused session as a :class:`Session`, or None if it has none.

        For a worker reached again after a disconnect or a kernel restart
        (``connect(sid=...)``): the pending queries come from ``status`` with
        ``include_history`` (the last 10 transcript entries, as algocline reports
        them), so they carry their id and prompt only.
        """
        reply = await self.status(include_history=True, timeout=timeout)
        data = reply.response.data if reply.response is not None else None
        if not isinstance(data, proto.StatusData) or not data.has_session or \
                data.session_id is None or data.extra.get("state", "paused") != "paused":
            return None
        entries = data.extra.get("conversation_history")
        if not isinstance(entries, list):
            raise SessionError(f"the worker at {self.sock_path} does not report its "
                               "conversation (status include_history), so its pending "
                               "queries are unknown; answer with conn.continue_(sid, text, "
                               "query_id=...)")
        queries = tuple(proto.Query(entry["query_id"], str(entry.get("prompt", "")))
                        for entry in entries if isinstance(entry, dict)
                        and isinstance(entry.get("query_id"), str)
                        and entry.get("response") is None)
        if not queries:
            return None
        assert reply.response is not None
        paused = proto.FeedData(data.session_id, proto.Paused(queries))
        first = dataclasses.replace(reply, response=dataclasses.replace(reply.response,
                                                                         data=paused))
        session = self.session = Session(self, first)
        return session

    async def shutdown(self, *, timeout: float | None = None) -> Reply:
        return await self.send(proto.Shutdown(), timeout=timeout)

    def close(self) -> None:
        """Close the socket; the worker exits unless it holds a paused session."""
        self.client.close()

    def __repr__(self) -> str:
        return (f"<Connection {self.name!r} {self.sock_path} version={self.version} "
                f"pid={self.pid} {self.state}>")


def _refused(reply: Reply) -> bool:
    """Is this ``run`` reply algocline's one-session-per-worker refusal?"""
    error = reply.response.error if reply.response is not None else None
    return reply.outcome is _WORKER_ERROR and _REFUSAL in (error or "")


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class ConnectionManager:
    """The open connections of this kernel, by name, and their shared history."""

    def __init__(self, history: History | None = None) -> None:
        self.connections: dict[str, Connection] = {}
        self.current: str | None = None
        self.history = history or History(default_path())

    def get(self, name: str | None = None) -> Connection:
        """The named connection, or the current one."""
        key = name or self.current
        if key is None or key not in self.connections:
            raise ConnectionNotFound(key or "(current)", list(self.connections))
        return self.connections[key]

    def _name(self, name: str | None) -> str:
        if name:
            return name
        i = len(self.connections)
        while f"w{i}" in self.connections:
            i += 1
        return f"w{i}"

    async def connect(
        self,
        sock: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        sid: str | None = None,
        spawn: str | Sequence[str] | None = None,
        version: str = PROTOCOL_VERSION,
        timeout: float = 10.0,
        allow_insecure: bool = False,
    ) -> Connection:
        """Connect, and make it the current connection.

        No ``sock``/``sid``: spawn ``spawn`` (a command template with ``{sid}`` and
        ``{sock}``; default: the bundled worker). ``sid``: look the worker up in
        our registry, then algocline's.
        """
        if name and name in self.connections and \
                self.connections[name].state is ConnectionState.OPEN:
            raise InvalidArgument(f"a connection named {name!r} is already open; disconnect "
                                  "it first (pool_notebook.disconnect(name)) or pick another "
                                  "name")
        if spawn is not None and (sock is not None or sid is not None):
            raise InvalidArgument("spawn starts a new worker: give it without sock or sid")
        options: dict[str, Any] = {"version": version, "handshake_timeout": timeout,
                                   "allow_insecure": allow_insecure}
        worker: WorkerProcess | None = None
        respawn: tuple[str | Sequence[str] | None, Mapping[str, Any]] | None = None
        if sock is None and sid is not None:
            sock = find_worker(sid).sock
        if sock is None:
            client, worker = await spawn_and_connect(spawn, **options)
            respawn = (spawn, options)
        else:
            client = await PoolClient.connect(sock, **options)
        conn = Connection(self._name(name), client, self.history, worker=worker,
                          worker_sid=sid, respawn=respawn)
        self.connections[conn.name] = conn
        self.current = conn.name
        return conn

    def disconnect(self, name: str | None = None) -> Connection:
        """Close one connection.

        The worker exits when its client leaves, unless it holds a paused
        session: then reconnect later with ``connect(sid=...)`` to answer it.
        """
        conn = self.get(name)
        conn.close()
        del self.connections[conn.name]
        if self.current == conn.name:
            self.current = next(reversed(self.connections), None)
        return conn

    def close_all(self) -> None:
        for name in list(self.connections):
            self.disconnect(name)
        self.history.flush(wait=False)


def find_worker(sid: str) -> WorkerEntry:
    """A live worker by sid in our registry, then algocline's."""
    for registry in (Registry.default(), Registry.algocline()):
        entry = registry.find(sid)
        if entry is not None:
            if not entry.alive:
                raise ConnectError(entry.sock, f"worker {sid} (pid {entry.pid}) is no longer "
                                   "running; Registry.default().gc() prunes it")
            return entry
    raise ConnectError(sid, f"no worker with sid {sid!r} in {Registry.default().path} "
                       f"or {Registry.algocline().path}")


#: The kernel-wide manager used by the magics and the module-level API.
manager = ConnectionManager()
