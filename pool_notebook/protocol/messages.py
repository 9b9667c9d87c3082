"""The pool-worker wire protocol, sans I/O: bytes in, typed events out.

Both sides use it: the client encodes requests and decodes responses, the
bundled worker decodes requests and encodes responses. Nothing here touches a
socket, an event loop or IPython (the h11/websockets style), so every rule of
the protocol is testable with plain bytes.

Wire facts (see the project's protocol reference): one UTF-8 JSON object per
``\\n``-terminated line; strictly one request then one response; responses are
``{"ok": bool, "data": {"kind": ...} | null, "error": str | null}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    HandshakeError,
    MalformedRequest,
    ResponseParseError,
    ResponseTooLarge,
    VersionMismatch,
)

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
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
    "LineBuffer",
    "Paused",
    "Query",
    "RawRequest",
    "Request",
    "Response",
    "Run",
    "Shutdown",
    "ShutdownData",
    "Status",
    "StatusData",
    "UnknownData",
    "check_handshake",
    "decode_request",
    "decode_response",
    "encode_response",
    "error_response",
    "loads_strict",
]

#: Default bound on one line (request or response), newline included.
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
#: Deepest JSON nesting accepted; deeper is a parse error, not a RecursionError.
MAX_DEPTH = 128
#: Longest integer literal accepted (digits); longer is a parse error.
MAX_INT_DIGITS = 64

_UTF8_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_VERSION_MISMATCH = re.compile(r"version mismatch: client=(\S+?),\s*server=(\S+)")


# --------------------------------------------------------------------------- JSON


class _JSONRejected(ValueError):
    """Internal: a JSON value the protocol refuses (NaN, huge int, depth, surrogate)."""


def _reject_constant(name: str) -> Any:
    raise _JSONRejected(f"{name} is not valid JSON")


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise _JSONRejected(f"integer with {len(text)} digits exceeds {MAX_INT_DIGITS}")
    return int(text)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_parse_int)


def _validate(value: Any, depth: int = 0) -> None:
    """Reject nesting deeper than MAX_DEPTH and lone surrogates in strings."""
    if depth > MAX_DEPTH:
        raise _JSONRejected(f"nesting deeper than {MAX_DEPTH}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _JSONRejected("string contains a lone surrogate escape") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _validate(key, depth + 1)
            _validate(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _validate(item, depth + 1)


def loads_strict(line: bytes) -> Any:
    """Decode one line as strict UTF-8 JSON, or raise ``ValueError`` saying why.

    Refused: a BOM, invalid UTF-8 (surrogates included), NaN/Infinity, integers
    over MAX_INT_DIGITS digits, nesting over MAX_DEPTH, lone ``\\uD8xx`` escapes,
    trailing data. The cheap prefilters keep the common case at ``json.loads`` speed.
    """
    if line.startswith(_UTF8_BOM):
        raise ValueError("line starts with a UTF-8 byte order mark")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        value = _DECODER.decode(text)
    except RecursionError as exc:
        raise ValueError(f"nesting deeper than {MAX_DEPTH}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH or _SURROGATE_ESCAPE.search(line):
        _validate(value)
    return value


def _dumps(obj: Any) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8") + b"\n"
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise MalformedRequest(f"cannot encode as a JSON line: {exc}") from exc


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

_STATUS_LINE = b'{"op":"status"}\n'


def encode_request(request: Request) -> bytes:
    """One ``\\n``-terminated UTF-8 JSON line for ``request``."""
    if type(request) is Status and not request.include_history:
        return _STATUS_LINE
    return _dumps(request.to_json())


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
        if usage is not None and not isinstance(usage, dict):
            raise MalformedRequest("'usage' must be an object or null")
        return Continue(
            _req_str(obj, "sid"), _req_str(obj, "response"), _opt_str(obj, "query_id"), usage
        )
    if op == "status":
        return Status(bool(obj.get("include_history", False)))
    if op == "shutdown":
        return Shutdown()
    raise MalformedRequest(f"unknown op {op!r}" if op is not None else "missing 'op'")


# ---------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class Query:
    """One pending LLM query of a paused session."""

    id: str
    prompt: str
    system: str | None = None
    max_tokens: int | None = None
    grounded: bool = False
    underspecified: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Paused:
    """The session waits for one ``continue`` per query."""

    queries: tuple[Query, ...]
    state = "paused"


@dataclass(frozen=True, slots=True)
class Accepted:
    """A batch answer was stored; ``remaining`` queries still need one."""

    remaining: int
    state = "accepted"


@dataclass(frozen=True, slots=True)
class Completed:
    """The Lua code returned ``result``."""

    result: Any
    state = "completed"


@dataclass(frozen=True, slots=True)
class Failed:
    """The Lua code raised ``error``."""

    error: str
    state = "failed"


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The session was cancelled."""

    state = "cancelled"


@dataclass(frozen=True, slots=True)
class Finished:
    """The session ended; ``outcome`` says how, ``metrics`` as the worker reported."""

    outcome: Completed | Failed | Cancelled
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return self.outcome.state


FeedResult = Paused | Accepted | Finished


@dataclass(frozen=True, slots=True)
class HandshakeData:
    version: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    kind = "handshake"


@dataclass(frozen=True, slots=True)
class FeedData:
    session_id: str
    feed_result: FeedResult
    extra: Mapping[str, Any] = field(default_factory=dict)
    kind = "feed"


@dataclass(frozen=True, slots=True)
class StatusData:
    has_session: bool
    session_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    kind = "status"


@dataclass(frozen=True, slots=True)
class ShutdownData:
    extra: Mapping[str, Any] = field(default_factory=dict)
    kind = "shutdown"


@dataclass(frozen=True, slots=True)
class UnknownData:
    """A ``kind`` this client does not know; ``raw`` keeps everything."""

    kind: str
    raw: Mapping[str, Any]


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


def _query(obj: Any) -> Query:
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
        return Paused(tuple(_query(q) for q in queries))
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
        outcome: Completed | Failed | Cancelled
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


def _data(obj: Mapping[str, Any]) -> ResponseData:
    kind = obj.get("kind")
    if kind == "handshake":
        if not isinstance(obj.get("version"), str):
            raise ValueError("handshake data needs a string 'version'")
        return HandshakeData(obj["version"], _extra(obj, frozenset({"kind", "version"})))
    if kind == "feed":
        sid = obj.get("session_id")
        if not isinstance(sid, str):
            raise ValueError("feed data needs a string 'session_id'")
        return FeedData(
            sid,
            _feed_result(obj.get("feed_result")),
            _extra(obj, frozenset({"kind", "session_id", "feed_result"})),
        )
    if kind == "status":
        sid = obj.get("session_id")
        return StatusData(
            bool(obj.get("has_session", False)),
            sid if isinstance(sid, str) else None,
            _extra(obj, frozenset({"kind", "has_session", "session_id"})),
        )
    if kind == "shutdown":
        return ShutdownData(_extra(obj, frozenset({"kind"})))
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


def encode_response(data: Mapping[str, Any]) -> bytes:
    """Worker side: an ``ok:true`` line carrying ``data`` (which has its ``kind``)."""
    return _dumps({"ok": True, "data": dict(data), "error": None})


def error_response(message: str) -> bytes:
    """Worker side: an ``ok:false`` line with ``message``."""
    return _dumps({"ok": False, "data": None, "error": message})


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


# ---------------------------------------------------------------------- framing


class LineBuffer:
    """Bounded framing: feed bytes, take complete ``\\n``-terminated lines.

    A line longer than ``max_line_bytes`` raises ``ResponseTooLarge`` instead of
    growing without bound; bytes after the last newline stay buffered (they are
    never a message until their newline arrives).
    """

    __slots__ = ("_buf", "_scan_from", "max_line_bytes")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 2:
            raise ValueError("max_line_bytes must be at least 2")
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._scan_from = 0

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def pending(self) -> bytes:
        """Buffered bytes not yet part of a complete line."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes (no parsing happens here)."""
        self._buf += data

    def next_line(self) -> bytes | None:
        """The next complete line including its ``\\n``, or None if none is complete."""
        end = self._buf.find(b"\n", self._scan_from)
        if end < 0:
            self._scan_from = len(self._buf)
            if self._scan_from > self.max_line_bytes:
                raise ResponseTooLarge(self.max_line_bytes, bytes(self._buf[:256]))
            return None
        if end + 1 > self.max_line_bytes:
            raise ResponseTooLarge(self.max_line_bytes, bytes(self._buf[:256]))
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        self._scan_from = 0
        return line

    def lines(self) -> Iterator[bytes]:
        """All complete lines currently buffered."""
        while (line := self.next_line()) is not None:
            yield line
