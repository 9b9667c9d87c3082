"""The bundled worker's server: algocline's ``alc pool-worker`` loop on an asyncio Unix socket.

A thin I/O layer over :class:`pool_notebook.protocol.worker.WorkerConnection`
(the protocol rules) and :class:`.runtime.LuaSession` (the Lua). Like
algocline's worker it serves one connection at a time: further clients are
accepted and wait, unread, until the current one leaves. On top of that it
keeps the faults out:

- every connection's peer uid is checked (``SO_PEERCRED``): our own uid, or one
  named with ``allow_uids``;
- a connection that has not completed its handshake within
  ``handshake_timeout`` is closed and the next client is served;
- backpressure: reading stops while the client leaves our replies unread, or
  while a line's worth of its requests waits; every line is bounded, always;
- ``shutdown``, a client disconnect, SIGTERM or SIGINT while Lua runs interrupt
  the running session, so the worker answers and exits promptly;
- the socket directory is created private, and an existing one is used only if
  it is safe, never chmodded (:func:`pool_notebook.security.ensure_private_dir`).

When a client that completed its handshake goes away, a paused session waits
for a reconnect; otherwise the worker exits (algocline's rule). Graceful exits
remove the socket, the registry entry and the worker's log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import stat
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._version import PROTOCOL_VERSION
from ..errors import ContinueRejected, InsecureSocketError, ResponseEncodeError
from ..protocol.framing import DEFAULT_MAX_LINE_BYTES
from ..protocol.messages import (
    Accepted,
    Completed,
    Continue,
    Failed,
    FeedData,
    FeedResult,
    Finished,
    Paused,
    Request,
    Run,
    Shutdown,
    ShutdownData,
    Status,
    StatusData,
    encode_response,
    error_response,
    query_from_json,
)
from ..protocol.worker import ConnectionClosing, RequestReceived, WorkerConnection, WorkerState
from ..registry import Registry, new_id
from ..security import ensure_private_dir, peer_credentials
from .runtime import DEFAULT_MAX_MEMORY, HISTORY_ENTRIES, LuaSession, SessionFactory, Step

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "Worker",
    "handshake_timeout_from_env",
    "idle_timeout_from_env",
    "seconds",
]

log = logging.getLogger("pool_notebook.worker")

#: algocline's default (``ALC_POOL_IDLE_TIMEOUT``): 30 minutes.
DEFAULT_IDLE_TIMEOUT = 1800.0
#: Seconds a new connection has to complete its handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
#: Seconds to let an interrupted Lua call wind down before exiting regardless.
_LUA_GRACE = 0.5
#: Seconds a session stays paused before the next session's VM is built meanwhile.
PREWARM_PAUSED = 0.001


def seconds(name: str, value: object, default: float, *, allow_zero: bool) -> float:
    """``value`` as a finite, non-negative number of seconds, else a warning and ``default``.

    ``allow_zero``: whether 0 is meaningful (it disables the idle timeout).
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number) and (number > 0 or (allow_zero and number == 0)):
        return number
    log.warning("ignoring %s=%r: not a finite number of seconds %s; using %g", name, value,
                ">= 0" if allow_zero else "> 0", default)
    return default


def idle_timeout_from_env() -> float:
    """``POOL_WORKER_IDLE_TIMEOUT``, else algocline's ``ALC_POOL_IDLE_TIMEOUT``, else 1800 s."""
    for name in ("POOL_WORKER_IDLE_TIMEOUT", "ALC_POOL_IDLE_TIMEOUT"):
        value = os.environ.get(name)
        if value:
            return seconds(name, value, DEFAULT_IDLE_TIMEOUT, allow_zero=True)
    return DEFAULT_IDLE_TIMEOUT


def handshake_timeout_from_env() -> float:
    """``POOL_WORKER_HANDSHAKE_TIMEOUT``, else 5 s."""
    value = os.environ.get("POOL_WORKER_HANDSHAKE_TIMEOUT")
    if value:
        return seconds("POOL_WORKER_HANDSHAKE_TIMEOUT", value, DEFAULT_HANDSHAKE_TIMEOUT,
                       allow_zero=False)
    return DEFAULT_HANDSHAKE_TIMEOUT



class Worker:
    """Serve one socket until shutdown, a signal, the idle timeout or the client leaving."""

    def __init__(
        self,
        sid: str,
        sock_path: str | os.PathLike[str],
        *,
        version: str = PROTOCOL_VERSION,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        sandbox: bool = True,
        max_memory: int = DEFAULT_MAX_MEMORY,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        registry: Registry | None = None,
        allow_uids: Iterable[int] = (),
        allow_env: Iterable[str] = (),
        log_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.sid = sid
        self.sock_path = Path(sock_path)
        self.version = version
        self.idle_timeout = seconds("idle_timeout", idle_timeout, DEFAULT_IDLE_TIMEOUT,
                                    allow_zero=True)
        self.handshake_timeout = seconds("handshake_timeout", handshake_timeout,
                                         DEFAULT_HANDSHAKE_TIMEOUT, allow_zero=False)
        self.max_line_bytes = max_line_bytes
        self.registry = registry
        self.allowed_uids = frozenset({os.geteuid(), *allow_uids})
        self.log_file = Path(log_file) if log_file else None
        self.session: LuaSession | None = None
        self._factory = SessionFactory(sandbox=sandbox, max_memory=max_memory,
                                       allow_env=frozenset(allow_env))
        self._last_log: object = None
        self.exit_reason = ""
        self._lua = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lua")
        self._lua_call: Future[Step] | None = None
        self._interrupt_reason: str | None = None
        self._active: _ClientConnection | None = None
        self._waiting: deque[_ClientConnection] = deque()
        self._idle_status = encode_response(self._status(False))
        self._stop: asyncio.Event | None = None
        self._last_activity = 0.0
        self._prewarm_later: asyncio.TimerHandle | None = None

    async def serve(self) -> str:
        """Run until told to stop; returns why it stopped.

        Raises ``InsecureSocketError`` (before binding) if the socket's existing
        directory is not private to us.
        """
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._last_activity = loop.time()
        ensure_private_dir(self.sock_path.parent)
        self._remove_stale_socket()
        server = await loop.create_unix_server(lambda: _ClientConnection(self),
                                               sock=self._listen())
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, f"signal {signal.Signals(signum).name}")
        watchdog = asyncio.create_task(self._watch_idle())
        self.prewarm()
        log.info("worker %s serving %s (protocol %s)", self.sid, self.sock_path, self.version)
        try:
            await self._stop.wait()
        finally:
            watchdog.cancel()
            server.close()
            for conn in (self._active, *self._waiting):
                if conn is not None:
                    conn.close()
            self._cleanup()
            await self._wind_down_lua()
        return self.exit_reason

    def stop(self, reason: str) -> None:
        """Ask the serve loop to exit (idempotent); a running Lua call is interrupted."""
        if self._stop is not None and not self._stop.is_set():
            self.exit_reason = reason
            log.info("worker %s stopping: %s", self.sid, reason)
            self.interrupt(reason)
            self._stop.set()

    def prewarm(self) -> None:
        """Start building the next run's Lua VM (on the factory's own thread)."""
        self._factory.prewarm(wait=False)

    def prewarm_after_reply(self) -> None:
        """Build the next VM now if the session ended; if it paused, once the pause
        has lasted PREWARM_PAUSED seconds. A model's answer takes far longer, so the
        build fills that wait instead of delaying the next run; an answer that comes
        at once (a scripted responder) is not slowed by a build competing with it."""
        if not self.paused:
            self.prewarm()
        elif self._prewarm_later is None:
            self._prewarm_later = asyncio.get_running_loop().call_later(
                PREWARM_PAUSED, self._prewarm_paused)

    def _prewarm_paused(self) -> None:
        self._prewarm_later = None
        if self.paused and not self.lua_running:
            self.prewarm()

    def interrupt(self, reason: str) -> None:
        """Stop the Lua call that is running now, if any (it ends as a failed session)."""
        if not self.lua_running:
            return
        self._interrupt_reason = reason
        if self.session is not None:
            self.session.interrupt(reason)

    @property
    def lua_running(self) -> bool:
        """True while Lua code is executing in the worker thread."""
        return self._lua_call is not None and not self._lua_call.done()

    @property
    def paused(self) -> bool:
        """True while a session waits for ``continue``."""
        return self.session is not None and str(self.session.state) == "paused"

    # ------------------------------------------------------ connection queue

    def _admit(self, conn: _ClientConnection) -> None:
        """A peer passed the uid check: serve it now, or after the current one."""
        if self._active is None:
            self._activate(conn)
        else:
            log.info("a client waits: another one is being served")
            self._waiting.append(conn)

    def _activate(self, conn: _ClientConnection) -> None:
        self._active = conn
        self._last_activity = asyncio.get_running_loop().time()
        conn.activate()

    def _gone(self, conn: _ClientConnection, client_left: bool) -> None:
        """A connection ended; ``client_left``: the client hung up after its handshake
        (not refused, timed out or closed by us), which may end the worker."""
        with contextlib.suppress(ValueError):
            self._waiting.remove(conn)
        if self._active is not conn:
            return
        self._active = None
        self._last_activity = asyncio.get_running_loop().time()
        if client_left:
            self.interrupt("client disconnected")
            if self.lua_running:
                return  # decided when the interrupted call returns (_after_lua)
            if not self.paused:
                self.stop("client disconnected")
                return
        self._next_client()

    def _after_lua(self) -> None:
        """A Lua call returned after its client left: wait for a reconnect, or exit."""
        if self._active is not None:
            return
        if self.paused:
            self._next_client()
        else:
            self.stop("client disconnected")

    def _next_client(self) -> None:
        while self._waiting:
            nxt = self._waiting.popleft()
            if not nxt.closed:
                self._activate(nxt)
                return

    # ------------------------------------------------------------- requests

    def handle(self, request: Request) -> bytes | None:
        """The reply to a request that needs no Lua, or None if Lua must run."""
        if isinstance(request, Status):
            if not request.include_history and self.session is None:
                return self._idle_status
            return encode_response(self._status(request.include_history))
        if isinstance(request, Shutdown):
            return encode_response(ShutdownData())
        if isinstance(request, Run):
            if self.paused:
                return error_response("worker already has an active session")
            return None
        if isinstance(request, Continue):
            s = self.session
            if s is None or not self.paused:
                return error_response("no paused session to continue")
            if request.sid != s.session_id:
                return error_response(
                    f"continue failed: unknown session id {request.sid!r} "
                    f"(the paused session is {s.session_id!r})")
            return None
        return error_response(f"malformed request: unsupported op {request.op!r}")

    async def handle_lua(self, request: Run | Continue) -> bytes:
        """Run or resume the Lua session; the encoded ``feed`` reply (or error)."""
        if self._prewarm_later is not None:  # answered quickly: no build during the pause
            self._prewarm_later.cancel()
            self._prewarm_later = None
        try:
            if isinstance(request, Run):
                session_id = new_id("s")
                step = await self._in_lua(self._start, session_id, request)
            else:
                assert self.session is not None
                session_id = self.session.session_id
                step = await self._in_lua(self.session.answer, request.query_id or "q-0",
                                          request.response, request.usage)
        except ContinueRejected as exc:
            return error_response(f"continue failed: {exc}")
        try:
            reply = self._feed(session_id, step)
            if len(reply) > self.max_line_bytes and self.session is not None:
                # the client could not read it: end the session, keep the connection
                what = "LLM queries" if step.kind == "paused" else "result"
                reason = (f"{what} too large: {len(reply)} bytes as a reply, over the "
                          f"{self.max_line_bytes}-byte line limit; return or ask less "
                          "(keep big data with alc.state or alc.card)")
                reply = self._feed(session_id, await self._in_lua(self.session.fail, reason))
            return reply
        except ResponseEncodeError as exc:
            return error_response(f"result serialize failed: {exc}")

    def _feed(self, session_id: str, step: Step) -> bytes:
        return encode_response(FeedData(session_id, self._feed_result(step),
                                        self._feed_extra(step)))

    def _start(self, session_id: str, request: Run) -> Step:
        """(Lua thread) build the session and run it to its first pause or its end."""
        self.session = self._factory.new(session_id, request.code, ctx=request.ctx,
                                         lib_paths=request.lib_paths)
        self._last_log = None
        if self._interrupt_reason is not None:
            self.session.interrupt(self._interrupt_reason)
        return self.session.start()

    async def _in_lua(self, fn: Callable[..., Step], *args: Any) -> Step:
        loop = asyncio.get_running_loop()
        self._interrupt_reason = None
        self._lua_call = self._lua.submit(fn, *args)
        try:
            return await asyncio.wrap_future(self._lua_call, loop=loop)
        finally:
            self._last_activity = loop.time()
            self._after_lua()

    def _feed_result(self, step: Step) -> FeedResult:
        if step.kind == "paused":
            return Paused(tuple(query_from_json(q) for q in step.queries))
        if step.kind == "accepted":
            return Accepted(step.remaining)
        assert self.session is not None
        outcome = (Completed(step.result) if step.kind == "done"
                   else Failed(step.error or "unknown error"))
        return Finished(outcome, self.session.metrics())

    def _feed_extra(self, step: Step) -> dict[str, Any]:
        """Ours, on Paused/Accepted replies: the session's progress and its log lines
        new since the previous reply (a Finished reply has them in its metrics)."""
        s = self.session
        if s is None or step.kind not in ("paused", "accepted"):
            return {}
        logs = s.logs()
        seen = next((i for i in range(len(logs) - 1, -1, -1) if logs[i] is self._last_log), -1)
        if logs:
            self._last_log = logs[-1]
        extra: dict[str, Any] = {"recent_logs": logs[seen + 1:]}
        if s.progress is not None:
            extra["progress"] = dict(s.progress)
        return extra

    def _status(self, include_history: bool) -> StatusData:
        """algocline's status (has_session, session_id, conversation_history) plus ours."""
        s = self.session
        paused = s is not None and self.paused
        extra: dict[str, Any] = {}
        if include_history and s is not None and paused:
            extra["conversation_history"] = s.history(HISTORY_ENTRIES)
        extra.update(state=str(s.state) if s else None, worker_sid=self.sid, pid=os.getpid())
        return StatusData(paused, s.session_id if s is not None and paused else None, extra)

    # ------------------------------------------------------------ lifecycle

    def _listen(self) -> socket.socket:
        """A listening socket at ``sock_path``, mode 0600 before anyone can reach it.

        It is bound under a temporary name and renamed into place once it
        listens, so a client that sees the socket file can connect at once.
        """
        temp = self.sock_path.with_name(f".{os.getpid()}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(temp))
            os.chmod(temp, 0o600)  # whatever the umask did
            listener.listen(16)
            os.replace(temp, self.sock_path)
        except BaseException:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        finally:
            os.umask(old_umask)
        return listener

    def _remove_stale_socket(self) -> None:
        """Clear the path of a dead worker's socket; refuse anything else found there."""
        try:
            mode = os.lstat(self.sock_path).st_mode
        except FileNotFoundError:
            return
        path = str(self.sock_path)
        if not stat.S_ISSOCK(mode):
            raise InsecureSocketError(path, "the path exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # nobody listens: a stale socket
                return
        raise InsecureSocketError(path, "another worker is listening there")

    def _cleanup(self) -> None:
        for path in (self.sock_path, self.log_file):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if self.registry is not None:
            try:
                self.registry.remove(self.sid, pid=os.getpid())
            except Exception:  # exiting anyway: say so, don't mask the exit
                log.exception("could not remove %s from the registry", self.sid)

    async def _wind_down_lua(self) -> None:
        """Give an interrupted Lua call a moment to return (``__main__`` exits regardless)."""
        if self._lua_call is not None and not self._lua_call.done():
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.wrap_future(self._lua_call), _LUA_GRACE)
        self._lua.shutdown(wait=False)

    async def _watch_idle(self) -> None:
        if self.idle_timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.idle_timeout, 1.0))
            if self.lua_running:
                self._last_activity = loop.time()
            elif loop.time() - self._last_activity >= self.idle_timeout:
                self.stop(f"idle for {self.idle_timeout:g}s")
                return


class _ClientConnection(asyncio.Protocol):
    """One client's transport around its protocol machine (which holds every rule)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.machine = WorkerConnection(worker.version, max_line_bytes=worker.max_line_bytes)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._active = False
        self._write_paused = False
        self._reading = True
        self._lingering = False
        self._handshake_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._set_reading(False)  # nothing is read before this client's turn
        creds = peer_credentials(transport.get_extra_info("socket"))
        if creds is not None and creds.uid not in self.worker.allowed_uids:
            log.warning("refused a connection from pid %d uid %d", creds.pid, creds.uid)
            transport.write(error_response(
                f"connection refused: uid {creds.uid} may not use this worker "
                "(it serves its own uid and those given with --allow-uid)"))
            self._linger()
            return
        self.worker._admit(self)

    def activate(self) -> None:
        """This client's turn: read it, and give it ``handshake_timeout`` to greet."""
        self._active = True
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.worker.handshake_timeout, self._handshake_expired)
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # after our last word: read and drop until the peer closes
        self.worker._last_activity = asyncio.get_running_loop().time()
        self.machine.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        client_left = self.machine.state in (WorkerState.READY, WorkerState.BUSY)
        self.closed = True
        self.machine.connection_lost()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.worker._gone(self, client_left)

    def pause_writing(self) -> None:
        self._write_paused = True  # the client does not read its replies: stop reading
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # internals

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _linger(self) -> None:
        """Our last reply is written: stop sending, drop input, close when the peer does.

        Closing at once with the peer's bytes unread would make the kernel reset
        the connection, and the peer could lose the reply that says why.
        """
        assert self.transport is not None
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(self.worker.handshake_timeout, self.close)
        self._set_reading(True)

    def _handshake_expired(self) -> None:
        if self.machine.state is WorkerState.AWAIT_HANDSHAKE and not self.closed:
            log.warning("closing a connection that did not complete its handshake in %gs",
                        self.worker.handshake_timeout)
            self.close()

    def _pump(self) -> None:
        machine = self.machine
        while True:
            event = machine.next_event()
            if isinstance(event, RequestReceived):
                request = event.request
                try:
                    reply = self.worker.handle(request)
                except Exception as exc:  # a bug of ours: say so, keep the connection
                    log.exception("internal error answering %s", request.op)
                    reply = error_response(f"internal worker error: {exc!r}")
                if reply is None:
                    assert isinstance(request, (Run, Continue))
                    task = asyncio.get_running_loop().create_task(
                        self.worker.handle_lua(request))
                    task.add_done_callback(self._lua_done)
                    break
                machine.send_reply(reply)
                if isinstance(request, Shutdown):
                    machine.close_after_reply("shutdown requested")
                    self.worker.stop("shutdown requested")
                continue
            if isinstance(event, ConnectionClosing):
                self._flush()
                self._linger()
                return
            break
        if machine.state is WorkerState.BUSY and machine.shutdown_requested:
            self.worker.interrupt("shutdown requested")
        self._flush()
        self._update_reading()

    def _lua_done(self, task: asyncio.Task[bytes]) -> None:
        if self.closed or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("internal error while running Lua", exc_info=exc)
            reply = error_response(f"internal worker error: {exc!r}")
        else:
            reply = task.result()
        self.machine.send_reply(reply)
        self._pump()
        self.worker.prewarm_after_reply()

    def _flush(self) -> None:
        data = self.machine.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _update_reading(self) -> None:
        self._set_reading(self._lingering or (
            self._active and not self._write_paused and self.machine.wants_read))

    def _set_reading(self, on: bool) -> None:
        if on == self._reading or self.transport is None or self.transport.is_closing():
            return
        self._reading = on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()
