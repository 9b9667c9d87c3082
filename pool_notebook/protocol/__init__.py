"""The pool-worker wire protocol, sans I/O: bytes in, typed events out.

``framing`` turns bytes into bounded lines and strict JSON; ``messages`` holds
the typed requests and responses both ends encode and decode; ``client`` and
``worker`` are the connection state machines of the two roles. Nothing in this package touches
a socket, an event loop or IPython.
"""

from __future__ import annotations

from .client import ClientConnection
from .framing import (
    DEFAULT_MAX_LINE_BYTES,
    MAX_DEPTH,
    MAX_INT_DIGITS,
    LineBuffer,
    dumps_line,
    loads_strict,
)
from .messages import (
    MAX_USAGE_TOKENS,
    Accepted,
    Cancelled,
    Completed,
    Continue,
    Failed,
    FeedData,
    FeedResult,
    Finished,
    Handshake,
    HandshakeData,
    Outcome,
    Paused,
    Query,
    RawRequest,
    Request,
    Response,
    ResponseData,
    Run,
    Shutdown,
    ShutdownData,
    Status,
    StatusData,
    UnknownData,
    check_handshake,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    error_response,
    version_mismatch_message,
)

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_USAGE_TOKENS",
    "Accepted",
    "Cancelled",
    "ClientConnection",
    "Completed",
    "Continue",
    "Failed",
    "FeedData",
    "FeedResult",
    "Finished",
    "Handshake",
    "HandshakeData",
    "LineBuffer",
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
    "dumps_line",
    "encode_request",
    "encode_response",
    "error_response",
    "loads_strict",
    "version_mismatch_message",
]
