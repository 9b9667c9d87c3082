"""Framing and strict JSON for the pool wire, sans I/O.

One message is one UTF-8 JSON object on one ``\\n``-terminated line. This module
turns bytes into lines (bounded: an over-long line is an error, not unbounded
memory) and lines into JSON values (strict: no NaN, no BOM, no lone surrogates,
no absurd nesting or integer sizes), and back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import (
    InvalidArgument,
    MalformedRequest,
    PoolError,
    ProtocolError,
    ResponseTooLarge,
)

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "LineBuffer",
    "dumps_line",
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

    The decoders (``decode_request``/``decode_response``) turn that ``ValueError``
    into their typed errors; this is their shared helper.

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


def dumps_line(obj: Any, error: Callable[[str], PoolError] = MalformedRequest) -> bytes:
    """``obj`` as one compact UTF-8 JSON line, or ``error(reason)`` saying why not."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8") + b"\n"
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise error(f"cannot encode as a JSON line: {exc}") from exc


class LineBuffer:
    """Bounded framing: feed bytes, take complete ``\\n``-terminated lines.

    A line longer than ``max_line_bytes`` raises ``too_long(limit, head)``
    (``ResponseTooLarge`` by default; a worker passes its request-side error)
    instead of growing without bound; bytes after the last newline stay
    buffered (they are never a message until their newline arrives).
    """

    __slots__ = ("_buf", "_scan_from", "_too_long", "max_line_bytes")

    def __init__(
        self,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        too_long: Callable[[int, bytes], ProtocolError] = ResponseTooLarge,
    ) -> None:
        if max_line_bytes < 2:
            raise InvalidArgument(f"max_line_bytes must be at least 2, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes
        self._too_long = too_long
        self._buf = bytearray()
        self._scan_from = 0

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def buffer(self) -> bytearray:
        """The buffered bytes themselves (one object for the buffer's lifetime; read only)."""
        return self._buf

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
                raise self._too_long(self.max_line_bytes, bytes(self._buf[:256]))
            return None
        if end + 1 > self.max_line_bytes:
            raise self._too_long(self.max_line_bytes, bytes(self._buf[:256]))
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        self._scan_from = 0
        return line

    def lines(self) -> Iterator[bytes]:
        """All complete lines currently buffered."""
        while (line := self.next_line()) is not None:
            yield line
