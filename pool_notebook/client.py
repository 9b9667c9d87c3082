"""The asyncio PoolClient: one Unix-socket connection to one worker.

A thin I/O layer over :class:`pool_notebook.protocol.client.ClientConnection`,
which holds every protocol rule (handshake first, one request in flight, owed
replies, unsolicited lines, the sticky broken state). This module only moves
bytes, waits, and serves callers one at a time in arrival order.

Cancel safety is stronger than the original Rust client's. Received bytes go
straight from the socket into the protocol object, never into a caller's frame,
and a caller that is cancelled or times out tells the protocol object so
(``abandon``): before a byte was written nothing happened; mid-write the rest
of the line is still sent before the next request and its reply is owed; after
the write the reply is owed. Owed replies are read by the client itself (a
background drain, or the next caller within its own timeout) and handed to
``on_late_reply``, never to another caller. Anything that leaves the stream in
an unknowable state (EOF mid-exchange, an over-long or unsolicited line, an
exception such as ``KeyboardInterrupt`` in the middle of I/O) breaks the
connection, sticky.

Latency: after writing, a caller polls the socket for up to ``spin_seconds``
before parking on the event loop's selector, which saves the selector wake-up
when the worker answers within microseconds (``python benchmarks/bench_client.py
--delay-us 40`` compares it with ``spin_seconds=0``). Between polls it yields
one turn of the loop, so other tasks run meanwhile, and it polls only while it
is the only request of any client waiting on its loop: a fan-out to many
workers parks at once instead of being serialised behind a poller. A kind of
request (``status``, ``run``, ...) whose reply did not come within the polling
window is then sent without polling, except every ``_REPROBE``-th time, which
measures it again: polling for replies that take longer only burns the CPU the
worker needs (a map runs many workers on few cores). Only public
asyncio API is used, so uvloop works the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from . import protocol as proto
from ._version import PROTOCOL_VERSION
from .errors import (
    ClientClosed,
    ConnectError,
    ConnectionBroken,
    ConnectTimeout,
    HandshakeError,
    HandshakeTimeout,
    PoolError,
    ProtocolError,
    ReadError,
    RequestTimeout,
    TransportError,
    VersionMismatch,
    WorkerError,
    WriteError,
)
from .protocol.client import (
    NEED_DATA,
    ClientConnection,
    ConnectionEnded,
    Event,
    HandshakeAccepted,
    HandshakeRejected,
    LateReplyReceived,
    NeedData,
    ResponseReceived,
    ResponseUnreadable,
)
from .security import PeerCredentials, check_peer, check_socket_path

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # the same context manager, from its aio-libs backport
    from async_timeout import timeout as _timeout

__all__ = ["AUTO_VERSION", "LateReply", "PoolClient"]

log = logging.getLogger(__name__)

_RECV_SIZE = 256 * 1024
#: Default busy-poll window after a write (seconds); 0 disables polling.
DEFAULT_SPIN_SECONDS = 200e-6
#: A kind of request that outlasted the polling window is polled for again (and
#: measured again) on every this-many-th request.
_REPROBE = 16
#: Retry pauses while a worker's listen backlog is full (seconds).
_CONNECT_RETRY_FIRST, _CONNECT_RETRY_MAX = 0.001, 0.05
#: ``version=AUTO_VERSION`` adopts the version a worker names in its mismatch error.
AUTO_VERSION = "auto"

#: Requests waiting for a reply, per event loop, across clients (a loop is a key only
#: while it has some): polling is for the lone request.
_in_flight: dict[asyncio.AbstractEventLoop, int] = {}


@dataclass(frozen=True, slots=True)
class LateReply:
    """The reply (or failure) of a request whose caller gave up waiting.

    ``token`` is the object passed to ``send_request(..., token=...)``, so the
    caller can tell which of its requests this was (request objects may repeat).
    """

    op: str
    request: proto.Request
    sent_ns: int
    latency_ns: int
    response: proto.Response | None
    error: PoolError | None
    token: object = None


@dataclass(slots=True)
class _Ticket:
    """What the client remembers about one request (the protocol's ``context``)."""

    token: object
    sent_ns: int = 0
    sent_perf: float = 0.0


_D = TypeVar("_D")


class PoolClient:
    """A connection to one pool worker; create it with :meth:`connect`."""

    def __init__(
        self,
        sock: socket.socket,
        sock_path: str,
        *,
        max_line_bytes: int,
        spin_seconds: float,
        on_late_reply: Callable[[LateReply], None] | None,
        peer: PeerCredentials | None,
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._readable = select.poll()  # a cheap "anything there?" before each send
        self._readable.register(self._fd, select.POLLIN)
        self._loop = asyncio.get_running_loop()
        self._conn = ClientConnection(max_line_bytes)
        self._spin = spin_seconds
        #: Per request type: how many were sent without polling since one outlasted
        #: the polling window (absent or 0: poll).
        self._unpolled: dict[type[proto.Request], int] = {}
        self._lock = asyncio.Lock()
        self._waiting: asyncio.Future[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.on_late_reply = on_late_reply
        self.sock_path = sock_path
        self.peer = peer

    # ------------------------------------------------------------------ public

    @classmethod
    async def connect(
        cls,
        sock_path: str | os.PathLike[str],
        *,
        version: str = PROTOCOL_VERSION,
        handshake_timeout: float = 10.0,
        connect_timeout: float | None = None,
        max_line_bytes: int = proto.DEFAULT_MAX_LINE_BYTES,
        allow_insecure: bool = False,
        spin_seconds: float = DEFAULT_SPIN_SECONDS,
        on_late_reply: Callable[[LateReply], None] | None = None,
    ) -> PoolClient:
        """Connect to the worker at ``sock_path`` and run the version handshake.

        No client exists unless the worker accepted ``version`` (an exact match);
        on any failure the socket is closed. ``version="auto"`` sends ours and,
        if the worker answers "version mismatch: client=X, server=Y", handshakes
        again with Y on the same connection. ``connect_timeout`` (default:
        ``handshake_timeout``) bounds ``connect()`` (``ConnectTimeout``), and
        ``handshake_timeout`` the handshake (``HandshakeTimeout``).
        ``allow_insecure`` skips the directory and peer-uid checks.
        """
        path = check_socket_path(sock_path, allow_insecure=allow_insecure)
        limit = handshake_timeout if connect_timeout is None else connect_timeout
        sock = await _open(path, limit)
        try:
            peer = check_peer(sock, path, allow_insecure=allow_insecure)
            client = cls(sock, path, max_line_bytes=max_line_bytes, spin_seconds=spin_seconds,
                         on_late_reply=on_late_reply, peer=peer)
        except BaseException:
            sock.close()
            raise
        try:
            async with _timeout(handshake_timeout):
                await client._handshake(version)
        except TimeoutError:
            client.close()
            raise HandshakeTimeout(handshake_timeout) from None
        except (TransportError, ProtocolError, ConnectionBroken) as exc:
            client.close()
            raise HandshakeError(f"the handshake failed: {exc}") from exc
        except BaseException:
            client.close()
            raise
        return client

    @property
    def server_version(self) -> str | None:
        """The protocol version the worker accepted in the handshake."""
        return self._conn.server_version

    async def send_request(
        self, request: proto.Request, *, timeout: float | None = None, token: object = None
    ) -> proto.Response:
        """Send one request and return its response (``ok:false`` included).

        Callers are served one at a time, in arrival order. ``timeout`` bounds
        the whole call, queueing included; on timeout or cancellation the
        connection stays usable and the reply, if one is owed, is reported
        later through ``on_late_reply`` as a :class:`LateReply` carrying ``token``.
        """
        self._conn.check_usable()
        ticket = _Ticket(token)
        if timeout is None:
            event = await self._exchange(request, ticket)
        else:
            try:
                async with _timeout(timeout):
                    event = await self._exchange(request, ticket)
            except TimeoutError:
                raise self._timeout_error(request, ticket, timeout) from None
        if isinstance(event, ResponseUnreadable):
            raise event.error
        assert isinstance(event, ResponseReceived)
        return event.response

    async def run(
        self,
        code: str,
        *,
        ctx: Any = None,
        lib_paths: Sequence[str] = (),
        timeout: float | None = None,
    ) -> proto.FeedData:
        """Start a Lua session; returns its first feed (paused or finished)."""
        return self._expect(
            await self.send_request(proto.Run(code, ctx, tuple(lib_paths)), timeout=timeout),
            "run",
            proto.FeedData,
        )

    async def continue_(
        self,
        sid: str,
        response: str,
        *,
        query_id: str | None = None,
        usage: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> proto.FeedData:
        """Answer one pending query of the paused session ``sid``."""
        request = proto.Continue(sid, response, query_id, usage)
        return self._expect(
            await self.send_request(request, timeout=timeout), "continue", proto.FeedData
        )

    async def status(
        self, *, include_history: bool = False, timeout: float | None = None
    ) -> proto.StatusData:
        """The worker's session state."""
        response = await self.send_request(proto.Status(include_history), timeout=timeout)
        return self._expect(response, "status", proto.StatusData)

    async def shutdown(self, *, timeout: float | None = None) -> proto.ShutdownData:
        """Ask the worker to exit; the connection is closed afterwards."""
        try:
            response = await self.send_request(proto.Shutdown(), timeout=timeout)
            return self._expect(response, "shutdown", proto.ShutdownData)
        finally:
            if not self._conn.owes_reply:
                self.close()

    async def settle(self, *, timeout: float | None = None) -> None:
        """Wait until every owed late reply has been read (and reported)."""
        self._conn.check_usable()
        try:
            async with _timeout(timeout):
                await self._exchange(None, _Ticket(None))
        except TimeoutError:
            raise RequestTimeout("settle", timeout or 0.0, self._queue_reason()) from None

    def close(self) -> None:
        """Close the socket; pending callers get ``ClientClosed``. Safe to call twice."""
        if self._sock.fileno() < 0:
            return
        self._conn.close()
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_exception(ClientClosed())
        self._unwatch()
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    @property
    def broken(self) -> ConnectionBroken | None:
        """The sticky error, once the connection can no longer be trusted."""
        return self._conn.broken

    @property
    def owed_replies(self) -> int:
        """Replies of abandoned requests not read yet (0 or 1: one request in flight)."""
        return int(self._conn.owes_reply)

    async def __aenter__(self) -> PoolClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<PoolClient {self.sock_path} version={self.server_version} "
                f"{self._conn.state.value}>")

    # ------------------------------------------------------------ the exchange

    async def _handshake(self, version: str) -> None:
        """Handshake (again with the worker's own version, if ``version`` is auto)."""
        auto = version == AUTO_VERSION
        first = proto.Handshake(PROTOCOL_VERSION if auto else version)
        event = await self._round_trip(first, _Ticket(None))
        if auto and isinstance(event, HandshakeRejected) and isinstance(
            event.error, VersionMismatch
        ):
            mismatch = event.error
            try:
                event = await self._round_trip(proto.Handshake(mismatch.server), _Ticket(None))
            except (TransportError, ConnectionBroken) as exc:
                # a worker that hangs up after a mismatch: a new connection with its
                # version works, which is what VersionMismatch tells the caller
                raise mismatch from exc
        if isinstance(event, HandshakeRejected):
            raise event.error
        assert isinstance(event, HandshakeAccepted)

    async def _exchange(self, request: proto.Request | None, ticket: _Ticket) -> Event | None:
        """Wait for our turn, settle what is owed, then send ``request`` (if any) and read
        its reply."""
        async with self._lock:
            self._conn.check_usable()
            return await self._round_trip(request, ticket)

    async def _round_trip(self, request: proto.Request | None, ticket: _Ticket) -> Event | None:
        """Settle what is owed, then send ``request`` (if any) and read its reply.

        Failures are mapped to the protocol object's terms here: cancellation (a
        timeout included) abandons the request in flight; an exception that is
        not the protocol's own leaves the stream unknowable.
        """
        conn = self._conn
        try:
            if conn.owes_reply:
                await self._settle()
            if request is None:
                return None
            self._poll()
            kind = type(request)
            unpolled = self._unpolled.get(kind, 0)
            spin = self._spin if unpolled in (0, _REPROBE) else 0.0
            ticket.sent_ns, ticket.sent_perf = time.time_ns(), time.perf_counter()
            conn.send(request, ticket)
            await self._flush()
            event = await self._next_event(spin)
            if spin:  # measured while polling: did the reply come within the window?
                slow = time.perf_counter() - ticket.sent_perf > spin
                self._unpolled[kind] = 1 if slow else 0
            else:
                self._unpolled[kind] = min(unpolled + 1, _REPROBE)
            return event
        except asyncio.CancelledError:
            if self._conn.abandon():
                self._start_drain()
            raise
        except PoolError:
            raise  # the protocol object already knows (or the client was closed)
        except OSError as exc:
            raise self._fail(ReadError(f"talking to the worker failed: {exc}")) from exc
        except BaseException as exc:
            broken = self._fail_reason(f"{type(exc).__name__} during I/O with the worker")
            if isinstance(exc, Exception):
                raise broken from exc
            raise  # KeyboardInterrupt / SystemExit propagate as they are

    async def _settle(self) -> None:
        """Send the rest of a half-written request, then read the reply it owes."""
        while self._conn.owes_reply:
            await self._flush()
            event = await self._next_event(0.0)
            if isinstance(event, LateReplyReceived):
                self._report(event)

    async def _flush(self) -> None:
        """Write what the protocol object has to send, waiting while the socket is full."""
        conn = self._conn
        data = conn.data_to_send()
        while data:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                await self._wait_fd(writable=True)
                continue
            except OSError as exc:
                raise self._fail(WriteError(f"sending to the worker failed: {exc}")) from exc
            conn.bytes_sent(n)
            data = data[n:]

    async def _next_event(self, spin: float) -> Event:
        """Read until the protocol object has an event, polling for up to ``spin``
        seconds first (see the module doc)."""
        conn, loop = self._conn, self._loop
        _in_flight[loop] = _in_flight.get(loop, 0) + 1
        try:
            spin_until = time.perf_counter() + spin
            while True:
                received = self._recv()  # read first: the reply is usually all there is
                if (event := conn.next_event()) is not NEED_DATA:
                    break
                if received:
                    continue
                if _in_flight[loop] > 1 or time.perf_counter() >= spin_until:
                    await self._wait_fd(writable=False)
                else:  # poll after one turn of the loop: other tasks run meanwhile
                    await asyncio.sleep(0)
                    conn.check_usable()
            assert not isinstance(event, NeedData)
            return event
        finally:
            if _in_flight[loop] == 1:
                del _in_flight[loop]
            else:
                _in_flight[loop] -= 1

    def _recv(self) -> bool:
        """Move what the socket has into the protocol object; False if it had nothing."""
        try:
            data = self._sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise self._fail(ReadError(f"receiving from the worker failed: {exc}")) from exc
        self._conn.receive_data(data)
        return True

    def _poll(self) -> None:
        """Before sending: take in anything that arrived unasked (or EOF), so it is seen.

        ``poll(0)`` first: usually nothing is there, and a failing ``recv`` costs
        three times as much (the exception).
        """
        if self._readable.poll(0) and self._recv() and isinstance(
            self._conn.next_event(), ConnectionEnded
        ):
            self._conn.check_usable()

    async def _wait_fd(self, *, writable: bool) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        if writable:
            self._loop.add_writer(self._fd, _wake, fut)
        else:
            self._loop.add_reader(self._fd, _wake, fut)
        self._waiting = fut
        try:
            await fut
        finally:
            self._waiting = None
            self._unwatch()

    def _unwatch(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)

    # ---------------------------------------------------------------- helpers

    def _start_drain(self) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        """Background: read owed replies as they arrive, so they are reported promptly."""
        with contextlib.suppress(asyncio.CancelledError, PoolError):
            await self._exchange(None, _Ticket(None))

    def _report(self, event: LateReplyReceived) -> None:
        ticket: _Ticket = event.context
        late = LateReply(
            op=event.request.op,
            request=event.request,
            sent_ns=ticket.sent_ns,
            latency_ns=int((time.perf_counter() - ticket.sent_perf) * 1e9),
            response=event.response,
            error=event.error,
            token=ticket.token,
        )
        if self.on_late_reply is None:
            log.info("discarded late reply to %r on %s", late.op, self.sock_path)
            return
        try:
            self.on_late_reply(late)
        except Exception:
            log.exception("on_late_reply callback failed")

    def _fail(self, error: PoolError) -> PoolError:
        self._fail_reason(str(error))
        return error

    def _fail_reason(self, reason: str) -> ConnectionBroken:
        broken = self._conn.fail(reason)
        self._unwatch()
        return broken

    def _queue_reason(self) -> str:
        owed = self._conn.in_flight if self._conn.owes_reply else None
        if owed is not None:
            return f"still waiting for the late reply of an earlier {owed.op!r}"
        return "waiting for earlier requests on this connection"

    def _timeout_error(
        self, request: proto.Request, ticket: _Ticket, timeout: float
    ) -> RequestTimeout:
        """Say whether our request went out (its reply is owed) or never left the queue."""
        if self._conn.owes_reply and self._conn.in_flight_context is ticket:
            return RequestTimeout(request.op, timeout)
        return RequestTimeout(request.op, timeout, self._queue_reason())

    @staticmethod
    def _expect(response: proto.Response, op: str, kind: type[_D]) -> _D:
        if not response.ok:
            raise WorkerError(op, response.error or "(no message)")
        if not isinstance(response.data, kind):
            got = getattr(response.data, "kind", None)
            raise ProtocolError(f"{op!r} expected a {kind.__name__} reply, got kind={got!r}")
        return response.data


async def _open(path: str, timeout: float) -> socket.socket:
    """A connected non-blocking Unix socket, or ``ConnectTimeout``/``ConnectError``.

    A Unix ``connect()`` either completes at once or fails with ``EAGAIN`` when
    the listener's backlog is full (the worker is not accepting). asyncio's
    ``sock_connect`` takes that ``EAGAIN`` for "in progress" and reports an
    unconnected socket as connected, so this retries until the deadline instead.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = _CONNECT_RETRY_FIRST
    try:
        while True:
            try:
                sock.connect(path)
                return sock
            except (BlockingIOError, InterruptedError):
                pass
            if loop.time() + pause > deadline:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, _CONNECT_RETRY_MAX)
    except OSError as exc:
        sock.close()
        raise ConnectError(path, exc.strerror or str(exc)) from exc
    except BaseException:
        sock.close()
        raise
    sock.close()
    raise ConnectTimeout(path, timeout)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

