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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pool_notebook import PROTOCOL_VERSION


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


def run(coro: Any) -> Any:
    """Run a coroutine on a fresh loop (each test gets its own)."""
    return asyncio.run(coro)
