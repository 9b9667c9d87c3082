"""The client role of the pool protocol as a state machine: bytes in, events out.

In the style of h11's ``Connection`` and websockets' ``Protocol``: no sockets,
no clocks, no event loop. The I/O layer (``pool_notebook.client``) moves bytes
and waits; every protocol rule lives here:

* the handshake comes first, and its reply decides whether requests may follow
  (a rejected handshake may be retried on the same connection, as algocline's
  worker allows);
* one request in flight: ``send`` is legal only in ``IDLE`` (or ``CONNECTING``
  for the handshake);
* a caller that gives up calls :meth:`ClientConnection.abandon`: before any
  byte was written nothing happened; mid-write the rest is still sent and the
  reply is owed; after the write the reply is owed. An owed reply comes out as
  :class:`LateReplyReceived`, never as another caller's reply;
* a line nobody asked for, an over-long line, or EOF in the middle of an
  exchange break the connection, and ``BROKEN`` is sticky.

States and the legal moves between them are one table, :data:`TRANSITIONS`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from ..errors import (
    ClientClosed,
    ConnectionBroken,
    ConnectionClosed,
    HandshakeError,
    PoolError,
    ProtocolError,
    ProtocolStateError,
    ResponseParseError,
    UnsolicitedResponse,
)
from .framing import DEFAULT_MAX_LINE_BYTES, LineBuffer
from .messages import (
    Handshake,
    HandshakeData,
    Request,
    Response,
    check_handshake,
    decode_response,
    encode_request,
)

__all__ = [
    "NEED_DATA",
    "TRANSITIONS",
    "ClientConnection",
    "ConnectionEnded",
    "Event",
    "HandshakeAccepted",
    "HandshakeRejected",
    "Input",
    "LateReplyReceived",
    "NeedData",
    "ResponseReceived",
    "ResponseUnreadable",
    "State",
]


class State(enum.Enum):
    """Where the client side of one connection is."""

    CONNECTING = "connecting"  # connected; the handshake has not been accepted yet
    IDLE = "idle"  # handshake accepted, nothing in flight: a request may be sent
    SENDING = "sending"  # a request line is not completely written yet
    AWAITING = "awaiting"  # the line is written; its reply is due
    BROKEN = "broken"  # the stream is in an unknowable state (sticky)
    CLOSED = "closed"  # closed by its owner, or cleanly by the worker

    __hash__ = object.__hash__  # members are singletons; Enum's own hash is slow Python


class Input(enum.Enum):
    """What can happen to a connection; the table maps (state, input) to the next state."""

    SEND_HANDSHAKE = "send a handshake"
    SEND = "send a request"
    WRITTEN = "the last byte of the request was written"
    WITHDRAW = "abandon a request before any byte was written"
    WITHDRAW_HANDSHAKE = "abandon a handshake before any byte was written"
    ABANDON = "abandon a request partly or fully written"
    REPLY = "the reply of a request arrived"
    HANDSHAKE_ACCEPTED = "the handshake reply accepts our version"
    HANDSHAKE_REJECTED = "the handshake reply refuses it"
    EOF = "the worker closed the connection while nothing was owed"
    FAIL = "the stream failed or misbehaved"
    CLOSE = "the owner closed the connection"

    __hash__ = object.__hash__


_S, _I = State, Input
#: The one transition table: a move not listed here raises ``ProtocolStateError``.
TRANSITIONS: Final[dict[State, dict[Input, State]]] = {
    _S.CONNECTING: {
        _I.SEND_HANDSHAKE: _S.SENDING,
        _I.EOF: _S.CLOSED,
        _I.FAIL: _S.BROKEN,
        _I.CLOSE: _S.CLOSED,
    },
    _S.IDLE: {
        _I.SEND: _S.SENDING,
        _I.EOF: _S.CLOSED,
        _I.FAIL: _S.BROKEN,
        _I.CLOSE: _S.CLOSED,
    },
    _S.SENDING: {
        _I.WRITTEN: _S.AWAITING,
        _I.WITHDRAW: _S.IDLE,
        _I.WITHDRAW_HANDSHAKE: _S.CONNECTING,
        _I.ABANDON: _S.SENDING,
        _I.FAIL: _S.BROKEN,
        _I.CLOSE: _S.CLOSED,
    },
    _S.AWAITING: {
        _I.REPLY: _S.IDLE,
        _I.HANDSHAKE_ACCEPTED: _S.IDLE,
        _I.HANDSHAKE_REJECTED: _S.CONNECTING,
        _I.ABANDON: _S.AWAITING,
        _I.FAIL: _S.BROKEN,
        _I.CLOSE: _S.CLOSED,
    },
    _S.BROKEN: {_I.CLOSE: _S.CLOSED},
    _S.CLOSED: {_I.CLOSE: _S.CLOSED},
}


# ------------------------------------------------------------------------- events


@dataclass(slots=True)
class ResponseReceived:
    """The reply to the request in flight; ``context`` is what ``send`` was given."""

    request: Request
    response: Response
    context: Any


@dataclass(slots=True)
class ResponseUnreadable:
    """A whole reply line arrived but is not a valid response; framing is intact."""

    request: Request
    error: ResponseParseError
    context: Any


@dataclass(slots=True)
class LateReplyReceived:
    """The reply (or an unreadable line) owed to a request whose caller gave up."""

    request: Request
    response: Response | None
    error: ResponseParseError | None
    context: Any


@dataclass(slots=True)
class HandshakeAccepted:
    """The worker echoed our version: requests may follow."""

    data: HandshakeData
    response: Response
    context: Any


@dataclass(slots=True)
class HandshakeRejected:
    """The handshake failed (``VersionMismatch`` carries the worker's version).

    The connection is back in ``CONNECTING``: another handshake may be sent.
    """

    error: HandshakeError
    response: Response | None
    context: Any


@dataclass(slots=True)
class ConnectionEnded:
    """The worker closed the connection while no reply was owed."""


class NeedData(enum.Enum):
    """``next_event`` found no complete line: receive more bytes first."""

    NEED_DATA = "need data"


NEED_DATA: Final = NeedData.NEED_DATA

Event = (
    ResponseReceived
    | ResponseUnreadable
    | LateReplyReceived
    | HandshakeAccepted
    | HandshakeRejected
    | ConnectionEnded
)


_UNUSABLE: Final = frozenset({State.BROKEN, State.CLOSED})


@dataclass(slots=True)
class _Exchange:
    """The request in flight: its line, how much of it is still unwritten, who waits."""

    request: Request
    size: int  # of the whole line
    unsent: bytes | memoryview  # a memoryview once partly written: no copies
    context: Any
    expected_version: str | None  # set for a handshake: the version we asked for
    abandoned: bool = False


class ClientConnection:
    """The client side of one connection, sans I/O.

    Drive it with :meth:`send` (then write :meth:`data_to_send` and report
    progress with :meth:`bytes_sent`), :meth:`receive_data` (``b""`` is EOF)
    and :meth:`next_event`. Errors that end the stream are raised once as what
    they are (``UnsolicitedResponse``, ``ResponseTooLarge``, ``ConnectionClosed``)
    and then, sticky, as ``ConnectionBroken``.
    """

    __slots__ = ("_buffer", "_closed_by", "_eof", "_exchange", "_failure", "_received",
                 "server_version", "state")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.state = State.CONNECTING
        self.server_version: str | None = None
        self._buffer = LineBuffer(max_line_bytes)
        self._received = self._buffer.buffer  # the same bytearray, to test emptiness cheaply
        self._exchange: _Exchange | None = None
        self._eof = False
        self._failure: ConnectionBroken | None = None
        self._closed_by: PoolError | None = None

    # ------------------------------------------------------------- state queries

    @property
    def owes_reply(self) -> bool:
        """True while an abandoned request's reply (or its unwritten rest) is outstanding."""
        return self._exchange is not None and self._exchange.abandoned

    @property
    def in_flight(self) -> Request | None:
        """The request whose reply is due (abandoned or not), if any."""
        return self._exchange.request if self._exchange is not None else None

    @property
    def in_flight_context(self) -> Any:
        """The ``context`` given to ``send`` for the request in flight (None if none)."""
        return self._exchange.context if self._exchange is not None else None

    @property
    def broken(self) -> ConnectionBroken | None:
        """The sticky error once the connection is ``BROKEN``."""
        return self._failure

    def check_usable(self) -> None:
        """Raise the error that explains why nothing can be sent, if anything does."""
        if self.state is State.BROKEN:
            assert self._failure is not None
            raise self._failure
        if self.state is State.CLOSED:
            raise self._closed_by or ClientClosed()

    def _move(self, event: Input) -> None:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            self.check_usable()
            raise ProtocolStateError(self.state.value, event.value) from None

    # ------------------------------------------------------------------- sending

    def send(self, request: Request, context: Any = None) -> bytes:
        """Start ``request``; returns its whole line (also :meth:`data_to_send`).

        A handshake is legal only in ``CONNECTING``, any other request only in
        ``IDLE``. Bytes received while nothing was owed make this raise
        ``UnsolicitedResponse`` (or ``ConnectionClosed`` after EOF) instead.
        """
        expected_version = request.version if isinstance(request, Handshake) else None
        move = Input.SEND if expected_version is None else Input.SEND_HANDSHAKE
        row = TRANSITIONS[self.state]
        if move not in row:
            self.check_usable()
            raise ProtocolStateError(self.state.value, move.value)
        line = encode_request(request)
        if self._eof or self._received:
            self._check_quiet()
        self.state = row[move]
        self._exchange = _Exchange(request, len(line), line, context, expected_version)
        return line

    def _check_quiet(self) -> None:
        """Nothing may have arrived before we ask: anything that did is unsolicited."""
        if len(self._buffer):
            raise self._fail(UnsolicitedResponse(self._buffer.pending))
        if self._eof:
            self._move(Input.EOF)
            self._closed_by = ConnectionClosed()
            raise self._closed_by

    def data_to_send(self) -> bytes | memoryview:
        """The part of the request line not written yet (empty when none)."""
        return self._exchange.unsent if self._exchange is not None else b""

    def bytes_sent(self, count: int) -> None:
        """The I/O layer wrote ``count`` more bytes of :meth:`data_to_send`."""
        exchange = self._exchange
        if exchange is None or count > len(exchange.unsent) or self.state is not State.SENDING:
            raise ProtocolStateError(self.state.value, f"report {count} bytes written")
        if count == len(exchange.unsent):
            exchange.unsent = b""
        else:
            exchange.unsent = memoryview(exchange.unsent)[count:]
        if not exchange.unsent:
            self.state = TRANSITIONS[State.SENDING][Input.WRITTEN]

    def abandon(self) -> bool:
        """The caller of the request in flight gave up; returns True if a reply is owed.

        Before any byte was written the request is forgotten (nothing happened).
        Otherwise the rest of the line must still be written and the reply is
        owed: it will come out of :meth:`next_event` as :class:`LateReplyReceived`.
        Idempotent; a no-op when nothing is in flight.
        """
        exchange = self._exchange
        if exchange is None or self.state not in (State.SENDING, State.AWAITING):
            return False
        if self.state is State.SENDING and len(exchange.unsent) == exchange.size:
            self._exchange = None
            self._move(Input.WITHDRAW_HANDSHAKE if exchange.expected_version is not None
                       else Input.WITHDRAW)
            return False
        exchange.abandoned = True
        self._move(Input.ABANDON)
        return True

    # ----------------------------------------------------------------- receiving

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the socket; ``b""`` means EOF."""
        if self.state in _UNUSABLE:
            return  # nothing more can be trusted or wanted
        if data:
            self._buffer.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """The next event the received bytes make, or ``NEED_DATA``.

        Raises what broke the stream (``UnsolicitedResponse``, ``ResponseTooLarge``,
        ``ConnectionClosed``) once, and ``ConnectionBroken`` after that.
        """
        if self.state in _UNUSABLE:
            self.check_usable()
        try:
            line = self._buffer.next_line()
        except ProtocolError as exc:
            raise self._fail(exc) from None
        if line is None:
            return self._on_no_line()
        exchange = self._exchange
        if exchange is None or self.state is not State.AWAITING:
            raise self._fail(UnsolicitedResponse(line))
        self._exchange = None
        try:
            response = decode_response(line, exchange.size)
        except ResponseParseError as exc:
            return self._unreadable(exchange, exc)
        if exchange.expected_version is not None:
            return self._handshake_reply(exchange, response)
        self.state = TRANSITIONS[State.AWAITING][Input.REPLY]
        if exchange.abandoned:
            return LateReplyReceived(exchange.request, response, None, exchange.context)
        return ResponseReceived(exchange.request, response, exchange.context)

    def _on_no_line(self) -> Event | NeedData:
        if not self._eof:
            return NEED_DATA
        if self.state in (State.SENDING, State.AWAITING) or len(self._buffer):
            raise self._fail(ConnectionClosed(self._buffer.pending))
        self._move(Input.EOF)
        self._closed_by = ConnectionClosed()
        return ConnectionEnded()

    def _unreadable(self, exchange: _Exchange, exc: ResponseParseError) -> Event:
        if exchange.expected_version is not None:
            self._move(Input.HANDSHAKE_REJECTED)
            error = HandshakeError(f"the handshake reply is not valid: {exc}")
            return HandshakeRejected(error, None, exchange.context)
        self._move(Input.REPLY)
        if exchange.abandoned:
            return LateReplyReceived(exchange.request, None, exc, exchange.context)
        return ResponseUnreadable(exchange.request, exc, exchange.context)

    def _handshake_reply(self, exchange: _Exchange, response: Response) -> Event:
        assert exchange.expected_version is not None
        event: Event
        try:
            data = check_handshake(response, exchange.expected_version)
        except HandshakeError as exc:
            self._move(Input.HANDSHAKE_REJECTED)
            event = HandshakeRejected(exc, response, exchange.context)
        else:
            self._move(Input.HANDSHAKE_ACCEPTED)
            self.server_version = data.version
            event = HandshakeAccepted(data, response, exchange.context)
        if exchange.abandoned:
            return LateReplyReceived(exchange.request, response, None, exchange.context)
        return event

    # ------------------------------------------------------------------- failing

    def fail(self, reason: str) -> ConnectionBroken:
        """The I/O layer saw the stream fail (an OSError, an interrupt mid-buffer)."""
        if self._failure is None and self.state is not State.CLOSED:
            self._move(Input.FAIL)
            self._failure = ConnectionBroken(reason)
            self._exchange = None
        return self._failure or ConnectionBroken(reason)

    def _fail(self, error: PoolError) -> PoolError:
        self.fail(str(error))
        return error

    def close(self) -> None:
        """The owner closed the connection; later calls raise ``ClientClosed``."""
        if self.state is not State.CLOSED:
            self._closed_by = ClientClosed()
        self._move(Input.CLOSE)
        self._exchange = None
