"""The client-role state machine, driven with plain bytes: every state, every transition.

No sockets and no event loop: these are the deterministic proofs of the
protocol rules (handshake first, one request in flight, owed replies of
abandoned requests, unsolicited lines, EOF, the sticky broken state). The same
rules are exercised over real sockets in test_client.py / test_client_cancel.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool_notebook import protocol as proto
from pool_notebook.errors import (
    ClientClosed,
    ConnectionBroken,
    ConnectionClosed,
    HandshakeError,
    MalformedRequest,
    ProtocolStateError,
    ResponseTooLarge,
    UnsolicitedResponse,
    VersionMismatch,
)
from pool_notebook.protocol.client import (
    NEED_DATA,
    TRANSITIONS,
    ClientConnection,
    ConnectionEnded,
    HandshakeAccepted,
    HandshakeRejected,
    Input,
    LateReplyReceived,
    ResponseReceived,
    ResponseUnreadable,
    State,
)

V = "0.31.0"
HS_OK = proto.encode_response(proto.HandshakeData(V))
STATUS_OK = proto.encode_response(proto.StatusData(False))


def echo(token: int) -> bytes:
    return proto.encode_response(proto.UnknownData("echo", {"kind": "echo", "token": token}))


def echo_req(token: int) -> proto.RawRequest:
    return proto.RawRequest({"op": "echo", "token": token})


def write_all(c: ClientConnection) -> bytes:
    data = bytes(c.data_to_send())
    c.bytes_sent(len(data))
    return data


def greeted() -> ClientConnection:
    c = ClientConnection()
    c.send(proto.Handshake(V))
    write_all(c)
    c.receive_data(HS_OK)
    assert isinstance(c.next_event(), HandshakeAccepted)
    return c


# ------------------------------------------------------------ the transition table

def in_state(state: State, handshake: bool = False) -> ClientConnection:
    """A connection driven into ``state`` through its public methods only."""
    c = ClientConnection() if handshake or state is State.CONNECTING else greeted()
    request: proto.Request = proto.Handshake(V) if handshake else proto.Status()
    if state in (State.SENDING, State.AWAITING):
        c.send(request)
        if state is State.AWAITING:
            write_all(c)
    elif state is State.BROKEN:
        c.receive_data(b"{}\n")
        with pytest.raises(UnsolicitedResponse):
            c.next_event()
    elif state is State.CLOSED:
        c.close()
    assert c.state is state
    return c


def _reply(line: bytes) -> Callable[[ClientConnection], Any]:
    def act(c: ClientConnection) -> Any:
        c.receive_data(line)
        return c.next_event()
    return act


def _abandon(c: ClientConnection) -> Any:
    if c.state is State.SENDING:
        c.bytes_sent(1)  # mid-write: the reply becomes owed
    assert c.abandon()


def _eof(c: ClientConnection) -> Any:
    c.receive_data(b"")
    return c.next_event()


ACTIONS: dict[Input, Callable[[ClientConnection], Any]] = {
    Input.SEND_HANDSHAKE: lambda c: c.send(proto.Handshake(V)),
    Input.SEND: lambda c: c.send(proto.Status()),
    Input.WRITTEN: write_all,
    Input.WITHDRAW: lambda c: c.abandon(),
    Input.WITHDRAW_HANDSHAKE: lambda c: c.abandon(),
    Input.ABANDON: _abandon,
    Input.REPLY: _reply(STATUS_OK),
    Input.HANDSHAKE_ACCEPTED: _reply(HS_OK),
    Input.HANDSHAKE_REJECTED: _reply(proto.error_response("version mismatch: client=0.31.0, "
                                                          "server=0.32.0")),
    Input.EOF: _eof,
    Input.FAIL: lambda c: c.fail("the test broke it"),
    Input.CLOSE: lambda c: c.close(),
}
HANDSHAKE_INPUTS = {Input.WITHDRAW_HANDSHAKE, Input.HANDSHAKE_ACCEPTED, Input.HANDSHAKE_REJECTED}

LEGAL = [(s, i, t) for s, row in TRANSITIONS.items() for i, t in row.items()]


def test_every_state_has_a_row_and_every_input_is_used() -> None:
    assert set(TRANSITIONS) == set(State)
    assert {i for row in TRANSITIONS.values() for i in row} == set(Input)


@pytest.mark.parametrize(("state", "move", "target"), LEGAL,
                         ids=[f"{s.name}-{i.name}" for s, i, _ in LEGAL])
def test_each_transition_driven_with_bytes(state: State, move: Input, target: State) -> None:
    c = in_state(state, handshake=move in HANDSHAKE_INPUTS)
    ACTIONS[move](c)
    assert c.state is target


def test_illegal_moves_are_refused_and_change_nothing() -> None:
    idle = greeted()
    with pytest.raises(ProtocolStateError, match=r"cannot send a handshake while .* idle"):
        idle.send(proto.Handshake(V))
    with pytest.raises(ProtocolStateError, match="connecting"):
        ClientConnection().send(proto.Status())  # the handshake comes first
    for state in (State.SENDING, State.AWAITING):
        c = in_state(state)
        with pytest.raises(ProtocolStateError):
            c.send(proto.Status())  # one request in flight
        assert c.state is state
    with pytest.raises(ProtocolStateError):
        idle.bytes_sent(1)  # nothing to write
    awaiting = in_state(State.AWAITING)
    with pytest.raises(ProtocolStateError):
        awaiting.bytes_sent(1)
    sending = in_state(State.SENDING)
    with pytest.raises(ProtocolStateError):
        sending.bytes_sent(len(sending.data_to_send()) + 1)
    assert idle.state is State.IDLE and sending.state is State.SENDING
    assert not idle.abandon() and idle.state is State.IDLE  # nothing in flight: a no-op


def test_broken_and_closed_are_sticky_with_the_right_error() -> None:
    broken = in_state(State.BROKEN)
    for act in (lambda: broken.send(proto.Status()), broken.next_event, broken.check_usable):
        with pytest.raises(ConnectionBroken, match="nobody asked for"):
            act()
    assert broken.fail("again") is broken.broken  # the first reason stays
    broken.close()
    with pytest.raises(ClientClosed):
        broken.send(proto.Status())
    closed = in_state(State.CLOSED)
    closed.close()  # idempotent
    with pytest.raises(ClientClosed):
        closed.next_event()
    closed.receive_data(b"late bytes\n")  # ignored, not an error
    assert closed.state is State.CLOSED


# ------------------------------------------------------------------------ exchanges

def test_a_request_and_its_reply() -> None:
    c = greeted()
    assert c.server_version == V
    line = c.send(proto.Status(), context="mine")
    assert line == b'{"op":"status"}\n' and bytes(c.data_to_send()) == line
    assert c.in_flight == proto.Status()
    c.bytes_sent(5)
    assert bytes(c.data_to_send()) == line[5:] and c.state is State.SENDING
    c.bytes_sent(len(line) - 5)
    assert c.state is State.AWAITING and c.next_event() is NEED_DATA
    c.receive_data(STATUS_OK[:10])
    assert c.next_event() is NEED_DATA
    c.receive_data(STATUS_OK[10:])
    event = c.next_event()
    assert isinstance(event, ResponseReceived) and event.context == "mine"
    assert event.response.data == proto.StatusData(False)
    assert event.response.request_size == len(line) and event.response.size == len(STATUS_OK)
    assert c.state is State.IDLE and c.in_flight is None


def test_unencodable_request_changes_nothing() -> None:
    c = greeted()
    with pytest.raises(MalformedRequest):
        c.send(proto.RawRequest({"op": "x", "v": float("nan")}))
    assert c.state is State.IDLE
    c.send(proto.Status())


def test_unreadable_reply_keeps_the_connection() -> None:
    c = in_state(State.AWAITING)
    c.receive_data(b"not json\n")
    event = c.next_event()
    assert isinstance(event, ResponseUnreadable) and event.request == proto.Status()
    assert "malformed response" in str(event.error) and c.state is State.IDLE


# ----------------------------------------------------------------------- handshake

def test_version_mismatch_can_be_retried_on_the_same_connection() -> None:
    c = ClientConnection()
    c.send(proto.Handshake("0.30.0"))
    write_all(c)
    c.receive_data(proto.error_response("version mismatch: client=0.30.0, server=0.31.0"))
    event = c.next_event()
    assert isinstance(event, HandshakeRejected) and isinstance(event.error, VersionMismatch)
    assert event.error.server == "0.31.0" and c.state is State.CONNECTING
    c.send(proto.Handshake(event.error.server))
    write_all(c)
    c.receive_data(HS_OK)
    accepted = c.next_event()
    assert isinstance(accepted, HandshakeAccepted) and accepted.data.version == V
    assert c.server_version == V and c.state is State.IDLE


@pytest.mark.parametrize(("reply", "error", "text"), [
    (proto.encode_response(proto.HandshakeData("9.9.9")), VersionMismatch, "server=9.9.9"),
    (b"garbage\n", HandshakeError, "not valid"),
    (proto.error_response("go away"), HandshakeError, "go away"),
    (STATUS_OK, HandshakeError, "kind='status'"),
])
def test_bad_handshake_replies(reply: bytes, error: type, text: str) -> None:
    c = ClientConnection()
    c.send(proto.Handshake(V))
    write_all(c)
    c.receive_data(reply)
    event = c.next_event()
    assert isinstance(event, HandshakeRejected) and type(event.error) is error
    assert text in str(event.error) and c.state is State.CONNECTING and c.server_version is None


def test_worker_that_closes_after_a_rejected_handshake() -> None:
    c = ClientConnection()
    c.send(proto.Handshake("0.1"))
    write_all(c)
    c.receive_data(proto.error_response("version mismatch: client=0.1, server=0.2"))
    c.receive_data(b"")
    assert isinstance(c.next_event(), HandshakeRejected)
    assert isinstance(c.next_event(), ConnectionEnded) and c.state is State.CLOSED
    with pytest.raises(ConnectionClosed):
        c.send(proto.Handshake("0.2"))


# ------------------------------------------------------------------- cancel safety

def test_abandon_before_any_byte_means_nothing_happened() -> None:
    c = in_state(State.SENDING)
    assert c.abandon() is False
    assert c.state is State.IDLE and not c.owes_reply and len(c.data_to_send()) == 0
    c.send(echo_req(2), context=2)
    write_all(c)
    c.receive_data(echo(2))
    event = c.next_event()
    assert isinstance(event, ResponseReceived) and event.context == 2


def test_abandon_mid_write_still_sends_the_rest_and_owes_the_reply() -> None:
    c = greeted()
    line = c.send(echo_req(1), context=1)
    c.bytes_sent(3)
    assert c.abandon() is True and c.abandon() is True  # idempotent
    assert c.owes_reply and bytes(c.data_to_send()) == line[3:]
    with pytest.raises(ProtocolStateError):
        c.send(echo_req(2))  # the owed reply must be settled first
    write_all(c)
    c.receive_data(echo(1))
    late = c.next_event()
    assert isinstance(late, LateReplyReceived) and late.context == 1
    assert late.response is not None and late.response.raw["data"]["token"] == 1
    assert c.state is State.IDLE and not c.owes_reply


def test_abandon_after_write_owes_the_reply_even_unreadable() -> None:
    c = in_state(State.AWAITING)
    assert c.abandon()
    c.receive_data(b"{broken\n")
    late = c.next_event()
    assert isinstance(late, LateReplyReceived) and late.response is None
    assert late.error is not None and c.state is State.IDLE


def test_abandoned_handshake_reply_is_late_but_still_counts() -> None:
    c = ClientConnection()
    c.send(proto.Handshake(V))
    write_all(c)
    assert c.abandon()
    c.receive_data(HS_OK)
    assert isinstance(c.next_event(), LateReplyReceived)
    assert c.state is State.IDLE  # the worker considers us greeted, and so do we
    c2 = in_state(State.SENDING, handshake=True)
    assert not c2.abandon() and c2.state is State.CONNECTING


class _Worker:
    """A pure model of a worker: answers each complete request line, in order."""

    def __init__(self) -> None:
        self.received = b""
        self.seen: list[int] = []

    def feed(self, data: bytes) -> bytes:
        self.received += data
        out = b""
        while b"\n" in self.received:
            line, self.received = self.received.split(b"\n", 1)
            token = json.loads(line)["token"]
            self.seen.append(token)
            out += echo(token)
        return out


def _write(c: ClientConnection, worker: _Worker, n: int | None = None) -> bytes:
    data = bytes(c.data_to_send())[: n if n is not None else None]
    if data:
        c.bytes_sent(len(data))
    return worker.feed(data)


def _settle(c: ClientConnection, worker: _Worker, replies: bytearray) -> list[int]:
    """What the I/O layer does before the next send: finish writing, read owed replies."""
    late: list[int] = []
    replies += _write(c, worker)
    while c.owes_reply:
        c.receive_data(bytes(replies[:1]))  # byte by byte: the worst framing
        del replies[:1]
        event = c.next_event()
        if isinstance(event, LateReplyReceived):
            assert event.response is not None
            assert event.response.raw["data"]["token"] == event.context  # never misrouted
            late.append(event.context)
    return late


@pytest.mark.parametrize("given_up_at", ["before", "mid", "written", "partly-read"])
def test_exhaustive_abandon_points_never_misdeliver(given_up_at: str) -> None:
    """Every cut point of a request line and of its reply: each reply reaches its owner."""
    line_len = len(proto.encode_request(echo_req(0)))
    reply_len = len(echo(0))
    cuts = {"before": [0], "mid": range(1, line_len), "written": [line_len],
            "partly-read": range(1, reply_len)}[given_up_at]
    for cut in cuts:
        c, worker, replies = greeted(), _Worker(), bytearray()
        c.send(echo_req(0), context=0)
        if given_up_at == "partly-read":
            replies += _write(c, worker)
            c.receive_data(bytes(replies[:cut]))
            del replies[:cut]
            assert c.next_event() is NEED_DATA
        else:
            replies += _write(c, worker, cut)
        owed = c.abandon()
        assert owed == (given_up_at != "before")
        late = _settle(c, worker, replies)
        c.send(echo_req(1), context=1)
        replies += _write(c, worker)
        c.receive_data(bytes(replies))
        event = c.next_event()
        assert isinstance(event, ResponseReceived) and event.context == 1
        assert event.response.raw["data"]["token"] == 1
        assert late == ([0] if owed else []) and worker.seen == ([0, 1] if owed else [1])


@given(st.lists(st.tuples(st.sampled_from(["answer", "abandon-early", "abandon-mid",
                                            "abandon-late"]), st.integers(1, 40)),
                max_size=25),
       st.integers(1, 9))
def test_any_sequence_of_abandons_accounts_for_every_request(
    plan: list[tuple[str, int]], chunk: int
) -> None:
    c, worker, replies = greeted(), _Worker(), bytearray()
    answered: list[int] = []
    late: list[int] = []
    for token, (what, cut) in enumerate(plan):
        late += _settle(c, worker, replies)
        c.send(echo_req(token), context=token)
        if what == "abandon-early":
            assert not c.abandon()
            continue
        if what == "abandon-mid":
            replies += _write(c, worker, min(cut, len(c.data_to_send()) - 1))
            assert c.abandon()
            continue
        replies += _write(c, worker)
        if what == "abandon-late":
            assert c.abandon()
            continue
        while True:
            c.receive_data(bytes(replies[:chunk]))
            del replies[:chunk]
            event = c.next_event()
            if event is not NEED_DATA:
                break
        assert isinstance(event, ResponseReceived) and event.context == token
        assert event.response.raw["data"]["token"] == token
        answered.append(token)
    late += _settle(c, worker, replies)
    assert sorted(answered + late) == sorted(worker.seen)
    assert len(set(answered + late)) == len(answered + late)


# ------------------------------------------------------------ unsolicited, EOF, limits

def test_line_while_idle_is_unsolicited_then_sticky() -> None:
    c = greeted()
    c.receive_data(b'{"ok":true}\n')
    with pytest.raises(UnsolicitedResponse, match="nobody asked for"):
        c.next_event()
    assert c.state is State.BROKEN
    with pytest.raises(ConnectionBroken):
        c.send(proto.Status())


def test_partial_bytes_while_idle_are_unsolicited_at_the_next_send() -> None:
    c = greeted()
    c.receive_data(b'{"ok"')
    assert c.next_event() is NEED_DATA
    with pytest.raises(UnsolicitedResponse):
        c.send(proto.Status())
    assert c.state is State.BROKEN


def test_reply_before_the_request_was_fully_written_is_unsolicited() -> None:
    c = in_state(State.SENDING)
    c.receive_data(STATUS_OK)
    with pytest.raises(UnsolicitedResponse):
        c.next_event()


def test_two_replies_at_once_the_second_is_unsolicited() -> None:
    c = in_state(State.AWAITING)
    c.receive_data(STATUS_OK + STATUS_OK)
    assert isinstance(c.next_event(), ResponseReceived)
    with pytest.raises(UnsolicitedResponse):
        c.next_event()


def test_eof_while_idle_ends_cleanly() -> None:
    c = greeted()
    c.receive_data(b"")
    assert isinstance(c.next_event(), ConnectionEnded) and c.state is State.CLOSED
    with pytest.raises(ConnectionClosed):
        c.send(proto.Status())


def test_eof_seen_only_at_the_next_send_is_a_closed_connection() -> None:
    c = greeted()
    c.receive_data(b"")
    with pytest.raises(ConnectionClosed):
        c.send(proto.Status())
    assert c.state is State.CLOSED


@pytest.mark.parametrize("state", [State.SENDING, State.AWAITING])
def test_eof_mid_exchange_breaks_and_keeps_the_partial_line(state: State) -> None:
    c = in_state(state)
    c.receive_data(b'{"ok":tr')
    c.receive_data(b"")
    with pytest.raises(ConnectionClosed) as info:
        c.next_event()
    assert info.value.partial == b'{"ok":tr' and c.state is State.BROKEN
    with pytest.raises(ConnectionBroken):
        c.next_event()


def test_reply_then_eof_delivers_the_reply_first() -> None:
    c = in_state(State.AWAITING)
    c.receive_data(STATUS_OK)
    c.receive_data(b"")
    assert isinstance(c.next_event(), ResponseReceived)
    assert isinstance(c.next_event(), ConnectionEnded)


def test_over_long_line_breaks_the_connection() -> None:
    c = ClientConnection(max_line_bytes=64)
    c.send(proto.Handshake(V))
    write_all(c)
    c.receive_data(b"x" * 65)
    with pytest.raises(ResponseTooLarge, match="max_line_bytes=64"):
        c.next_event()
    assert c.state is State.BROKEN


def test_io_failure_reported_by_the_io_layer_is_sticky() -> None:
    c = in_state(State.AWAITING)
    broken = c.fail("KeyboardInterrupt while reading")
    assert c.state is State.BROKEN and broken.reason == "KeyboardInterrupt while reading"
    assert c.in_flight is None
    with pytest.raises(ConnectionBroken, match="KeyboardInterrupt"):
        c.send(proto.Status())


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=5), st.integers(1, 50))
def test_any_chunking_of_replies_gives_the_same_events(tokens: list[int], chunk: int) -> None:
    c = greeted()
    for token in tokens:
        c.send(echo_req(token), context=token)
        write_all(c)
        data = echo(token)
        event: Any = NEED_DATA
        for i in range(0, len(data), chunk):
            assert event is NEED_DATA
            c.receive_data(data[i : i + chunk])
            event = c.next_event()
        assert isinstance(event, ResponseReceived) and event.context == token
