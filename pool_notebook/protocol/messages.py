"""The pool-worker messages, sans I/O: typed requests and responses, both ways.

Both ends use the same classes: the client encodes requests and decodes
responses, the bundled worker decodes requests and encodes responses with
:func:`encode_response`, so the two cannot drift. The shapes are algocline's
(``crates/algocline-app/src/pool/protocol.rs``, ``algocline-engine``'s
``FeedResult``, ``algocline-core``'s ``LlmQuery``/``TerminalState``, all serde):
an ``Option`` is sent as ``null``, never left out, unless serde skips it
(``grounded``/``underspecified`` appear only when true).

Wire facts: one UTF-8 JSON object per ``\\n``-terminated line (framing and
strict JSON live in :mod:`.framing`); strictly one request then one response;
responses are ``{"ok": bool, "data": {"kind": ...} | null, "error": str | null}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    HandshakeError,
    MalformedRequest,
    ResponseEncodeError,
    ResponseParseError,
    VersionMismatch,
)
from .framing import dumps_line, loads_strict

__all__ = [
    "MAX_USAGE_TOKENS",
    "Accepted",
    "Cancelled",
    "Completed",
    "Continue",
    "Failed",
    "FeedData",
    "FeedResult",
    "Finished",
    "Handshake",
    "HandshakeData",
    "Outcome",
    "Paused",
    "Query",
    "RawRequest",
    "Request",
    "Response",
    "ResponseData",
    "Run",
    "Shutdown",
    "ShutdownData",
    "Status",
    "StatusData",
    "UnknownData",
    "check_handshake",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "error_response",
    "query_from_json",
    "version_mismatch_message",
]

_VERSION_MISMATCH = re.compile(r"version mismatch: client=(\S+?),\s*server=(\S+)")
#: Largest token count accepted in ``usage`` (the JSON-safe integer range).
MAX_USAGE_TOKENS = 2**53


# ----------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Handshake:
    """First message of every connection: our protocol version."""

    version: str
    op = "handshake"

    def to_json(self) -> dict[str, Any]:
        return {"op": "handshake", "version": self.version}


@dataclass(frozen=True, slots=True)
class Run:
    """Start a Lua session: source, optional JSON context (``ctx``), library paths."""

    code: str
    ctx: Any = None
    lib_paths: Sequence[str] = ()
    op = "run"

    def to_json(self) -> dict[str, Any]:
        return {"op": "run", "code": self.code, "ctx": self.ctx, "lib_paths": list(self.lib_paths)}


@dataclass(frozen=True, slots=True)
class Continue:
    """Answer one pending query of a paused session (``query_id`` None = the only one)."""

    sid: str
    response: str
    query_id: str | None = None
    usage: Mapping[str, Any] | None = None
    op = "continue"

    def __post_init__(self) -> None:
        if self.usage is not None:
            _check_usage(self.usage)

    def to_json(self) -> dict[str, Any]:
        return {
            "op": "continue",
            "sid": self.sid,
            "response": self.response,
            "query_id": self.query_id,
            "usage": dict(self.usage) if self.usage is not None else None,
        }


@dataclass(frozen=True, slots=True)
class Status:
    """Ask for the session state; ``include_history`` asks newer workers for the transcript."""

    include_history: bool = False
    op = "status"

    def to_json(self) -> dict[str, Any]:
        return {"op": "status", "include_history": True} if self.include_history else {
            "op": "status"
        }


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Ask the worker to reply and exit."""

    op = "shutdown"

    def to_json(self) -> dict[str, Any]:
        return {"op": "shutdown"}


@dataclass(frozen=True, slots=True)
class RawRequest:
    """Escape hatch: any JSON object, sent as is (its ``op`` key names it)."""

    obj: Mapping[str, Any]

    @property
    def op(self) -> str:
        op = self.obj.get("op")
        return op if isinstance(op, str) else "raw"

    def to_json(self) -> dict[str, Any]:
        return dict(self.obj)


Request = Handshake | Run | Continue | Status | Shutdown | RawRequest


def _check_usage(usage: Any) -> None:
    """Token counts are non-negative integers a JSON double can hold (or null)."""
    if not isinstance(usage, Mapping):
        raise MalformedRequest("'usage' must be an object or null")
    for key, value in usage.items():
        if value is None:
            continue
        if type(value) is not int or not 0 <= value <= MAX_USAGE_TOKENS:
            raise MalformedRequest(
                f"'usage.{key}' must be an integer in 0..2**53 or null, got {value!r}"
            )

_STATUS_LINE = b'{"op":"status"}\n'


def encode_request(request: Request) -> bytes:
    """One ``\\n``-terminated UTF-8 JSON line for ``request``."""
    if type(request) is Status and not request.include_history:
        return _STATUS_LINE
    return dumps_line(request.to_json(), MalformedRequest)


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise MalformedRequest(f"{key!r} must be a string or null")


def _req_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise MalformedRequest(f"{key!r} must be a string")
    return value


def decode_request(line: bytes) -> Request:
    """Worker side: parse one request line, or raise ``MalformedRequest`` saying why."""
    try:
        obj = loads_strict(line.rstrip(b"\n"))
    except ValueError as exc:
        raise MalformedRequest(str(exc)) from exc
    if not isinstance(obj, dict):
        raise MalformedRequest("a request must be a JSON object")
    op = obj.get("op")
    if op == "handshake":
        return Handshake(_req_str(obj, "version"))
    if op == "run":
        paths = obj.get("lib_paths") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise MalformedRequest("'lib_paths' must be a list of strings")
        return Run(_req_str(obj, "code"), obj.get("ctx"), tuple(paths))
    if op == "continue":
        usage = obj.get("usage")
        return Continue(
            _req_str(obj, "sid"), _req_str(obj, "response"), _opt_str(obj, "query_id"), usage
        )
    if op == "status":
        history = obj.get("include_history", False)
        if not isinstance(history, bool):
            raise MalformedRequest("'include_history' must be a boolean")
        return Status(history)
    if op == "shutdown":
        return Shutdown()
    raise MalformedRequest(f"unknown op {op!r}" if op is not None else "missing 'op'")


# ---------------------------------------------------------------------- responses


def _with_extra(known: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``known`` keys first (in algocline's order), then extras that do not shadow them."""
    for key, value in extra.items():
        known.setdefault(key, value)
    return known


@dataclass(frozen=True, slots=True)
class Query:
    """One pending LLM query of a paused session (algocline's ``LlmQuery``)."""

    id: str
    prompt: str
    system: str | None = None
    max_tokens: int | None = None
    grounded: bool = False
    underspecified: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``system`` is always present (``null`` when none); the flags only when true."""
        obj: dict[str, Any] = {
            "id": self.id,
            "prompt": self.prompt,
            "system": self.system,
            "max_tokens": self.max_tokens,
        }
        if self.grounded:
            obj["grounded"] = True
        if self.underspecified:
            obj["underspecified"] = True
        return _with_extra(obj, self.extra)


@dataclass(frozen=True, slots=True)
class Paused:
    """The session waits for one ``continue`` per query."""

    queries: tuple[Query, ...]
    state = "paused"

    def to_json(self) -> dict[str, Any]:
        return {"Paused": {"queries": [q.to_json() for q in self.queries]}}


@dataclass(frozen=True, slots=True)
class Accepted:
    """A batch answer was stored; ``remaining`` queries still need one."""

    remaining: int
    state = "accepted"

    def to_json(self) -> dict[str, Any]:
        return {"Accepted": {"remaining": self.remaining}}


@dataclass(frozen=True, slots=True)
class Completed:
    """The Lua code returned ``result``."""

    result: Any
    state = "completed"

    def to_json(self) -> dict[str, Any]:
        return {"Completed": {"result": self.result}}


@dataclass(frozen=True, slots=True)
class Failed:
    """The Lua code raised ``error``."""

    error: str
    state = "failed"

    def to_json(self) -> dict[str, Any]:
        return {"Failed": {"error": self.error}}


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The session was cancelled."""

    state = "cancelled"

    def to_json(self) -> str:
        return "Cancelled"  # a serde unit variant is its bare name


Outcome = Completed | Failed | Cancelled


@dataclass(frozen=True, slots=True)
class Finished:
    """The session ended; ``outcome`` says how, ``metrics`` as the worker reported."""

    outcome: Outcome
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return self.outcome.state

    def to_json(self) -> dict[str, Any]:
        return {"Finished": {"state": self.outcome.to_json(), "metrics": dict(self.metrics)}}


FeedResult = Paused | Accepted | Finished


@dataclass(frozen=True, slots=True)
class HandshakeData:
    """The worker's answer to a handshake: its protocol version."""

    version: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    kind = "handshake"

    def to_json(self) -> dict[str, Any]:
        return _with_extra({"kind": "handshake", "version": self.version}, self.extra)


@dataclass(frozen=True, slots=True)
class FeedData:
    """The answer to ``run`` and ``continue``: the session and how far it got."""

    session_id: str
    feed_result: FeedResult
    extra: Mapping[str, Any] = field(default_factory=dict)
    kind = "feed"

    def to_json(self) -> dict[str, Any]:
        known = {
            "kind": "feed",
            "session_id": self.session_id,
            "feed_result": self.feed_result.to_json(),
        }
        return _with_extra(known, self.extra)


@dataclass(frozen=True, slots=True)
class StatusData:
    """The answer to ``status``; ``session_id`` is ``null`` without a session."""

    has_session: bool
    session_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    kind = "status"

    def to_json(self) -> dict[str, Any]:
        known = {"kind": "status", "has_session": self.has_session, "session_id": self.session_id}
        return _with_extra(known, self.extra)


@dataclass(frozen=True, slots=True)
class ShutdownData:
    """The answer to ``shutdown`` (the worker exits after sending it)."""

    extra: Mapping[str, Any] = field(default_factory=dict)
    kind = "shutdown"

    def to_json(self) -> dict[str, Any]:
        return _with_extra({"kind": "shutdown"}, self.extra)


@dataclass(frozen=True, slots=True)
class UnknownData:
    """A ``kind`` this client does not know; ``raw`` keeps everything."""

    kind: str
    raw: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dict(self.raw)


ResponseData = HandshakeData | FeedData | StatusData | ShutdownData | UnknownData


@dataclass(frozen=True, slots=True)
class Response:
    """The envelope. ``raw`` is the decoded JSON object, unknown keys included."""

    ok: bool
    data: ResponseData | None
    error: str | None
    raw: Mapping[str, Any]
    size: int = 0
    #: Bytes of the request line this answers (set by the client; 0 when unknown).
    request_size: int = 0

    @property
    def feed(self) -> FeedResult | None:
        """The feed result, when this is a ``feed`` response."""
        return self.data.feed_result if isinstance(self.data, FeedData) else None


def _extra(obj: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


_QUERY_KEYS = frozenset({"id", "prompt", "system", "max_tokens", "grounded", "underspecified"})


def query_from_json(obj: Any) -> Query:
    """A query of a ``Paused`` feed from its JSON object (ValueError if it has no id)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        raise ValueError("a query needs a string 'id'")
    prompt = obj.get("prompt", "")
    max_tokens = obj.get("max_tokens")
    return Query(
        id=obj["id"],
        prompt=prompt if isinstance(prompt, str) else json.dumps(prompt),
        system=obj.get("system") if isinstance(obj.get("system"), str) else None,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        grounded=bool(obj.get("grounded", False)),
        underspecified=bool(obj.get("underspecified", False)),
        extra=_extra(obj, _QUERY_KEYS),
    )


def _feed_result(obj: Any) -> FeedResult:
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ValueError("feed_result must be an object with exactly one tag")
    ((tag, body),) = obj.items()
    if tag == "Paused":
        queries = body.get("queries") if isinstance(body, dict) else None
        if not isinstance(queries, list):
            raise ValueError("Paused needs a 'queries' list")
        return Paused(tuple(query_from_json(q) for q in queries))
    if tag == "Accepted":
        remaining = body.get("remaining") if isinstance(body, dict) else None
        if not isinstance(remaining, int):
            raise ValueError("Accepted needs an integer 'remaining'")
        return Accepted(remaining)
    if tag == "Finished":
        if not isinstance(body, dict):
            raise ValueError("Finished must be an object")
        metrics = body.get("metrics") or {}
        state = body.get("state")
        outcome: Outcome
        if state == "Cancelled":
            outcome = Cancelled()
        elif isinstance(state, dict) and "Completed" in state:
            inner = state["Completed"]
            outcome = Completed(inner.get("result") if isinstance(inner, dict) else None)
        elif isinstance(state, dict) and "Failed" in state:
            inner = state["Failed"]
            error = inner.get("error") if isinstance(inner, dict) else None
            outcome = Failed(error if isinstance(error, str) else json.dumps(error))
        else:
            raise ValueError(f"unknown Finished state {state!r}")
        return Finished(outcome, metrics if isinstance(metrics, dict) else {})
    raise ValueError(f"unknown feed_result tag {tag!r}")


_HANDSHAKE_KEYS = frozenset({"kind", "version"})
_FEED_KEYS = frozenset({"kind", "session_id", "feed_result"})
_STATUS_KEYS = frozenset({"kind", "has_session", "session_id"})
_KIND_KEY = frozenset({"kind"})


def _data(obj: Mapping[str, Any]) -> ResponseData:
    kind = obj.get("kind")
    if kind == "handshake":
        if not isinstance(obj.get("version"), str):
            raise ValueError("handshake data needs a string 'version'")
        return HandshakeData(obj["version"], _extra(obj, _HANDSHAKE_KEYS))
    if kind == "feed":
        sid = obj.get("session_id")
        if not isinstance(sid, str):
            raise ValueError("feed data needs a string 'session_id'")
        return FeedData(
            sid,
            _feed_result(obj.get("feed_result")),
            _extra(obj, _FEED_KEYS),
        )
    if kind == "status":
        sid = obj.get("session_id")
        return StatusData(
            bool(obj.get("has_session", False)),
            sid if isinstance(sid, str) else None,
            _extra(obj, _STATUS_KEYS),
        )
    if kind == "shutdown":
        return ShutdownData(_extra(obj, _KIND_KEY))
    return UnknownData(str(kind), obj)


def decode_response(line: bytes, request_size: int = 0) -> Response:
    """Parse one complete response line (with or without its ``\\n``).

    Raises ``ResponseParseError`` carrying the offending bytes for anything that
    is not a strict-JSON envelope.
    """
    body = line[:-1] if line.endswith(b"\n") else line
    try:
        obj = loads_strict(body)
        if not isinstance(obj, dict):
            raise ValueError("a response must be a JSON object")
        ok = obj.get("ok")
        if not isinstance(ok, bool):
            raise ValueError("'ok' must be a boolean")
        data_obj = obj.get("data")
        if data_obj is not None and not isinstance(data_obj, dict):
            raise ValueError("'data' must be an object or null")
        error = obj.get("error")
        if error is not None and not isinstance(error, str):
            error = json.dumps(error)
        data = _data(data_obj) if data_obj is not None else None
    except ValueError as exc:
        raise ResponseParseError(str(exc), body) from exc
    return Response(ok, data, error, obj, len(line), request_size)


def encode_response(data: ResponseData) -> bytes:
    """Worker side: the ``ok:true`` line carrying ``data``.

    Raises ``ResponseEncodeError`` when ``data`` holds something JSON cannot
    carry (NaN, a non-string key, a cycle); algocline answers that case with
    ``ok:false`` "result serialize failed: ...".
    """
    return dumps_line({"ok": True, "data": data.to_json(), "error": None}, ResponseEncodeError)


def error_response(message: str) -> bytes:
    """Worker side: the ``ok:false`` line carrying ``message``."""
    return dumps_line({"ok": False, "data": None, "error": message}, ResponseEncodeError)


def version_mismatch_message(client: str, server: str) -> str:
    """The exact text real workers use to reject a handshake."""
    return f"version mismatch: client={client}, server={server}"


def check_handshake(response: Response, expected: str) -> HandshakeData:
    """Accept the handshake reply only if it echoes ``expected`` exactly.

    An ``ok:false`` reply of the standard mismatch form becomes ``VersionMismatch``.
    """
    if not response.ok:
        match = _VERSION_MISMATCH.search(response.error or "")
        if match:
            raise VersionMismatch(client=match.group(1), server=match.group(2))
        raise HandshakeError(f"worker rejected the handshake: {response.error}")
    if not isinstance(response.data, HandshakeData):
        kind = getattr(response.data, "kind", None)
        raise HandshakeError(f"expected a handshake reply, got kind={kind!r}")
    if response.data.version != expected:
        raise VersionMismatch(client=expected, server=response.data.version)
    return response.data
