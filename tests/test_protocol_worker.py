"""The worker-role state machine, driven with plain bytes: every state and transition."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pool_notebook.protocol.messages import Run, Shutdown, Status, StatusData, encode_response
from pool_notebook.protocol.worker import (
    ConnectionClosing,
    NeedData,
    RequestReceived,
    WorkerConnection,
    WorkerState,
    WorkerStateError,
)

V = "9.9.9"
HELLO = b'{"op":"handshake","version":"9.9.9"}\n'
STATUS_REPLY = encode_response(StatusData(False))


def replies(conn: WorkerConnection) -> list[dict[str, Any]]:
    data = conn.data_to_send()
    return [json.loads(line) for line in data.splitlines()]


def greeted(max_line_bytes: int = 1024) -> WorkerConnection:
    conn = WorkerConnection(V, max_line_bytes=max_line_bytes)
    conn.receive_data(HELLO)
    assert isinstance(conn.next_event(), NeedData)
    assert replies(conn) == [{"ok": True, "data": {"kind": "handshake", "version": V},
                              "error": None}]
    assert conn.state is WorkerState.READY
    return conn


def test_starts_awaiting_handshake_and_needs_data() -> None:
    conn = WorkerConnection(V)
    assert conn.state is WorkerState.AWAIT_HANDSHAKE
    assert isinstance(conn.next_event(), NeedData)
    assert conn.data_to_send() == b""
    assert conn.wants_read


def test_await_handshake_to_ready_on_matching_version() -> None:
    greeted()


def test_version_mismatch_answers_and_stays_open_for_another_handshake() -> None:
    conn = WorkerConnection(V)
    conn.receive_data(b'{"op":"handshake","version":"0.1"}\n')
    assert isinstance(conn.next_event(), NeedData)
    assert replies(conn) == [{"ok": False, "data": None,
                              "error": "version mismatch: client=0.1, server=9.9.9"}]
    assert conn.state is WorkerState.AWAIT_HANDSHAKE
    assert conn.wants_read
    conn.receive_data(HELLO)
    conn.next_event()
    assert replies(conn)[0]["ok"] is True
    assert conn.state is WorkerState.READY


def test_request_before_handshake_is_refused_and_not_handed_out() -> None:
    conn = WorkerConnection(V)
    conn.receive_data(b'{"op":"status"}\n{"op":"run","code":"return 1"}\n')
    assert isinstance(conn.next_event(), NeedData)
    out = replies(conn)
    assert [r["ok"] for r in out] == [False, False]
    assert "expected a handshake first (got op 'status')" in out[0]["error"]
    assert "expected a handshake first (got op 'run')" in out[1]["error"]
    assert conn.state is WorkerState.AWAIT_HANDSHAKE


def test_malformed_line_in_any_state_is_answered_and_skipped() -> None:
    conn = WorkerConnection(V)
    conn.receive_data(b"{not json\n" + HELLO + b'{"op":"fly"}\n{"op":"status"}\n')
    event = conn.next_event()
    assert event == RequestReceived(Status())
    out = replies(conn)
    assert out[0]["error"].startswith("malformed request: invalid JSON")
    assert out[1]["ok"] is True  # the handshake
    assert out[2]["error"] == "malformed request: unknown op 'fly'"


def test_ready_to_busy_and_back_with_replies_in_order() -> None:
    conn = greeted()
    conn.receive_data(b'{"op":"run","code":"return 1"}\n{"op":"status"}\n')
    event = conn.next_event()
    assert event == RequestReceived(Run("return 1"))
    assert conn.state is WorkerState.BUSY
    # while busy, the queued status is not handed out
    assert isinstance(conn.next_event(), NeedData)
    conn.send_reply(b'{"first":1}\n')
    assert conn.state is WorkerState.READY
    assert conn.next_event() == RequestReceived(Status())
    conn.send_reply(STATUS_REPLY)
    assert conn.data_to_send() == b'{"first":1}\n' + STATUS_REPLY


def test_send_reply_without_a_request_is_a_caller_bug() -> None:
    conn = greeted()
    with pytest.raises(WorkerStateError):
        conn.send_reply(STATUS_REPLY)


def test_second_handshake_is_answered_again_and_stays_ready() -> None:
    conn = greeted()
    conn.receive_data(b'{"op":"handshake","version":"0.2"}\n' + HELLO)
    conn.next_event()
    out = replies(conn)
    assert out[0]["error"] == "version mismatch: client=0.2, server=9.9.9"
    assert out[1]["data"] == {"kind": "handshake", "version": V}
    assert conn.state is WorkerState.READY


def test_bytes_split_anywhere_make_the_same_requests() -> None:
    conn = WorkerConnection(V)
    stream = HELLO + b'{"op":"status"}\n'
    for i in range(len(stream)):
        conn.receive_data(stream[i:i + 1])
    assert conn.next_event() == RequestReceived(Status())


def test_shutdown_queued_behind_a_busy_request_is_visible_at_once() -> None:
    conn = greeted()
    conn.receive_data(b'{"op":"run","code":"while true do end"}\n')
    conn.next_event()
    assert not conn.shutdown_requested
    conn.receive_data(b'{"op":"shutdown"}\n')
    assert conn.shutdown_requested
    assert isinstance(conn.next_event(), NeedData)  # still one at a time
    conn.send_reply(b'{"run":1}\n')
    assert conn.next_event() == RequestReceived(Shutdown())
    conn.send_reply(b'{"bye":1}\n')
    conn.close_after_reply("shutdown requested")
    assert conn.state is WorkerState.CLOSING
    assert conn.next_event() == ConnectionClosing("shutdown requested")
    assert conn.data_to_send() == b'{"run":1}\n{"bye":1}\n'
    assert not conn.wants_read


def test_close_while_a_reply_is_owed_is_a_caller_bug() -> None:
    conn = greeted()
    conn.receive_data(b'{"op":"status"}\n')
    conn.next_event()
    with pytest.raises(WorkerStateError):
        conn.close_after_reply("x")


def test_over_long_line_is_answered_after_owed_replies_then_closes() -> None:
    conn = greeted(max_line_bytes=64)
    conn.receive_data(b'{"op":"run","code":"return 1"}\n')
    conn.next_event()  # busy: the run is being served
    conn.receive_data(b"x" * 65)  # no newline, over the bound, while busy
    assert not conn.wants_read
    conn.receive_data(b"more" * 100)  # ignored: input is over
    assert isinstance(conn.next_event(), NeedData)
    conn.send_reply(b'{"run":1}\n')
    assert isinstance(conn.next_event(), ConnectionClosing)
    out = conn.data_to_send().splitlines()
    assert out[0] == b'{"run":1}'
    error = json.loads(out[1])["error"]
    assert error.startswith("malformed request: request line longer than 64 bytes")
    assert conn.state is WorkerState.CLOSING


def test_complete_over_long_line_is_refused_too() -> None:
    conn = greeted(max_line_bytes=64)
    conn.receive_data(b'{"op":"status","pad":"' + b"p" * 80 + b'"}\n')
    assert isinstance(conn.next_event(), ConnectionClosing)
    assert "request line longer than 64 bytes" in replies(conn)[0]["error"]


def test_backpressure_stops_reading_once_a_line_worth_is_queued() -> None:
    conn = greeted(max_line_bytes=64)
    conn.receive_data(b'{"op":"run","code":"return 1"}\n')
    conn.next_event()
    status = b'{"op":"status"}\n'  # 16 bytes
    conn.receive_data(status * 3)
    assert conn.wants_read  # 48 < 64
    conn.receive_data(status)
    assert not conn.wants_read  # 64 queued: the I/O layer must pause reading
    conn.send_reply(b"{}\n")
    assert conn.next_event() == RequestReceived(Status())
    assert conn.wants_read  # a request left the queue


def test_connection_lost_closes_and_drops_everything() -> None:
    conn = greeted()
    conn.receive_data(b'{"op":"status"}\n{"op":"status"}\n')
    conn.connection_lost()
    assert conn.state is WorkerState.CLOSED
    assert isinstance(conn.next_event(), NeedData)
    assert conn.data_to_send() == b""
    assert not conn.wants_read
    conn.receive_data(HELLO)  # ignored
    assert isinstance(conn.next_event(), NeedData)


def test_close_when_idle_goes_closing_immediately() -> None:
    conn = greeted()
    conn.close_after_reply("handshake timeout")
    assert conn.next_event() == ConnectionClosing("handshake timeout")
    conn.close_after_reply("again")  # idempotent enough: still closing
    assert conn.state is WorkerState.CLOSING


def test_an_incomplete_line_keeps_reading_until_it_completes_or_overflows() -> None:
    conn = greeted(max_line_bytes=64)
    conn.receive_data(b'{"op":"run","code":"return 1"}\n{"op":"status"}\n')
    conn.next_event()  # busy; one 16-byte status queued behind it
    conn.receive_data(b'{"op":"status","pad":"' + b"p" * 38)  # 60 bytes, no newline yet
    assert conn.wants_read  # 16 + 60 > 64, yet it must read on or the line never ends
    conn.receive_data(b'"}\n')
    conn.send_reply(b"{}\n")
    assert conn.next_event() == RequestReceived(Status())
    conn.send_reply(STATUS_REPLY)
    assert conn.next_event() == RequestReceived(Status())


# Every (state, input) pair: the event handed out, the state after, and the reply's gist.
_BAD_HELLO = b'{"op":"handshake","version":"0.0.0"}\n'
_STATUS = b'{"op":"status"}\n'
_JUNK = b"junk\n"
_LONG = b"x" * 80  # over max_line_bytes=64, no newline
_INPUTS = {"hello": HELLO, "bad hello": _BAD_HELLO, "status": _STATUS, "junk": _JUNK,
           "too long": _LONG}
_TABLE = {
    # state: {input: (event type, state after, ok of the reply or None for none)}
    WorkerState.AWAIT_HANDSHAKE: {
        "hello": (NeedData, WorkerState.READY, True),
        "bad hello": (NeedData, WorkerState.AWAIT_HANDSHAKE, False),
        "status": (NeedData, WorkerState.AWAIT_HANDSHAKE, False),
        "junk": (NeedData, WorkerState.AWAIT_HANDSHAKE, False),
        "too long": (ConnectionClosing, WorkerState.CLOSING, False),
    },
    WorkerState.READY: {
        "hello": (NeedData, WorkerState.READY, True),
        "bad hello": (NeedData, WorkerState.READY, False),
        "status": (RequestReceived, WorkerState.BUSY, None),
        "junk": (NeedData, WorkerState.READY, False),
        "too long": (ConnectionClosing, WorkerState.CLOSING, False),
    },
    WorkerState.BUSY: {  # nothing is looked at until the owed reply is given
        "hello": (NeedData, WorkerState.BUSY, None),
        "bad hello": (NeedData, WorkerState.BUSY, None),
        "status": (NeedData, WorkerState.BUSY, None),
        "junk": (NeedData, WorkerState.BUSY, None),
        "too long": (NeedData, WorkerState.BUSY, None),
    },
    WorkerState.CLOSING: {name: (ConnectionClosing, WorkerState.CLOSING, None)
                          for name in _INPUTS},
    WorkerState.CLOSED: {name: (NeedData, WorkerState.CLOSED, None) for name in _INPUTS},
}


def _in_state(state: WorkerState) -> WorkerConnection:
    conn = WorkerConnection(V, max_line_bytes=64)
    if state is not WorkerState.AWAIT_HANDSHAKE:
        conn.receive_data(HELLO)
        conn.next_event()
    if state is WorkerState.BUSY:
        conn.receive_data(_STATUS)
        conn.next_event()
    elif state is WorkerState.CLOSING:
        conn.close_after_reply("test")
    elif state is WorkerState.CLOSED:
        conn.connection_lost()
    conn.data_to_send()
    assert conn.state is state
    return conn


@pytest.mark.parametrize("state", list(WorkerState))
@pytest.mark.parametrize("name", list(_INPUTS))
def test_every_state_and_input(state: WorkerState, name: str) -> None:
    event_type, after, ok = _TABLE[state][name]
    conn = _in_state(state)
    conn.receive_data(_INPUTS[name])
    assert isinstance(conn.next_event(), event_type)
    assert conn.state is after
    out = replies(conn)
    assert [r["ok"] for r in out] == ([] if ok is None else [ok])
