"""Every error pool_notebook raises, in one tree.

Lower-layer errors (``OSError``, JSON/Unicode decoding, ``asyncio`` timeouts) are
mapped into this tree in one place each (the client's I/O boundary, the protocol
decoder) and chained with ``from``. ``asyncio.CancelledError`` and
``KeyboardInterrupt`` are never caught-and-wrapped: they propagate as they are.

::

    PoolError
    ├── ConnectError                 socket connect() failed (wraps the OSError)
    │   └── ConnectTimeout           (also TimeoutError) connect() did not complete in time
    ├── InsecureSocketError          path/directory/peer failed the security checks
    │   └── InsecureDirectoryError   (worker side) an existing socket directory is not private
    ├── HandshakeError               the handshake reply was not an acceptable handshake
    │   ├── HandshakeTimeout         (also TimeoutError) no reply within handshake_timeout
    │   └── VersionMismatch          worker speaks another protocol version
    ├── TransportError               the byte stream failed
    │   ├── WriteError               sending failed (wraps the OSError)
    │   └── ReadError                receiving failed (wraps the OSError)
    │       └── ConnectionClosed     EOF from the worker (possibly mid-line)
    ├── ProtocolError                bytes arrived but are not a valid message
    │   ├── ResponseParseError       not strict UTF-8 JSON of the response shape
    │   ├── ResponseTooLarge         a line longer than max_line_bytes
    │   ├── RequestTooLarge          (worker side) a request line longer than max_line_bytes
    │   ├── UnsolicitedResponse      a line arrived that no request asked for
    │   ├── MalformedRequest         (worker side / encoding) a request line is invalid
    │   └── ResponseEncodeError      (worker side) a reply cannot be encoded as JSON
    ├── RequestTimeout               (also TimeoutError) no reply within the timeout
    ├── ConnectionBroken             sticky: the connection can no longer be trusted
    ├── ClientClosed                 the client was closed by its owner
    ├── ProtocolStateError           (also RuntimeError) a move the protocol state forbids
    ├── WorkerError                  the worker answered ok:false (carries op and message)
    │   └── SessionRefused           the worker already has a session (one per worker)
    ├── ContinueRejected             (worker side) a continue that does not fit the paused session
    ├── LuaMemoryError               (worker side, also MemoryError) data would pass a session's cap
    ├── SpawnError                   a worker process did not come up
    ├── RegistryError                the worker registry could not be used
    │   └── RegistryCorrupted        registry.json exists but does not parse
    ├── ConnectionNotFound           (also KeyError) no connection by that name
    ├── InvalidArgument              (also ValueError) a library call got an unusable argument
    ├── SessionError                 a Session cannot do what was asked
    │   ├── SessionNotPaused         nothing (or not that query) is waiting for an answer
    │   └── ResponderError           the responder raised; the session stays paused
    ├── HistoryError                 the history database could not be read
    ├── LLMError                     (llm) a model responder cannot be built or used
    │   ├── LLMProviderError         the model provider failed after the SDK's retries
    │   ├── ReplayMiss               cache="replay" and no answer was recorded
    │   └── AnswerStoreError         the answers store file cannot be used
    └── LoopError                    (also RuntimeError) called from the wrong thread or loop
"""

from __future__ import annotations

__all__ = [
    "AnswerStoreError",
    "ClientClosed",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionBroken",
    "ConnectionClosed",
    "ConnectionNotFound",
    "ContinueRejected",
    "HandshakeError",
    "HandshakeTimeout",
    "HistoryError",
    "InsecureDirectoryError",
    "InsecureSocketError",
    "InvalidArgument",
    "LLMError",
    "LLMProviderError",
    "LoopError",
    "LuaMemoryError",
    "MalformedRequest",
    "PoolError",
    "ProtocolError",
    "ProtocolStateError",
    "ReadError",
    "RegistryCorrupted",
    "RegistryError",
    "ReplayMiss",
    "RequestTimeout",
    "RequestTooLarge",
    "ResponderError",
    "ResponseEncodeError",
    "ResponseParseError",
    "ResponseTooLarge",
    "SessionError",
    "SessionNotPaused",
    "SessionRefused",
    "SpawnError",
    "TransportError",
    "UnsolicitedResponse",
    "VersionMismatch",
    "WorkerError",
    "WriteError",
]

#: How many bytes of an offending line an error keeps for display.
SNIPPET_BYTES = 200


def snippet(data: bytes, limit: int = SNIPPET_BYTES) -> bytes:
    """The first ``limit`` bytes of ``data`` (what errors keep for display)."""
    return data if len(data) <= limit else data[:limit]


def _show(data: bytes) -> str:
    shown = repr(snippet(data))
    return shown + (f" … ({len(data)} bytes)" if len(data) > SNIPPET_BYTES else "")


class PoolError(Exception):
    """Base class of every error raised by pool_notebook."""


class ConnectError(PoolError):
    """Connecting to the worker's socket failed; ``__cause__`` is the OSError."""

    def __init__(self, sock_path: str, reason: str) -> None:
        self.sock_path = sock_path
        super().__init__(
            f"cannot connect to worker socket {sock_path}: {reason}. "
            "Check that the worker is running (pool_notebook.Registry.default().entries() "
            "lists known ones) and that the path is right."
        )


class ConnectTimeout(ConnectError, TimeoutError):
    """``connect()`` to the worker's socket did not complete within the timeout."""

    def __init__(self, sock_path: str, timeout: float) -> None:
        self.timeout = timeout
        ConnectError.__init__(
            self, sock_path, f"connect() did not complete within {timeout:g}s "
            "(the worker is not accepting connections: its listen backlog is full)"
        )


class InsecureSocketError(PoolError):
    """The socket path, its directory or the peer process failed a security check."""

    def __init__(self, sock_path: str, problem: str) -> None:
        self.sock_path = sock_path
        self.problem = problem
        super().__init__(
            f"refusing socket {sock_path}: {problem}. "
            "Fix the permissions, or pass allow_insecure=True if you trust it."
        )


class InsecureDirectoryError(InsecureSocketError):
    """(Worker side) the socket's existing directory is not private to us; it is left as is."""

    def __init__(self, directory: str, problem: str) -> None:
        self.sock_path = directory
        self.problem = problem
        PoolError.__init__(
            self,
            f"refusing socket directory {directory}: {problem}. The worker never changes "
            "the mode of a directory it did not create: give --sock a path in a directory "
            "of your own with mode 0700, or in one that does not exist yet (it is created 0700)."
        )


class HandshakeError(PoolError):
    """The worker's reply to the handshake was not an acceptable handshake."""


class HandshakeTimeout(HandshakeError, TimeoutError):
    """The worker did not answer the handshake within ``handshake_timeout``."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            f"handshake recv timeout ({timeout:g}s): the worker accepted the connection "
            "but did not answer; it may be busy with another client or not a pool worker"
        )


class VersionMismatch(HandshakeError):
    """The worker speaks another protocol version than the one we asked for."""

    def __init__(self, client: str, server: str) -> None:
        self.client = client
        self.server = server
        super().__init__(
            f"version mismatch: client={client}, server={server}. "
            f"The worker speaks {server}; connect with "
            f"pool_notebook.connect(..., version={server!r})."
        )


class TransportError(PoolError):
    """The byte stream to the worker failed."""


class WriteError(TransportError):
    """Sending to the worker failed; ``__cause__`` is the OSError."""


class ReadError(TransportError):
    """Receiving from the worker failed; ``__cause__`` is the OSError, if any."""


class ConnectionClosed(ReadError):
    """The worker closed the connection (EOF), possibly in the middle of a line."""

    def __init__(self, partial: bytes = b"") -> None:
        self.partial = snippet(partial)
        where = f" in the middle of a line ({_show(partial)})" if partial else ""
        super().__init__(
            f"the worker closed the connection{where}; it may have exited. "
            "Reconnect, or spawn a new worker."
        )


class ProtocolError(PoolError):
    """Bytes arrived that are not a valid protocol message."""


class ResponseParseError(ProtocolError):
    """A line is not a well-formed response; ``data`` keeps its first bytes."""

    def __init__(self, reason: str, data: bytes) -> None:
        self.reason = reason
        self.data = snippet(data)
        super().__init__(f"malformed response from worker: {reason}: {_show(data)}")


class ResponseTooLarge(ProtocolError):
    """A line exceeded ``max_line_bytes`` before its newline arrived."""

    def __init__(self, limit: int, data: bytes = b"") -> None:
        self.limit = limit
        self.data = snippet(data)
        super().__init__(
            f"response line longer than max_line_bytes={limit}; "
            "raise max_line_bytes if the worker legitimately sends that much"
        )


class RequestTooLarge(ProtocolError):
    """(Worker side) a request line exceeded the worker's ``max_line_bytes``."""

    def __init__(self, limit: int, data: bytes = b"") -> None:
        self.limit = limit
        self.data = snippet(data)
        super().__init__(
            f"request line longer than {limit} bytes; send less code or a smaller ctx "
            "(the worker closes the connection)"
        )


class UnsolicitedResponse(ProtocolError):
    """A line arrived that no request asked for, so replies can no longer be matched."""

    def __init__(self, data: bytes) -> None:
        self.data = snippet(data)
        super().__init__(f"the worker sent a line nobody asked for: {_show(data)}")


class MalformedRequest(ProtocolError):
    """A request could not be encoded or (worker side) decoded."""


class ResponseEncodeError(ProtocolError):
    """(Worker side) a reply holds something JSON cannot carry (NaN, a cycle, ...)."""


class RequestTimeout(PoolError, TimeoutError):
    """No reply arrived within the request's timeout.

    The connection stays usable: the late reply is consumed by the client itself
    (reported through ``on_late_reply``) and never handed to another caller.
    """

    def __init__(self, op: str, timeout: float, waiting_for: str = "") -> None:
        self.op = op
        self.timeout = timeout
        self.waiting_for = waiting_for
        if waiting_for:
            text = (
                f"{op!r} request timed out after {timeout:g}s before it was sent "
                f"({waiting_for}); the connection stays usable, try again"
            )
        else:
            text = (
                f"{op!r} request got no reply within {timeout:g}s; the connection stays "
                "usable and the late reply will be consumed when it arrives"
            )
        super().__init__(text)


class ConnectionBroken(PoolError):
    """Sticky: the stream is in an unknown state; every later call raises this."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"connection is broken ({reason}); close it and connect again "
            "(pool_notebook.disconnect(name), then pool_notebook.connect(sid=...) "
            "to pick up a paused session)"
        )


class ClientClosed(PoolError):
    """The client was closed by its owner; connect again to use the worker."""

    def __init__(self) -> None:
        super().__init__("the connection was closed; connect again to talk to the worker")


class ProtocolStateError(PoolError, RuntimeError):
    """An I/O layer asked the protocol state machine for a move its state forbids.

    A bug in the caller (e.g. a second request while one is in flight), never
    something the worker did; the connection's state is unchanged.
    """

    def __init__(self, state: str, action: str) -> None:
        self.state = state
        self.action = action
        super().__init__(f"cannot {action} while the connection is {state}")


class WorkerError(PoolError):
    """The worker answered ``ok: false``; carries the request's ``op`` and the message."""

    def __init__(self, op: str, message: str) -> None:
        self.op = op
        self.message = message
        super().__init__(f"worker rejected {op!r}: {message}")


class SpawnError(PoolError):
    """A worker process exited, or did not create its socket, during spawn."""

    def __init__(
        self, message: str, *, returncode: int | None = None, stderr_tail: str = ""
    ) -> None:
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        text = message
        if returncode is not None:
            text += f" (exit status {returncode})"
        if stderr_tail:
            text += "\n--- worker stderr (tail) ---\n" + stderr_tail
        super().__init__(text)


class RegistryError(PoolError):
    """The worker registry could not be read or written."""


class RegistryCorrupted(RegistryError):
    """``registry.json`` exists but does not parse; it is never treated as empty."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(
            f"worker registry {path} is corrupted ({reason}); it was left untouched so "
            "live workers are not forgotten. Inspect or remove it by hand."
        )


class ConnectionNotFound(PoolError, KeyError):
    """No open connection has that name."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        listed = ", ".join(known) if known else "none open"
        super().__init__(f"no connection named {name!r} (open: {listed}); "
                         "open one with pool_notebook.connect()")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class SessionRefused(WorkerError):
    """The worker refused ``run`` because it already has a session.

    algocline's ``alc pool-worker`` serves one session per process.
    """

    def __init__(self, message: str) -> None:
        self.op = "run"
        self.message = message
        PoolError.__init__(
            self,
            f"worker refused 'run': {message}. This worker serves one session per "
            "process (algocline's rule): run on a new worker "
            "(pool_notebook.connect(spawn=...) starts one; connections that spawned "
            "their worker start a fresh one by themselves)",
        )


class ContinueRejected(PoolError):
    """(worker side) A ``continue`` the paused session cannot take; the message
    (algocline's wording, e.g. ``unknown query_id: q-7``) goes to the client."""


class LuaMemoryError(PoolError, MemoryError):
    """(worker side) Data would pass a Lua session's memory cap; checked before it
    is copied into Lua, so sandboxed code sees a Lua error, never an abort."""


class InvalidArgument(PoolError, ValueError):
    """A library function got an argument it cannot use; the message names it."""


class SessionError(PoolError):
    """A :class:`~pool_notebook.session.Session` cannot do what was asked."""


class SessionNotPaused(SessionError):
    """``answer`` was called but nothing (or not that query) is waiting for one."""

    def __init__(self, session_id: str | None, state: str, detail: str = "") -> None:
        self.session_id = session_id
        self.state = state
        super().__init__(
            f"session {session_id} is {state}{': ' + detail if detail else ''}; "
            "session.pending lists the queries that can be answered"
        )


class ResponderError(SessionError):
    """The responder raised while answering ``query``; ``__cause__`` is its exception.

    The session stays paused: answer it again (``session.answer``/``answer_all``).
    """

    def __init__(self, query_id: str, error: BaseException, failed: int = 1) -> None:
        self.query_id = query_id
        self.failed = failed
        more = f" ({failed - 1} more failed too)" if failed > 1 else ""
        super().__init__(
            f"the responder raised {type(error).__name__} for query {query_id}: {error}{more}; "
            "the session is still paused and can be answered again"
        )


class HistoryError(PoolError):
    """The history database could not be read or written; ``__cause__`` says why."""


class LoopError(PoolError, RuntimeError):
    """A blocking call was made from the wrong thread, or on a loop that cannot run it."""


class LLMError(PoolError):
    """A model responder cannot be built or used (bad spec, missing extra, missing key)."""


class LLMProviderError(LLMError):
    """The model provider failed after the SDK's retries; ``__cause__`` is the SDK error.

    Nothing was answered: a paused session stays paused and can be answered again.
    """

    def __init__(self, model: str, base_url: str, reason: str,
                 status: int | None = None) -> None:
        self.model = model
        self.base_url = base_url
        self.status = status
        code = f"HTTP {status}: " if status is not None else ""
        super().__init__(
            f"model {model!r} at {base_url} failed: {code}{reason}. Nothing was answered: "
            "a paused session stays paused; answer it again when the provider is back"
        )


class ReplayMiss(LLMError):
    """``cache="replay"`` and this occurrence of the request was never recorded."""

    def __init__(self, model: str, prompt: str, occurrence: int, store: str) -> None:
        self.model = model
        self.prompt = prompt
        self.occurrence = occurrence
        shown = prompt if len(prompt) <= 120 else prompt[:120] + "…"
        super().__init__(
            f"no recorded answer from {model!r} for occurrence {occurrence + 1} of prompt "
            f"{shown!r} in {store}; record it first (cache=\"record\"), import the store "
            "shipped with the notebook, or answer by hand"
        )


class AnswerStoreError(LLMError):
    """The answers store (SQLite, or an exported JSON-lines file) cannot be used."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        super().__init__(f"answers store {path}: {reason}")
