"""The bundled worker's server: the protocol's worker rules on an asyncio Unix socket.

One client at a time, handshake first, one Lua session at a time (Lua runs in
a worker thread so the loop keeps answering signals and timers), the exact
error replies of algocline's worker, a bounded request line, an idle timeout,
graceful exit on SIGTERM/SIGINT/shutdown that removes the socket and the
registry entry. When the client goes away, a paused session waits for a
reconnect; otherwise the worker exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import protocol as proto
from .._version import PROTOCOL_VERSION
from ..errors import MalformedRequest, ResponseTooLarge
from ..registry import Registry
from ..security import ensure_private_dir
from .runtime import DEFAULT_MAX_MEMORY, LuaSession, SessionError, Step

__all__ = ["Worker", "idle_timeout_from_env"]

log = logging.getLogger("pool_notebook.worker")

DEFAULT_IDLE_TIMEOUT = 1800.0


def idle_timeout_from_env() -> float:
    """``POOL_WORKER_IDLE_TIMEOUT``, else algocline's ``ALC_POOL_IDLE_TIMEOUT``, else 1800 s."""
    for name in ("POOL_WORKER_IDLE_TIMEOUT", "ALC_POOL_IDLE_TIMEOUT"):
        value = os.environ.get(name)
        if value:
            try:
                return float(value)
            except ValueError:
                log.warning("ignoring %s=%r: not a number of seconds", name, value)
    return DEFAULT_IDLE_TIMEOUT


class Worker:
    """Serve one socket until shutdown, a signal, the idle timeout or the client leaving."""

    def __init__(
        self,
        sid: str,
        sock_path: str | os.PathLike[str],
        *,
        version: str = PROTOCOL_VERSION,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        sandbox: bool = True,
        max_memory: int = DEFAULT_MAX_MEMORY,
        max_line_bytes: int = proto.DEFAULT_MAX_LINE_BYTES,
        registry: Registry | None = None,
    ) -> None:
        self.sid = sid
        self.sock_path = Path(sock_path)
        self.version = version
        self.idle_timeout = idle_timeout
        self.sandbox = sandbox
        self.max_memory = max_memory
        self.max_line_bytes = max_line_bytes
        self.registry = registry
        self.session: LuaSession | None = None
        self.kv_state: dict[str, Any] = {}
        self._lua = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lua")
        self._lua_busy = False
        self._client: _ClientConnection | None = None
        self._idle_status = proto.encode_response(self._status(False))
        self._stop: asyncio.Event | None = None
        self._last_activity = 0.0
        self.exit_reason = ""

    async def serve(self) -> str:
        """Run until told to stop; returns why it stopped."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._last_activity = loop.time()
        ensure_private_dir(self.sock_path.parent)
        self._remove_stale_socket()
        old_umask = os.umask(0o177)  # the socket is born 0600...
        try:
            server = await loop.create_unix_server(
                lambda: _ClientConnection(self), str(self.sock_path)
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.sock_path, 0o600)  # ...and stays so whatever the umask did
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, f"signal {signal.Signals(signum).name}")
        watchdog = asyncio.create_task(self._watch_idle())
        log.info("worker %s serving %s (protocol %s)", self.sid, self.sock_path, self.version)
        try:
            await self._stop.wait()
        finally:
            watchdog.cancel()
            server.close()
            self._cleanup()
        return self.exit_reason

    def stop(self, reason: str) -> None:
        """Ask the serve loop to exit (idempotent)."""
        if self._stop is not None and not self._stop.is_set():
            self.exit_reason = reason
            log.info("worker %s stopping: %s", self.sid, reason)
            self._stop.set()

    @property
    def lua_running(self) -> bool:
        """True while Lua code is executing in the worker thread."""
        return self._lua_busy

    # ------------------------------------------------------------- internals

    def _remove_stale_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.sock_path).st_mode):
                os.unlink(self.sock_path)

    def _cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        if self.registry is not None:
            try:
                self.registry.remove(self.sid, pid=os.getpid())
            except Exception:  # exiting anyway: say so, don't mask the exit
                log.exception("could not remove %s from the registry", self.sid)

    async def _watch_idle(self) -> None:
        if self.idle_timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.idle_timeout, 1.0))
            if self._lua_busy:
                self._last_activity = loop.time()
            elif loop.time() - self._last_activity >= self.idle_timeout:
                self.stop(f"idle for {self.idle_timeout:g}s")
                return

    def _connection_made(self, conn: _ClientConnection) -> bool:
        """A client connected; False (after telling it why) if another one is served."""
        if self._client is not None:
            conn.reply(proto.error_response("worker busy: another client is connected"))
            return False
        self._client = conn
        return True

    def _connection_lost(self, conn: _ClientConnection) -> None:
        if self._client is not conn:
            return
        self._client = None
        self._last_activity = asyncio.get_running_loop().time()
        if not conn.kicked and not (self.session and self.session.state == "paused"):
            self.stop("client disconnected")

    def _handshake(self, request: proto.Request) -> tuple[bytes, bool]:
        """The reply to a connection's first line, and whether the client may go on."""
        if not isinstance(request, proto.Handshake):
            return proto.error_response("expected a handshake as the first message"), False
        if request.version != self.version:
            message = proto.version_mismatch_message(request.version, self.version)
            return proto.error_response(message), False
        return proto.encode_response({"kind": "handshake", "version": self.version}), True

    def _handle_now(self, request: proto.Request) -> bytes | None:
        """The reply to a request that needs no Lua, or None if it does."""
        if isinstance(request, proto.Status):
            if not request.include_history and self.session is None:
                return self._idle_status
            return proto.encode_response(self._status(request.include_history))
        if isinstance(request, proto.Shutdown):
            return proto.encode_response({"kind": "shutdown"})
        if isinstance(request, proto.Handshake):
            return proto.error_response("handshake already done on this connection")
        if isinstance(request, proto.Run):
            if self.session is not None and self.session.state in ("running", "paused"):
                return proto.error_response("worker already has an active session")
            return None
        if isinstance(request, proto.Continue):
            return None
        return proto.error_response(f"malformed request: unsupported op {request.op!r}")

    async def _handle_lua(self, request: proto.Request) -> bytes:
        if isinstance(request, proto.Run):
            return await self._run(request)
        assert isinstance(request, proto.Continue)
        return await self._continue(request)

    def _status(self, include_history: bool) -> dict[str, Any]:
        s = self.session
        active = s is not None and s.state in ("running", "paused")
        data: dict[str, Any] = {
            "kind": "status",
            "has_session": active,
            "session_id": s.session_id if s and active else None,
            "state": s.state if s else None,
            "pending_queries": [q for q in s.pending.values()] if s and active else [],
            "worker_sid": self.sid,
            "pid": os.getpid(),
        }
        if include_history:
            data["conversation_history"] = list(s.transcript) if s else []
        return data

    async def _in_lua(self, fn: Any, *args: Any) -> Step:
        def call() -> Step:
            try:
                step: Step = fn(*args)
                return step
            finally:  # cleared by the thread itself: a cancelled await does not mean it ended
                self._lua_busy = False

        self._lua_busy = True
        try:
            return await asyncio.get_running_loop().run_in_executor(self._lua, call)
        finally:
            self._last_activity = asyncio.get_running_loop().time()

    async def _run(self, request: proto.Run) -> bytes:
        session_id = f"s-{secrets.token_hex(8)}"

        def start() -> Step:
            self.session = LuaSession(
                session_id, request.code, ctx=request.ctx, lib_paths=request.lib_paths,
                state=self.kv_state, sandbox=self.sandbox, max_memory=self.max_memory,
            )
            return self.session.start()

        return self._feed(session_id, await self._in_lua(start))

    async def _continue(self, request: proto.Continue) -> bytes:
        s = self.session
        if s is None or s.state != "paused":
            return proto.error_response("no paused session to continue")
        if request.sid != s.session_id:
            return proto.error_response(
                f"unknown session id {request.sid!r} (the paused session is {s.session_id!r})")
        try:
            step = await self._in_lua(s.answer, request.query_id, request.response,
                                      request.usage)
        except SessionError as exc:
            return proto.error_response(str(exc))
        return self._feed(s.session_id, step)

    def _feed(self, session_id: str, step: Step) -> bytes:
        result: dict[str, Any]
        if step.kind == "paused":
            result = {"Paused": {"queries": step.queries}}
        elif step.kind == "accepted":
            result = {"Accepted": {"remaining": step.remaining}}
        else:
            assert self.session is not None
            state: Any = ({"Completed": {"result": step.result}} if step.kind == "done"
                          else {"Failed": {"error": step.error}})
            result = {"Finished": {"state": state, "metrics": self.session.metrics()}}
        return proto.encode_response(
            {"kind": "feed", "session_id": session_id, "feed_result": result})


class _ClientConnection(asyncio.Protocol):
    """One client: bounded line framing, one request at a time, replies in order.

    Requests that need no Lua are answered inside ``data_received``; ``run`` and
    ``continue`` go to the Lua thread, and lines arriving meanwhile wait their turn.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.buffer = proto.LineBuffer(worker.max_line_bytes)
        self.transport: asyncio.Transport | None = None
        self.greeted = False
        self.busy = False
        self.kicked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.worker._connection_made(self):
            self.kick()

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker._connection_lost(self)

    def reply(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def kick(self) -> None:
        """Close the connection ourselves (the worker keeps running)."""
        self.kicked = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer.feed(data)
        self._pump()

    def _pump(self) -> None:
        worker = self.worker
        while not self.busy and not self.kicked:
            try:
                line = self.buffer.next_line()
            except ResponseTooLarge:
                self.reply(proto.error_response(
                    f"malformed request: line longer than {worker.max_line_bytes} bytes"))
                self.kick()
                return
            if line is None:
                return
            worker._last_activity = asyncio.get_running_loop().time()
            try:
                request = proto.decode_request(line)
            except MalformedRequest as exc:
                self.reply(proto.error_response(f"malformed request: {exc}"))
                continue
            if not self.greeted:
                answer, self.greeted = worker._handshake(request)
                self.reply(answer)
                if not self.greeted:
                    self.kick()
                continue
            now = worker._handle_now(request)
            if now is None:
                self.busy = True
                task = asyncio.get_running_loop().create_task(worker._handle_lua(request))
                task.add_done_callback(self._lua_done)
                return
            self.reply(now)
            if isinstance(request, proto.Shutdown):
                worker.stop("shutdown requested")
                self.kick()

    def _lua_done(self, task: asyncio.Task[bytes]) -> None:
        self.busy = False
        if task.cancelled():
            return
        if self.transport is None or self.transport.is_closing():
            log.warning("client went away before its reply could be sent")
        exc = task.exception()
        if exc is not None:
            log.error("internal error while running Lua", exc_info=exc)
            self.reply(proto.error_response(f"internal worker error: {exc!r}"))
        else:
            self.reply(task.result())
        self._pump()
