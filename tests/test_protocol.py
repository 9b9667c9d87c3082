"""The sans-I/O protocol: encoding, strict decoding, framing, the handshake check."""

from __future__ import annotations

import ast
import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool_notebook import protocol as proto
from pool_notebook.errors import (
    HandshakeError,
    InvalidArgument,
    MalformedRequest,
    ResponseEncodeError,
    ResponseParseError,
    ResponseTooLarge,
    UnsolicitedResponse,
    VersionMismatch,
)


@pytest.mark.parametrize("module", sorted(Path(proto.__file__).parent.glob("*.py")),
                         ids=lambda p: p.name)
def test_io_free(module: Path) -> None:
    tree = ast.parse(module.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert not imported & {"asyncio", "socket", "IPython", "selectors", "os", "threading"}


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (proto.Handshake("0.31.0"), {"op": "handshake", "version": "0.31.0"}),
        (proto.Run("return 1"), {"op": "run", "code": "return 1", "ctx": None, "lib_paths": []}),
        (
            proto.Run("return ctx.x", {"x": 1}, ("/a",)),
            {"op": "run", "code": "return ctx.x", "ctx": {"x": 1}, "lib_paths": ["/a"]},
        ),
        (
            proto.Continue("abc", "yes", "q1", {"input_tokens": 3}),
            {"op": "continue", "sid": "abc", "response": "yes", "query_id": "q1",
             "usage": {"input_tokens": 3}},
        ),
        (proto.Continue("abc", "yes"),
         {"op": "continue", "sid": "abc", "response": "yes", "query_id": None, "usage": None}),
        (proto.Status(), {"op": "status"}),
        (proto.Status(include_history=True), {"op": "status", "include_history": True}),
        (proto.Shutdown(), {"op": "shutdown"}),
        (proto.RawRequest({"op": "custom", "x": [1]}), {"op": "custom", "x": [1]}),
    ],
)
def test_requests_encode_to_one_line(request_: proto.Request, expected: dict) -> None:
    line = proto.encode_request(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == expected
    assert request_.op == expected["op"]


@given(st.text(), st.text())
def test_newlines_in_strings_never_split_the_line(code: str, answer: str) -> None:
    for req in (proto.Run(code), proto.Continue("s", answer)):
        line = proto.encode_request(req)
        assert line.count(b"\n") == 1
        assert proto.decode_request(line) == req or req.op == "run"


def test_unencodable_request_is_typed() -> None:
    with pytest.raises(MalformedRequest):
        proto.encode_request(proto.RawRequest({"op": "x", "v": float("nan")}))
    with pytest.raises(MalformedRequest):
        proto.encode_request(proto.Run("x", ctx={"f": object()}))


def test_decode_request_round_trip_and_errors() -> None:
    for req in (proto.Handshake("1"), proto.Run("c", [1], ("p",)), proto.Status(True),
                proto.Shutdown(), proto.Continue("s", "r", None, None)):
        assert proto.decode_request(proto.encode_request(req)) == req
    for bad in (b"nope\n", b"[]\n", b'{"op":"fly"}\n', b"{}\n", b'{"op":"run"}\n',
                b'{"op":"run","code":"x","lib_paths":[1]}\n'):
        with pytest.raises(MalformedRequest):
            proto.decode_request(bad)


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_decode_every_kind_and_feed_result() -> None:
    hs = proto.decode_response(_line({"ok": True, "data": {"kind": "handshake",
                                                           "version": "0.31.0"}, "error": None}))
    assert isinstance(hs.data, proto.HandshakeData) and hs.data.version == "0.31.0"
    st_ = proto.decode_response(_line({"ok": True, "data": {
        "kind": "status", "has_session": True, "session_id": "s-1",
        "conversation_history": [1]}, "error": None}))
    assert isinstance(st_.data, proto.StatusData)
    assert st_.data.session_id == "s-1" and st_.data.extra == {"conversation_history": [1]}
    sd = proto.decode_response(_line({"ok": True, "data": {"kind": "shutdown"}}))
    assert isinstance(sd.data, proto.ShutdownData)

    def feed(fr: object) -> proto.FeedResult:
        r = proto.decode_response(_line({"ok": True, "data": {
            "kind": "feed", "session_id": "s", "feed_result": fr}, "error": None}))
        assert r.feed is not None
        return r.feed

    paused = feed({"Paused": {"queries": [
        {"id": "q-0", "prompt": "p", "system": "s", "max_tokens": 5, "grounded": True,
         "novel": 1},
        {"id": "q-1", "prompt": "p2", "underspecified": True}]}})
    assert isinstance(paused, proto.Paused) and len(paused.queries) == 2
    assert paused.queries[0].grounded and paused.queries[0].extra == {"novel": 1}
    assert paused.queries[1].underspecified and paused.queries[1].max_tokens is None
    assert feed({"Accepted": {"remaining": 2}}) == proto.Accepted(2)
    done = feed({"Finished": {"state": {"Completed": {"result": {"a": [1]}}},
                              "metrics": {"t": 1}}})
    assert isinstance(done, proto.Finished) and done.outcome == proto.Completed({"a": [1]})
    assert done.state == "completed" and done.metrics == {"t": 1}
    failed = feed({"Finished": {"state": {"Failed": {"error": "boom"}}, "metrics": {}}})
    assert isinstance(failed, proto.Finished) and failed.outcome == proto.Failed("boom")
    cancelled = feed({"Finished": {"state": "Cancelled", "metrics": {}}})
    assert isinstance(cancelled, proto.Finished) and cancelled.state == "cancelled"


def test_unknown_kind_and_extra_keys_are_kept() -> None:
    r = proto.decode_response(_line({"ok": True, "data": {"kind": "fancy", "x": 1},
                                     "error": None, "trace": "t"}))
    assert isinstance(r.data, proto.UnknownData)
    assert r.data.kind == "fancy" and r.data.raw["x"] == 1 and r.raw["trace"] == "t"
    absent = proto.decode_response(b'{"ok":false,"error":"nope"}\n')
    assert absent.ok is False and absent.data is None and absent.error == "nope"


@pytest.mark.parametrize(
    "line",
    [
        b"\xef\xbb\xbf" + _line({"ok": True}),  # BOM
        b'{"ok":true,"error":"\xff"}\n',  # invalid UTF-8
        b'{"ok":true,"error":"\xed\xa0\x80"}\n',  # UTF-8 encoded surrogate
        '{"ok":true}'.encode("utf-16"),  # no UTF-16 guessing
        b'{"ok":true,"data":{"kind":"x","v":NaN}}\n',
        b'{"ok":true,"data":{"kind":"x","v":-Infinity}}\n',
        b'{"ok":true,"data":{"kind":"x","v":' + b"9" * 100 + b"}}\n",
        b'{"ok":true,"data":{"kind":"x","v":' + b"[" * 200 + b"]" * 200 + b"}}\n",
        b'{"ok":true,"data":{"kind":"x","v":' + b"[" * 100000 + b"]" * 100000 + b"}}\n",
        b'{"ok":true,"error":"\\ud800"}\n',  # lone surrogate escape
        b'{"ok":"yes"}\n',
        b"[1,2]\n",
        b"",
        b"\n",
        b'{"ok":true} trailing\n',
        b'{"ok":true,"data":{"kind":"feed","session_id":"s","feed_result":{"Nope":{}}}}\n',
        b'{"ok":true,"data":{"kind":"handshake"}}\n',
        b'{"ok":true,"data":[1]}\n',
    ],
)
def test_malformed_responses_are_typed_parse_errors(line: bytes) -> None:
    with pytest.raises(ResponseParseError) as info:
        proto.decode_response(line)
    assert info.value.data == line.rstrip(b"\n")[:200]
    assert "malformed response" in str(info.value)


def test_valid_surrogate_pair_escape_is_fine() -> None:
    r = proto.decode_response(b'{"ok":false,"error":"\\ud83d\\ude00"}\n')
    assert r.error == "\U0001f600"


@given(st.binary(max_size=300))
def test_decoder_never_raises_anything_but_parse_error(data: bytes) -> None:
    with contextlib.suppress(ResponseParseError):
        proto.decode_response(data)


def test_line_buffer_frames_and_bounds() -> None:
    buf = proto.LineBuffer(max_line_bytes=16)
    buf.feed(b'{"a":1}\n{"b"')
    assert buf.next_line() == b'{"a":1}\n'
    assert buf.next_line() is None and buf.pending == b'{"b"'
    buf.feed(b":2}\n")
    assert list(buf.lines()) == [b'{"b":2}\n']
    buf.feed(b"x" * 17)
    with pytest.raises(ResponseTooLarge):
        buf.next_line()
    buf2 = proto.LineBuffer(max_line_bytes=4)
    buf2.feed(b"abcdef\n")
    with pytest.raises(ResponseTooLarge):
        buf2.next_line()


@given(st.lists(st.binary(min_size=0, max_size=20).filter(lambda b: b"\n" not in b), max_size=8),
       st.integers(min_value=1, max_value=7))
def test_line_buffer_any_chunking(lines: list[bytes], chunk: int) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    buf = proto.LineBuffer()
    out: list[bytes] = []
    for i in range(0, len(stream), chunk):
        buf.feed(stream[i : i + chunk])
        out.extend(buf.lines())
    assert out == [line + b"\n" for line in lines] and len(buf) == 0


def test_handshake_check() -> None:
    good = proto.decode_response(_line({"ok": True, "data": {"kind": "handshake",
                                                             "version": "1.0"}}))
    assert proto.check_handshake(good, "1.0").version == "1.0"
    with pytest.raises(VersionMismatch) as info:
        proto.check_handshake(good, "2.0")
    assert (info.value.client, info.value.server) == ("2.0", "1.0")
    assert "version='1.0'" in str(info.value)
    rejected = proto.decode_response(
        _line({"ok": False, "error": "version mismatch: client=0.30.0, server=0.31.0"}))
    with pytest.raises(VersionMismatch) as info:
        proto.check_handshake(rejected, "0.30.0")
    assert (info.value.client, info.value.server) == ("0.30.0", "0.31.0")
    other = proto.decode_response(_line({"ok": False, "error": "go away"}))
    with pytest.raises(HandshakeError, match="go away"):
        proto.check_handshake(other, "1")
    wrong_kind = proto.decode_response(_line({"ok": True, "data": {"kind": "status"}}))
    with pytest.raises(HandshakeError, match="kind='status'"):
        proto.check_handshake(wrong_kind, "1")


# ------------------------------------------------------------ typed responses, both ways
# The expected lines are algocline's serde output, written out by hand from its source:
# PoolResponse/PoolResponseData (crates/algocline-app/src/pool/protocol.rs: Option -> null,
# tag "kind", snake_case), FeedResult (crates/algocline-engine/src/session.rs: externally
# tagged), TerminalState (crates/algocline-core/src/state.rs: "Cancelled" is a bare unit
# variant), LlmQuery (crates/algocline-core/src/query.rs: system Option -> null, max_tokens
# u32, grounded/underspecified skip_serializing_if false).
ALGOCLINE_LINES = [
    (proto.HandshakeData("0.31.0"),
     b'{"ok":true,"data":{"kind":"handshake","version":"0.31.0"},"error":null}\n'),
    (proto.StatusData(False),
     b'{"ok":true,"data":{"kind":"status","has_session":false,"session_id":null},"error":null}\n'),
    (proto.StatusData(True, "s-1"),
     b'{"ok":true,"data":{"kind":"status","has_session":true,"session_id":"s-1"},"error":null}\n'),
    (proto.ShutdownData(), b'{"ok":true,"data":{"kind":"shutdown"},"error":null}\n'),
    (proto.FeedData("s-1", proto.Paused((proto.Query("q-0", "hi?", None, 1024),))),
     b'{"ok":true,"data":{"kind":"feed","session_id":"s-1","feed_result":{"Paused":{"queries":'
     b'[{"id":"q-0","prompt":"hi?","system":null,"max_tokens":1024}]}}},"error":null}\n'),
    (proto.FeedData("s-1", proto.Paused((
        proto.Query("q-0", "a", "sys", 5, grounded=True),
        proto.Query("q-1", "b", None, 7, underspecified=True)))),
     b'{"ok":true,"data":{"kind":"feed","session_id":"s-1","feed_result":{"Paused":{"queries":'
     b'[{"id":"q-0","prompt":"a","system":"sys","max_tokens":5,"grounded":true},'
     b'{"id":"q-1","prompt":"b","system":null,"max_tokens":7,"underspecified":true}]}}},'
     b'"error":null}\n'),
    (proto.FeedData("s-1", proto.Accepted(1)),
     b'{"ok":true,"data":{"kind":"feed","session_id":"s-1","feed_result":'
     b'{"Accepted":{"remaining":1}}},"error":null}\n'),
    (proto.FeedData("s-1", proto.Finished(proto.Completed({"x": [1, None]}), {"auto": {}})),
     b'{"ok":true,"data":{"kind":"feed","session_id":"s-1","feed_result":{"Finished":'
     b'{"state":{"Completed":{"result":{"x":[1,null]}}},"metrics":{"auto":{}}}}},"error":null}\n'),
    (proto.FeedData("s-1", proto.Finished(proto.Failed("boom"))),
     b'{"ok":true,"data":{"kind":"feed","session_id":"s-1","feed_result":{"Finished":'
     b'{"state":{"Failed":{"error":"boom"}},"metrics":{}}}},"error":null}\n'),
    (proto.FeedData("s-1", proto.Finished(proto.Cancelled())),
     b'{"ok":true,"data":{"kind":"feed","session_id":"s-1","feed_result":{"Finished":'
     b'{"state":"Cancelled","metrics":{}}}},"error":null}\n'),
]


@pytest.mark.parametrize(("data", "line"), ALGOCLINE_LINES, ids=lambda v: type(v).__name__)
def test_responses_encode_exactly_as_algocline_and_decode_back(
    data: proto.ResponseData, line: bytes
) -> None:
    assert proto.encode_response(data) == line
    decoded = proto.decode_response(line)
    assert decoded.ok and decoded.error is None and decoded.data == data


def test_extra_keys_follow_and_never_shadow_the_wire_keys() -> None:
    data = proto.StatusData(True, "s-1", {"has_session": "no", "conversation_history": []})
    obj = json.loads(proto.encode_response(data))["data"]
    assert list(obj) == ["kind", "has_session", "session_id", "conversation_history"]
    assert obj["has_session"] is True
    query = proto.Query("q-0", "p", None, 1, extra={"id": "evil", "hint": 1})
    assert query.to_json() == {"id": "q-0", "prompt": "p", "system": None, "max_tokens": 1,
                               "hint": 1}
    unknown = proto.UnknownData("fancy", {"kind": "fancy", "x": 1})
    assert proto.decode_response(proto.encode_response(unknown)).data == unknown


def test_error_line_and_unencodable_reply() -> None:
    line = proto.error_response("version mismatch: client=1, server=2")
    assert line == b'{"ok":false,"data":null,"error":"version mismatch: client=1, server=2"}\n'
    with pytest.raises(VersionMismatch):
        proto.check_handshake(proto.decode_response(line), "1")
    with pytest.raises(ResponseEncodeError, match="cannot encode"):
        proto.encode_response(proto.FeedData("s", proto.Finished(proto.Completed(float("nan")))))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
queries = st.builds(proto.Query, st.text(), st.text(), st.none() | st.text(),
                    st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
feed_results = (
    st.builds(lambda qs: proto.Paused(tuple(qs)), st.lists(queries, max_size=3))
    | st.builds(proto.Accepted, st.integers(0, 100))
    | st.builds(proto.Finished,
                st.builds(proto.Completed, json_values) | st.builds(proto.Failed, st.text())
                | st.just(proto.Cancelled()),
                st.dictionaries(st.text(), json_values, max_size=3))
)


@given(st.text(), feed_results)
def test_any_feed_round_trips(session_id: str, result: proto.FeedResult) -> None:
    data = proto.FeedData(session_id, result)
    assert proto.decode_response(proto.encode_response(data)).data == data


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -1}, {"prompt_tokens": 2**53 + 1}, {"prompt_tokens": 1.5},
    {"prompt_tokens": True}, {"prompt_tokens": "3"}, [1],
])
def test_usage_is_validated_both_ways(usage: object) -> None:
    with pytest.raises(MalformedRequest, match="usage"):
        proto.Continue("s", "r", None, usage)  # type: ignore[arg-type]
    line = _line({"op": "continue", "sid": "s", "response": "r", "query_id": None,
                  "usage": usage})
    with pytest.raises(MalformedRequest, match="usage"):
        proto.decode_request(line)


def test_usage_at_the_bounds_is_fine() -> None:
    usage = {"prompt_tokens": 0, "completion_tokens": 2**53, "other": None}
    req = proto.Continue("s", "r", "q-0", usage)
    assert proto.decode_request(proto.encode_request(req)) == req


def test_include_history_must_be_a_boolean() -> None:
    with pytest.raises(MalformedRequest, match="include_history"):
        proto.decode_request(b'{"op":"status","include_history":"no"}\n')


def test_line_buffer_limit_must_fit_a_newline() -> None:
    with pytest.raises(InvalidArgument, match="at least 2, got 1"):
        proto.LineBuffer(max_line_bytes=1)


def test_line_buffer_raises_the_error_its_owner_chose() -> None:
    buf = proto.LineBuffer(max_line_bytes=4, too_long=lambda limit, head: UnsolicitedResponse(head))
    buf.feed(b"abcdef")
    with pytest.raises(UnsolicitedResponse):
        buf.next_line()
