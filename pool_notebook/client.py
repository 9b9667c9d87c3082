"""The asyncio PoolClient: one Unix-socket connection to one worker.

A thin layer around :mod:`pool_notebook.protocol`: it owns a non-blocking
socket, a bounded :class:`~pool_notebook.protocol.LineBuffer` and a FIFO of
callers (one request in flight per connection).

Cancel safety is stronger than the original Rust client's. All received bytes
go into the connection's own buffer, never into a caller's frame, and the client
tracks exactly how far each exchange got:

* cancelled/timed out before a byte was written: nothing happened;
* cancelled mid-write: the rest of the line is kept and sent before the next
  request, and its reply is owed;
* cancelled after the write: the reply is owed.

Owed replies are read by the client itself (a background drain, or the next
caller within its own timeout) and handed to ``on_late_reply``, never to another
caller. Anything that leaves the stream in an unknowable state (EOF, an
over-long line, an unsolicited line, an exception in the middle of buffer
handling such as a ``KeyboardInterrupt``) marks the connection broken, sticky.

Latency: after writing, the client polls the socket for up to ``spin_seconds``
before parking on the event loop's selector. Workers usually answer in tens of
microseconds, so this skips a selector round trip and a task switch per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
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
    ConnectionClosed,
    HandshakeError,
    HandshakeTimeout,
    PoolError,
    ProtocolError,
    ReadError,
    RequestTimeout,
    ResponseParseError,
    ResponseTooLarge,
    UnsolicitedResponse,
    WorkerError,
    WriteError,
)
from .security import PeerCredentials, check_peer, check_socket_path

__all__ = ["LateReply", "PoolClient"]

log = logging.getLogger(__name__)

_RECV_SIZE = 256 * 1024
#: Default busy-poll window after a write (seconds); 0 disables polling.
DEFAULT_SPIN_SECONDS = 200e-6


@dataclass(frozen=True, slots=True)
class LateReply:
    """The reply (or failure) of a request whose caller gave up waiting."""

    op: str
    request: proto.Request
    sent_ns: int
    latency_ns: int
    response: proto.Response | None
    error: PoolError | None


@dataclass(slots=True)
class _Owed:
    request: proto.Request
    sent_ns: int
    sent_perf: float


_D = TypeVar("_D")


class _Expired(Exception):
    """Internal: a deadline passed while waiting (becomes RequestTimeout)."""


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
        self._loop = asyncio.get_running_loop()
        self._buffer = proto.LineBuffer(max_line_bytes)
        self._spin = spin_seconds
        self.on_late_reply = on_late_reply
        self.sock_path = sock_path
        self.peer = peer
        self.server_version: str | None = None
        self._busy = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._owed: deque[_Owed] = deque()
        self._unsent = b""
        self._waiting: asyncio.Future[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._broken: ConnectionBroken | None = None
        self._closed = False

    # ------------------------------------------------------------------ public

    @classmethod
    async def connect(
        cls,
        sock_path: str | os.PathLike[str],
        *,
        version: str = PROTOCOL_VERSION,
        handshake_timeout: float = 10.0,
        max_line_bytes: int = proto.DEFAULT_MAX_LINE_BYTES,
        allow_insecure: bool = False,
        spin_seconds: float = DEFAULT_SPIN_SECONDS,
        on_late_reply: Callable[[LateReply], None] | None = None,
    ) -> PoolClient:
        """Connect to the worker at ``sock_path`` and run the version handshake.

        Both happen inside this call, bounded by ``handshake_timeout``: no client
        exists unless the worker echoed ``version``; on any failure the socket is
        closed. ``allow_insecure`` skips the directory and peer-uid checks.
        """
        path = check_socket_path(sock_path, allow_insecure=allow_insecure)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                await asyncio.wait_for(loop.sock_connect(sock, path), handshake_timeout)
            except (TimeoutError, asyncio.TimeoutError) as exc:
                raise HandshakeTimeout(handshake_timeout) from exc
            except OSError as exc:
                raise ConnectError(path, exc.strerror or str(exc)) from exc
            peer = check_peer(sock, path, allow_insecure=allow_insecure)
        except BaseException:
            sock.close()
            raise
        client = cls(
            sock,
            path,
            max_line_bytes=max_line_bytes,
            spin_seconds=spin_seconds,
            on_late_reply=on_late_reply,
            peer=peer,
        )
        try:
            deadline = loop.time() + handshake_timeout
            try:
                response = await client._exchange(proto.Handshake(version), deadline)
            except _Expired as exc:
                raise HandshakeTimeout(handshake_timeout) from exc
            except ResponseParseError as exc:
                raise HandshakeError(f"the handshake reply is not valid: {exc}") from exc
            except (ConnectionClosed, ConnectionBroken) as exc:
                raise HandshakeError(
                    f"the worker closed the connection during the handshake ({exc})"
                ) from exc
            client.server_version = proto.check_handshake(response, version).version
            return client
        except BaseException:
            client.close()
            raise

    async def send_request(
        self, request: proto.Request, *, timeout: float | None = None
    ) -> proto.Response:
        """Send one request and return its response (``ok:false`` included).

        Callers are served one at a time, in arrival order. ``timeout`` bounds
        the whole call, queueing included; on timeout or cancellation the
        connection stays usable (see the module docstring).
        """
        self._check_usable()
        deadline = None if timeout is None else self._loop.time() + timeout
        try:
            await self._acquire(deadline)
        except _Expired:
            raise RequestTimeout(request.op, timeout or 0.0, self._queue_reason()) from None
        try:
            return await self._exchange(request, deadline)
        except _Expired as exc:
            raise RequestTimeout(request.op, timeout or 0.0, str(exc)) from None
        finally:
            self._release()

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
            if not self._owed:
                self.close()

    async def settle(self, *, timeout: float | None = None) -> None:
        """Wait until every owed late reply has been read (and reported)."""
        self._check_usable()
        deadline = None if timeout is None else self._loop.time() + timeout
        try:
            await self._acquire(deadline)
            try:
                await self._settle(deadline)
            finally:
                self._release()
        except _Expired:
            raise RequestTimeout("settle", timeout or 0.0, self._queue_reason()) from None

    def close(self) -> None:
        """Close the socket; pending callers get ``ClientClosed``. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        for fut in (self._waiting, *self._waiters):
            if fut is not None and not fut.done():
                fut.set_exception(ClientClosed())
        self._waiters.clear()
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def broken(self) -> ConnectionBroken | None:
        """The sticky error, once the connection can no longer be trusted."""
        return self._broken

    @property
    def owed_replies(self) -> int:
        """Replies of abandoned requests not read yet."""
        return len(self._owed)

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
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return f"<PoolClient {self.sock_path} version={self.server_version} {state}>"

    # ---------------------------------------------------------------- internals

    def _check_usable(self) -> None:
        if self._closed:
            raise ClientClosed()
        if self._broken is not None:
            raise self._broken

    def _queue_reason(self) -> str:
        if self._owed:
            return f"still waiting for the late reply of an earlier {self._owed[0].request.op!r}"
        return "waiting for earlier requests on this connection"

    @staticmethod
    def _expect(response: proto.Response, op: str, kind: type[_D]) -> _D:
        if not response.ok:
            raise WorkerError(op, response.error or "(no message)")
        if not isinstance(response.data, kind):
            got = getattr(response.data, "kind", None)
            raise ProtocolError(f"{op!r} expected a {kind.__name__} reply, got kind={got!r}")
        return response.data

    def _break(self, reason: str) -> ConnectionBroken:
        if self._broken is None:
            self._broken = ConnectionBroken(reason)
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
                self._loop.remove_writer(self._fd)
        return self._broken

    async def _acquire(self, deadline: float | None) -> None:
        if not self._busy and not self._waiters:
            self._busy = True
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(fut)
        try:
            await self._park(fut, deadline)
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release()  # ownership was handed to us as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # ownership passes directly, _busy stays True
                return
        self._busy = False

    async def _park(self, fut: asyncio.Future[None], deadline: float | None) -> None:
        """Await ``fut``; past ``deadline`` raise ``_Expired``."""
        if deadline is None:
            await fut
            return
        timer = self._loop.call_at(deadline, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()

    async def _wait_fd(self, writable: bool, deadline: float | None) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        add = self._loop.add_writer if writable else self._loop.add_reader
        remove = self._loop.remove_writer if writable else self._loop.remove_reader
        add(self._fd, _wake, fut)
        self._waiting = fut
        try:
            await self._park(fut, deadline)
        finally:
            self._waiting = None
            remove(self._fd)

    async def _exchange(self, request: proto.Request, deadline: float | None) -> proto.Response:
        """Write ``request`` and read its reply. The caller holds the lock."""
        data = proto.encode_request(request)
        phase = "settling"
        sent_ns, sent_perf = 0, 0.0
        try:
            await self._settle(deadline)
            self._check_quiet()
            phase = "writing"
            sent_ns = time.time_ns()
            sent_perf = time.perf_counter()
            self._unsent = data
            await self._flush(deadline)
            phase = "reading"
            line = await self._read_line(deadline)
            phase = "done"
            return proto.decode_response(line, len(data))
        except _Expired:
            if phase == "settling":
                raise _Expired(self._queue_reason()) from None
            self._abandon(phase, data, request, sent_ns, sent_perf)
            raise
        except asyncio.CancelledError:
            self._abandon(phase, data, request, sent_ns, sent_perf)
            raise
        except ResponseParseError:
            raise  # a whole line was consumed: framing is intact
        except (ClientClosed, ConnectionBroken):
            raise
        except (ResponseTooLarge, UnsolicitedResponse, ReadError, WriteError) as exc:
            self._break(str(exc))
            raise
        except BaseException as exc:
            raise_from = self._break(f"{type(exc).__name__} while {phase} a {request.op!r}")
            if isinstance(exc, Exception):
                raise raise_from from exc
            raise  # KeyboardInterrupt / SystemExit propagate as they are

    def _abandon(
        self, phase: str, data: bytes, request: proto.Request, sent_ns: int, sent_perf: float
    ) -> None:
        """The caller gave up during ``phase``: record what the stream now owes."""
        if phase == "writing" and self._unsent is data:
            self._unsent = b""  # not a byte went out: nothing happened
        elif phase in ("writing", "reading"):
            self._owe(_Owed(request, sent_ns, sent_perf))

    def _owe(self, owed: _Owed) -> None:
        self._owed.append(owed)
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        """Background: read owed replies as they arrive, so they are reported promptly."""
        try:
            await self._acquire(None)
        except (asyncio.CancelledError, ClientClosed):
            return
        try:
            await self._settle(None)
        except (asyncio.CancelledError, PoolError):
            pass  # close() cancels us; a broken stream is already recorded
        except BaseException as exc:
            self._break(f"{type(exc).__name__} while reading a late reply")
            raise
        finally:
            self._release()

    async def _settle(self, deadline: float | None) -> None:
        """Send the rest of a half-written request, then read every owed reply."""
        try:
            if self._unsent:
                await self._flush(deadline)
            while self._owed:
                owed = self._owed[0]
                line = await self._read_line(deadline)
                self._owed.popleft()
                response: proto.Response | None = None
                error: PoolError | None = None
                try:
                    response = proto.decode_response(line)
                except ResponseParseError as exc:
                    error = exc
                self._report(owed, response, error)
        except (asyncio.CancelledError, _Expired, ClientClosed, ConnectionBroken):
            raise
        except (ResponseTooLarge, ReadError, WriteError) as exc:
            self._break(str(exc))
            raise

    def _report(
        self, owed: _Owed, response: proto.Response | None, error: PoolError | None
    ) -> None:
        late = LateReply(
            op=owed.request.op,
            request=owed.request,
            sent_ns=owed.sent_ns,
            latency_ns=int((time.perf_counter() - owed.sent_perf) * 1e9),
            response=response,
            error=error,
        )
        if self.on_late_reply is None:
            log.info("discarded late reply to %r on %s", late.op, self.sock_path)
            return
        try:
            self.on_late_reply(late)
        except Exception:
            log.exception("on_late_reply callback failed")

    def _check_quiet(self) -> None:
        """Nothing may arrive before we ask: anything that did is unsolicited (or EOF)."""
        if len(self._buffer):
            raise UnsolicitedResponse(self._buffer.pending)
        try:
            data = self._sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ReadError(f"receiving from the worker failed: {exc}") from exc
        if not data:
            raise ConnectionClosed()
        raise UnsolicitedResponse(data)

    async def _flush(self, deadline: float | None) -> None:
        """Write ``self._unsent`` completely, keeping the remainder if interrupted."""
        while self._unsent:
            try:
                n = self._sock.send(self._unsent)
            except (BlockingIOError, InterruptedError):
                await self._wait_fd(True, deadline)
                continue
            except OSError as exc:
                raise WriteError(f"sending to the worker failed: {exc}") from exc
            self._unsent = self._unsent[n:]

    async def _read_line(self, deadline: float | None) -> bytes:
        buffer = self._buffer
        # Poll only when nothing else is ready to run: spinning while other tasks wait
        # (e.g. a fan-out to many workers) would serialise them.
        busy_loop = getattr(self._loop, "_ready", None)
        spin_until = time.perf_counter() + (0.0 if busy_loop else self._spin)
        while True:
            line = buffer.next_line()
            if line is not None:
                return line
            try:
                data = self._sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                if time.perf_counter() >= spin_until:
                    await self._wait_fd(False, deadline)
                continue
            except OSError as exc:
                raise ReadError(f"receiving from the worker failed: {exc}") from exc
            if not data:
                raise ConnectionClosed(buffer.pending)
            buffer.feed(data)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())

