"""Shared test doubles: a scriptable fake worker on a real Unix socket.

The fake speaks the protocol by default (handshake echo, status, a run that
pauses, a continue that finishes, shutdown) and every reply can be replaced by
a script of steps, so tests can make a real socket misbehave in each way a
worker can: delay, dribble, partial lines, close mid-line, hang, extra lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pool_notebook import PROTOCOL_VERSION
from pool_notebook.registry import pid_alive
from pool_notebook.spawn import reap_children


@dataclass
class Dribble:
    """Send these bytes one at a time, with a loop turn between bytes."""

    data: bytes


CLOSE = object()  # step: close the connection
HANG = object()  # step: never answer

Step = Any
Script = Callable[[dict[str, Any]], list[Step]]


def ok(data: dict[str, Any]) -> bytes:
    return json.dumps({"ok": True, "data": data, "error": None}).encode() + b"\n"


def err(message: str) -> bytes:
    return json.dumps({"ok": False, "data": None, "error": message}).encode() + b"\n"


def default_reply(req: dict[str, Any], version: str = PROTOCOL_VERSION) -> list[Step]:
    op = req.get("op")
    if op == "handshake":
        return [ok({"kind": "handshake", "version": version})]
    if op == "status":
        return [ok({"kind": "status", "has_session": False, "session_id": None})]
    if op == "run":
        paused = {"Paused": {"queries": [{"id": "q-0", "prompt": "2+2?", "system": None,
                                          "max_tokens": 1024}]}}
        return [ok({"kind": "feed", "session_id": "s-1", "feed_result": paused})]
    if op == "continue":
        done = {"Finished": {"state": {"Completed": {"result": req.get("response")}},
                             "metrics": {"llm_calls": 1}}}
        return [ok({"kind": "feed", "session_id": "s-1", "feed_result": done})]
    if op == "shutdown":
        return [ok({"kind": "shutdown"}), CLOSE]
    if op == "echo":
        return [ok({"kind": "echo", "token": req.get("token")})]
    return [err(f"malformed request: unknown op {op!r}")]


class FakeWorker:
    """An in-process worker on a real Unix socket in a private temp directory."""

    def __init__(
        self,
        script: Script | None = None,
        *,
        version: str = PROTOCOL_VERSION,
        greeting: list[Step] | None = None,
        read_limit: int = 64 * 1024 * 1024,
    ) -> None:
        self.script = script
        self.version = version
        self.greeting = greeting or []
        self.read_limit = read_limit
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self._dir = tempfile.TemporaryDirectory(prefix="pn-fake-")
        os.chmod(self._dir.name, 0o700)
        self.sock_path = os.path.join(self._dir.name, "w.sock")
        self._server: asyncio.AbstractServer | None = None
        self.paused_reading = asyncio.Event()

    async def __aenter__(self) -> FakeWorker:
        self._server = await asyncio.start_unix_server(
            self._serve, self.sock_path, limit=self.read_limit
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._dir.cleanup()

    def replies_for(self, req: dict[str, Any]) -> list[Step]:
        if self.script is not None:
            steps = self.script(req)
            if steps is not None:
                return steps
        return default_reply(req, self.version)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if not await self._play(self.greeting, writer):
                return
            while True:
                line = await reader.readline()
                if not line:
                    return
                req = json.loads(line)
                self.requests.append(req)
                if not await self._play(self.replies_for(req), writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    async def _play(self, steps: list[Step], writer: asyncio.StreamWriter) -> bool:
        for step in steps:
            if step is CLOSE:
                writer.close()
                return False
            if step is HANG:
                await asyncio.Event().wait()
            elif isinstance(step, (int, float)):
                await asyncio.sleep(step)
            elif isinstance(step, Dribble):
                for i in range(len(step.data)):
                    writer.write(step.data[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(step)
                await writer.drain()
        return True


#: A map's two model rounds per input: the second prompt carries the first answer.
TWO_ROUNDS = ('local a = alc.llm("first " .. tostring(ctx.input))\n'
              'return alc.llm("second " .. a)')


async def slow_echo(query: Any) -> str:
    """A simulated model, 50 ms per answer (Dask ships it to its workers by reference)."""
    await asyncio.sleep(0.05)
    return f"<{query.prompt}>"


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    """Wait until process ``pid`` is gone (our exited children reaped, zombies count as
    gone); False if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap_children()
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def run(coro: Any) -> Any:
    """Run a coroutine on a fresh loop (each test gets its own)."""
    return asyncio.run(coro)


# ----------------------------------------------- an OpenAI-compatible chat server (llm)


@dataclass
class ChatFailure:
    """A scripted failure: answer the next ``count`` requests with ``status``."""

    status: int
    count: int = 1
    retry_after: str | None = None


class FakeChatServer:
    """A loopback ``/v1/chat/completions`` server speaking OpenAI's format, for the real SDK.

    Each request is answered by ``answer(body, n)`` (n = 1-based arrival number; by
    default ``"sample n: <prompt>"``, so identical prompts get distinct samples),
    after ``delay`` seconds, with ``usage`` counted in words. ``fail(...)`` scripts
    429s (with ``retry-after``) or 5xx; ``outage = 500`` fails everything until
    reset. It records every request body and path, and the most requests it held at once.
    Runs in its own threads, so it is independent of the test's event loop.
    """

    def __init__(self, *, delay: float = 0.0,
                 answer: Callable[[dict[str, Any], int], str] | None = None) -> None:
        self.delay = delay
        self.answer = answer or (lambda body, n: f"sample {n}: {body['messages'][-1]['content']}")
        self.outage: int | None = None
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.keys: list[str | None] = []  # the API key each request carried
        self.statuses: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._failures: list[ChatFailure] = []
        self._lock = threading.Lock()
        self._httpd = _ChatHTTPServer(("127.0.0.1", 0), _chat_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def calls(self) -> int:
        """Requests received (failed ones included)."""
        return len(self.requests)

    def fail(self, status: int, count: int = 1, retry_after: str | None = None) -> None:
        with self._lock:
            self._failures.append(ChatFailure(status, count, retry_after))

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def handle(self, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Status, headers and JSON body for one request (called on a server thread)."""
        with self._lock:
            self.requests.append(body)
            n = len(self.requests)
            failure = self._failures[0] if self._failures else None
            if failure is not None:
                failure.count -= 1
                if failure.count <= 0:
                    self._failures.pop(0)
            status = failure.status if failure else self.outage
            self.statuses.append(status or 200)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if status is not None:
                retry_after = failure.retry_after if failure else None
                headers = {"retry-after": retry_after} if retry_after else {}
                return status, headers, {"error": {"message": f"scripted failure {status}",
                                                   "type": "server_error", "code": None}}
            time.sleep(self.delay)
            text = self.answer(body, n)
            prompt_words = sum(len(str(m["content"]).split()) for m in body["messages"])
            return 200, {}, {
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(text.split()),
                          "total_tokens": prompt_words + len(text.split())},
            }
        finally:
            with self._lock:
                self.in_flight -= 1


class _ChatHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of concurrent connects must not overflow the backlog


def _chat_handler(server: FakeChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length))
            server.paths.append(self.path)
            auth = self.headers.get("Authorization")
            server.keys.append(auth.removeprefix("Bearer ") if auth else
                               self.headers.get("api-key"))  # Azure sends api-key
            path = self.path.partition("?")[0]  # Azure: /openai/deployments/D/chat/completions
            if not path.endswith("/chat/completions"):
                status, headers, reply = 404, {}, {"error": {"message": f"no {self.path}"}}
            else:
                status, headers, reply = server.handle(body)
            data = json.dumps(reply).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except ConnectionError:  # the client gave up waiting (its timeout)
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler


def kernel_outputs(kc: Any, msg_ids: list[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
    """A real kernel's outputs per executed cell (``msg_id``), until every cell went idle."""
    results = {m: {"stdout": "", "data": [], "error": None, "status": None} for m in msg_ids}
    pending = set(msg_ids)
    deadline = time.monotonic() + timeout
    while pending:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"kernel stopped answering; cells never finished: {pending}") from None
        parent = msg["parent_header"].get("msg_id")
        if parent not in results:
            continue
        kind, content = msg["msg_type"], msg["content"]
        r = results[parent]
        if kind == "stream":
            r["stdout"] += content["text"]
        elif kind in ("execute_result", "display_data"):
            r["data"].append(content["data"])
        elif kind == "error":
            r["error"] = f"{content['ename']}: {content['evalue']}"
            r["traceback"] = content["traceback"]
        elif kind == "status" and content["execution_state"] == "idle":
            pending.discard(parent)
    return results


def run_cell(kc: Any, code: str, timeout: float = 60) -> dict[str, Any]:
    """Execute ``code`` in the kernel client ``kc``; its outputs (:func:`kernel_outputs`)."""
    msg_id = kc.execute(code)
    return kernel_outputs(kc, [msg_id], timeout)[msg_id]
