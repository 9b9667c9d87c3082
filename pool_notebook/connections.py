"""Named connections with history: the plain-Python API behind the magics.

``conn = await pool_notebook.connect()`` spawns the bundled worker (or attaches
to a socket, or finds a worker by sid in the registries), ``await conn.send("status")``
sends a request, ``await conn.run(code, respond=...)`` drives a Lua session,
and every request lands in :func:`history` exactly once whatever its outcome.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import protocol as proto
from ._version import PROTOCOL_VERSION
from .client import LateReply, PoolClient
from .errors import (
    ConnectError,
    ConnectionNotFound,
    MalformedRequest,
    PoolError,
    RequestTimeout,
)
from .history import History, default_path
from .registry import Registry, WorkerEntry
from .spawn import WorkerProcess, spawn_and_connect

__all__ = ["Connection", "ConnectionManager", "Reply", "Responder", "manager", "parse_request"]

#: Answers one paused query: ``(query) -> str`` (sync or async).
Responder = Callable[[proto.Query], "str | Awaitable[str]"]

_BARE_OPS = ("shutdown", "status")


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


@dataclass
class Reply:
    """The outcome of one request made through a Connection."""

    connection: str
    request: proto.Request
    seq: int
    outcome: str
    latency_ms: float
    response: proto.Response | None = None
    error: BaseException | None = None
    history: list[Reply] = field(default_factory=list)

    @property
    def op(self) -> str:
        return self.request.op

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

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

    def _repr_html_(self) -> str:
        from .display import reply_html

        return reply_html(self)

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


class Connection:
    """One named connection to a worker, recording each request in the history."""

    def __init__(self, name: str, client: PoolClient, history: History, *,
                 worker: WorkerProcess | None = None, worker_sid: str | None = None) -> None:
        self.name = name
        self.client = client
        self.history = history
        self.worker = worker
        self.worker_sid = worker_sid or (worker.sid if worker else None)
        self.pid = client.peer.pid if client.peer else (worker.pid if worker else 0)
        self._abandoned: dict[int, int] = {}  # id(request) -> history seq
        client.on_late_reply = self._late

    @property
    def sock_path(self) -> str:
        return self.client.sock_path

    @property
    def version(self) -> str | None:
        return self.client.server_version

    @property
    def state(self) -> str:
        return "closed" if self.client.closed else "broken" if self.client.broken else "open"

    def _record(self, request: proto.Request, sent_ns: int, latency_ms: float, outcome: str,
                response: proto.Response | None, error: BaseException | None) -> int:
        sid = _session_id(response)
        if sid is None and isinstance(request, proto.Continue):
            sid = request.sid
        return self.history.record(
            self.name, self.sock_path, self.pid, self.version, request.op, sid,
            request.query_id if isinstance(request, proto.Continue) else None,
            sent_ns, latency_ms, outcome,
            type(error).__name__ if error is not None else None,
            str(error) if error is not None else (response.error if response else None),
            response.request_size if response else _request_size(request),
            response.size if response else 0,
            _feed_state(response),
        )

    async def send(self, request: proto.Request | str | dict[str, Any], *,
                   timeout: float | None = None) -> Reply:
        """Send one request; worker errors come back as a Reply, client errors raise.

        Either way the request is recorded once in the history.
        """
        if isinstance(request, str):
            request = parse_request(request)
        elif isinstance(request, dict):
            request = proto.RawRequest(request)
        sent_ns = time.time_ns()
        start = time.perf_counter()
        try:
            response = await self.client.send_request(request, timeout=timeout)
        except asyncio.CancelledError as exc:
            seq = self._record(request, sent_ns, _ms(start), "cancelled", None, exc)
            self._abandoned[id(request)] = seq
            raise
        except PoolError as exc:
            outcome = "timeout" if isinstance(exc, RequestTimeout) else "client_error"
            seq = self._record(request, sent_ns, _ms(start), outcome, None, exc)
            if outcome == "timeout":
                self._abandoned[id(request)] = seq
            raise
        latency = _ms(start)
        outcome = "ok" if response.ok else "worker_error"
        seq = self._record(request, sent_ns, latency, outcome, response, None)
        return Reply(self.name, request, seq, outcome, latency, response)

    def _late(self, late: LateReply) -> None:
        seq = self._abandoned.pop(id(late.request), None)
        if seq is None:
            return
        self.history.update(
            seq, latency_ms=late.latency_ns / 1e6, outcome="late_reply",
            response_bytes=late.response.size if late.response else 0,
            feed_state=_feed_state(late.response),
            error_type=type(late.error).__name__ if late.error else None,
            error_message=str(late.error) if late.error else None,
        )

    async def status(self, *, include_history: bool = False,
                     timeout: float | None = None) -> Reply:
        return await self.send(proto.Status(include_history), timeout=timeout)

    async def continue_(self, sid: str, response: str, *, query_id: str | None = None,
                        usage: dict[str, Any] | None = None,
                        timeout: float | None = None) -> Reply:
        return await self.send(proto.Continue(sid, response, query_id, usage), timeout=timeout)

    async def run(self, code: str, *, ctx: Any = None, lib_paths: Sequence[str] = (),
                  respond: Responder | None = None, timeout: float | None = None,
                  on_step: Callable[[Reply], None] | None = None) -> Reply:
        """Run Lua code; with ``respond``, answer every pause until the session ends.

        Returns the last reply; ``reply.history`` holds every step in order.
        """
        reply = await self.send(proto.Run(code, ctx, tuple(lib_paths)), timeout=timeout)
        steps = [reply]
        while respond is not None and reply.ok and isinstance(reply.feed, proto.Paused):
            if on_step is not None:
                on_step(reply)
            sid = reply.session_id
            assert sid is not None
            for query in reply.feed.queries:
                answer = respond(query)
                if inspect.isawaitable(answer):
                    answer = await answer
                reply = await self.continue_(sid, str(answer), query_id=query.id,
                                             timeout=timeout)
                steps.append(reply)
                if not reply.ok:
                    break
        reply.history = steps
        return reply

    async def shutdown(self, *, timeout: float | None = None) -> Reply:
        return await self.send(proto.Shutdown(), timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def _repr_html_(self) -> str:
        from .display import connection_html

        return connection_html(self)

    def __repr__(self) -> str:
        return (f"<Connection {self.name!r} {self.sock_path} version={self.version} "
                f"pid={self.pid} {self.state}>")


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

        No ``sock``/``sid``: spawn ``spawn`` (default: the bundled worker).
        ``sid``: look the worker up in our registry, then algocline's.
        """
        if name and name in self.connections and self.connections[name].state == "open":
            raise ValueError(f"a connection named {name!r} is already open; "
                             "disconnect it first or pick another --name")
        options: dict[str, Any] = {"version": version, "handshake_timeout": timeout,
                                   "allow_insecure": allow_insecure}
        worker: WorkerProcess | None = None
        worker_sid = sid
        if sock is None and sid is not None:
            entry = find_worker(sid)
            sock = entry.sock
        if sock is None:
            client, worker = await spawn_and_connect(spawn, **options)
        else:
            client = await PoolClient.connect(sock, **options)
        conn = Connection(self._name(name), client, self.history, worker=worker,
                          worker_sid=worker_sid)
        self.connections[conn.name] = conn
        self.current = conn.name
        return conn

    def disconnect(self, name: str | None = None) -> Connection:
        """Close one connection (the worker keeps running unless shut down first)."""
        conn = self.get(name)
        conn.close()
        del self.connections[conn.name]
        if self.current == conn.name:
            self.current = next(reversed(self.connections), None)
        return conn

    def close_all(self) -> None:
        for name in list(self.connections):
            self.disconnect(name)
        self.history.flush()


def find_worker(sid: str) -> WorkerEntry:
    """A live worker by sid in our registry, then algocline's."""
    for registry in (Registry.default(), Registry.algocline()):
        entry = registry.find(sid)
        if entry is not None:
            if not entry.alive:
                raise ConnectError(entry.sock, f"worker {sid} (pid {entry.pid}) is no longer "
                                   "running; %pool_workers --gc prunes it")
            return entry
    raise ConnectError(sid, f"no worker with sid {sid!r} in {Registry.default().path} "
                       f"or {Registry.algocline().path}")


#: The kernel-wide manager used by the magics and the module-level API.
manager = ConnectionManager()
