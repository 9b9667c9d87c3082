"""The worker role of the protocol, sans I/O: bytes in, requests out, replies back to bytes.

One :class:`WorkerConnection` per client connection, in the style of h11's
``Connection``: the I/O layer feeds received bytes with :meth:`receive_data`,
takes :class:`RequestReceived` events from :meth:`next_event`, answers each with
:meth:`send_reply`, and writes whatever :meth:`data_to_send` returns. The
machine owns the rules a worker must keep whatever it runs:

- the handshake comes first; a version mismatch (or any other first request) is
  answered with an error and the connection stays open for another handshake,
  as algocline's ``alc pool-worker`` does; a later handshake is answered again;
- one request at a time: the next line is looked at only after the reply to the
  current one was given, so replies leave in request order;
- malformed lines are answered ``malformed request: …`` and the connection goes on;
- every line is bounded (``max_line_bytes``) at all times, also while a request
  is being served; an over-long line is answered, after the replies still owed,
  and the connection then closes (the stream cannot be resynchronised);
- unread input is bounded: :attr:`wants_read` turns False once a line's worth of
  complete requests is queued, so the I/O layer stops reading (backpressure);
- a ``shutdown`` queued behind a running request is visible at once
  (:attr:`shutdown_requested`) so the worker can interrupt that request.

Nothing here touches a socket, a thread or the event loop.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from ..errors import MalformedRequest, RequestTooLarge
from .client import NEED_DATA, NeedData
from .framing import DEFAULT_MAX_LINE_BYTES, LineBuffer
from .messages import (
    Handshake,
    HandshakeData,
    Request,
    Shutdown,
    decode_request,
    encode_response,
    error_response,
    version_mismatch_message,
)

__all__ = [
    "ConnectionClosing",
    "NeedData",
    "RequestReceived",
    "WorkerConnection",
    "WorkerEvent",
    "WorkerState",
    "WorkerStateError",
]


class WorkerState(enum.Enum):
    """Where one client connection stands, seen from the worker."""

    #: No successful handshake yet: only a matching ``handshake`` lets requests through.
    AWAIT_HANDSHAKE = "await_handshake"
    #: Greeted; no request is being served.
    READY = "ready"
    #: A request was handed out; its reply is owed (``send_reply``).
    BUSY = "busy"
    #: Owed replies are flushed, then the connection closes (shutdown, over-long line).
    CLOSING = "closing"
    #: Nothing more will be read or sent.
    CLOSED = "closed"


class WorkerStateError(RuntimeError):
    """The I/O layer broke the machine's contract (a bug in the caller, not in the peer)."""


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request the worker must answer with :meth:`WorkerConnection.send_reply`."""

    request: Request


@dataclass(frozen=True, slots=True)
class ConnectionClosing:
    """Every owed reply is in :meth:`WorkerConnection.data_to_send`; close after writing it."""

    reason: str


WorkerEvent = RequestReceived | NeedData | ConnectionClosing


class WorkerConnection:
    """The worker side of one client connection (see the module docstring)."""

    def __init__(self, version: str, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.version = version
        self.max_line_bytes = max_line_bytes
        self.state = WorkerState.AWAIT_HANDSHAKE
        self._buffer = LineBuffer(max_line_bytes, RequestTooLarge)
        self._queue: deque[tuple[Request | MalformedRequest | RequestTooLarge, int]] = deque()
        self._queued_bytes = 0
        self._out: list[bytes] = []
        self._input_closed = False
        self._closing_reason = ""
        self.shutdown_requested = False

    # ------------------------------------------------------------ input side

    @property
    def wants_read(self) -> bool:
        """False while a line's worth of complete requests waits, or input is over.

        An incomplete line never stops reading: it either completes or outgrows
        ``max_line_bytes`` and is refused, so buffered input stays under two lines.
        """
        if self._input_closed or self.state in (WorkerState.CLOSING, WorkerState.CLOSED):
            return False
        return self._queued_bytes < self.max_line_bytes

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; complete lines are decoded and queued."""
        if self._input_closed or self.state is WorkerState.CLOSED:
            return
        self._buffer.feed(data)
        while True:
            try:
                line = self._buffer.next_line()
            except RequestTooLarge as exc:
                self._queue.append((exc, 0))
                self._input_closed = True
                self._buffer = LineBuffer(self.max_line_bytes, RequestTooLarge)
                return
            if line is None:
                return
            item: Request | MalformedRequest
            try:
                item = decode_request(line)
            except MalformedRequest as exc:
                item = exc
            if isinstance(item, Shutdown):
                self.shutdown_requested = True
            self._queue.append((item, len(line)))
            self._queued_bytes += len(line)

    def next_event(self) -> WorkerEvent:
        """The next request to serve, ``NeedData``, or ``ConnectionClosing``.

        Lines the machine can answer by itself (handshakes, malformed lines,
        requests before the handshake) are answered here and skipped.
        """
        while True:
            if self.state is WorkerState.BUSY or self.state is WorkerState.CLOSED:
                return NEED_DATA
            if self.state is WorkerState.CLOSING:
                return ConnectionClosing(self._closing_reason)
            if not self._queue:
                return NEED_DATA
            item, size = self._queue.popleft()
            self._queued_bytes -= size
            if isinstance(item, (MalformedRequest, RequestTooLarge)):
                self._out.append(error_response(f"malformed request: {item}"))
                if isinstance(item, RequestTooLarge):
                    self._close("request line too long")
                continue
            if isinstance(item, Handshake):
                self._handshake(item)
                continue
            if self.state is WorkerState.AWAIT_HANDSHAKE:
                self._out.append(error_response(
                    f"expected a handshake first (got op {item.op!r}): send "
                    f'{{"op":"handshake","version":"{self.version}"}}'))
                continue
            self.state = WorkerState.BUSY
            return RequestReceived(item)

    # ----------------------------------------------------------- output side

    def send_reply(self, reply: bytes) -> None:
        """Answer the request handed out last (``reply`` is one encoded response line)."""
        if self.state is not WorkerState.BUSY:
            raise WorkerStateError(f"no request is being served (state {self.state.name})")
        self._out.append(reply)
        self.state = WorkerState.READY

    def close_after_reply(self, reason: str) -> None:
        """After the current reply (or now, when none is owed): stop and close."""
        if self.state is WorkerState.BUSY:
            raise WorkerStateError("give the owed reply before closing")
        if self.state is not WorkerState.CLOSED:
            self._close(reason)

    def data_to_send(self) -> bytes:
        """Replies produced since the last call, in order (empty when none)."""
        if not self._out:
            return b""
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        return data

    def connection_lost(self) -> None:
        """The peer went away: nothing more is read or sent."""
        self.state = WorkerState.CLOSED
        self._queue.clear()
        self._queued_bytes = 0
        self._out.clear()

    # -------------------------------------------------------------- internals

    def _handshake(self, request: Handshake) -> None:
        if request.version != self.version:
            self._out.append(error_response(version_mismatch_message(request.version,
                                                                      self.version)))
            return
        self._out.append(encode_response(HandshakeData(self.version)))
        if self.state is WorkerState.AWAIT_HANDSHAKE:
            self.state = WorkerState.READY

    def _close(self, reason: str) -> None:
        self.state = WorkerState.CLOSING
        self._closing_reason = reason
        self._input_closed = True
        self._queue.clear()
        self._queued_bytes = 0
