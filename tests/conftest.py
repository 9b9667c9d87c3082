"""Fixtures: a private POOL_NOTEBOOK_HOME per test, and worker cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pool_notebook import spawn
from pool_notebook._version import PROTOCOL_VERSION
from pool_notebook.registry import Registry


@pytest.fixture(autouse=True)
def _keep_main_module() -> Iterator[None]:
    """An in-process InteractiveShell swaps ``sys.modules['__main__']`` for its user module
    (no ``__spec__``), which breaks multiprocessing's spawn in later tests: put it back."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture
def pool_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated package home; every worker registered in it is stopped afterwards."""
    home = Path(tempfile.mkdtemp(prefix="pn-", dir="/tmp"))  # short: sun_path is 108 bytes
    monkeypatch.setenv("POOL_NOTEBOOK_HOME", str(home))
    monkeypatch.setenv("ALC_HOME", str(tmp_path / "alc"))
    monkeypatch.setenv("POOL_NOTEBOOK_HISTORY", str(tmp_path / "history.sqlite"))
    monkeypatch.setenv("POOL_NOTEBOOK_WIDGETS", "0")
    yield home
    try:
        entries = Registry.default().entries()
    except Exception:
        entries = []
    for entry in entries:
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry.pid, signal.SIGKILL)
    for child in spawn._children:  # a worker whose entry is gone must not outlive its test
        if child.poll() is None:
            child.kill()
            child.wait()
    shutil.rmtree(home, ignore_errors=True)


# ------------------------------------------- the bundled worker as a bare subprocess


class RawConnection:
    """A blocking client socket speaking JSON lines (no PoolClient in between)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + 10
        while True:  # a stale socket may be in the way until the worker replaces it
            try:
                self.sock.connect(path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rb")

    def send(self, obj: dict[str, Any] | bytes) -> None:
        self.sock.sendall(obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n")

    def recv(self) -> Any:
        line = self.file.readline()
        assert line.endswith(b"\n"), f"connection closed (got {line[:200]!r})"
        return json.loads(line)

    def ask(self, obj: dict[str, Any] | bytes) -> Any:
        self.send(obj)
        return self.recv()

    def hello(self, version: str = PROTOCOL_VERSION) -> Any:
        return self.ask({"op": "handshake", "version": version})

    def at_eof(self) -> bool:
        """True once the worker closed the connection (a reset counts: closing a socket
        with our unread bytes in it sends RST instead of FIN)."""
        try:
            return self.file.readline() == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class WorkerProc:
    """``python -m pool_notebook.worker`` on a socket in a fresh 0700 directory."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 sock_dir: Path | None = None) -> None:
        self.dir = sock_dir or Path(tempfile.mkdtemp(prefix="pnw-", dir="/tmp"))
        self.sock = str(self.dir / "w.sock")
        self.sid = f"p-test-{os.getpid()}-{time.monotonic_ns()}"
        fd, log = tempfile.mkstemp(prefix="pnw-", suffix=".log", dir="/tmp")
        self.log = Path(log)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pool_notebook.worker", "--sid", self.sid,
             "--sock", self.sock, "--registry", str(self.dir / "registry.json"), *args],
            env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd)
        os.close(fd)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock) and self.proc.poll() is None:
            assert time.monotonic() < deadline, "the worker did not create its socket"
            time.sleep(0.01)

    def connect(self, greet: bool = True) -> RawConnection:
        conn = RawConnection(self.sock)
        if greet:
            reply = conn.hello()
            assert reply["ok"] is True, reply
        return conn

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.unlink(missing_ok=True)
        if self.dir.name.startswith("pnw-"):
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def start_worker() -> Iterator[Callable[..., WorkerProc]]:
    """Start bundled workers as subprocesses; every one is killed afterwards."""
    started: list[WorkerProc] = []

    def start(*args: str, env: dict[str, str] | None = None,
              sock_dir: Path | None = None) -> WorkerProc:
        worker = WorkerProc(*args, env=env, sock_dir=sock_dir)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


# ---------------------------------------------- event loops: asyncio and uvloop


def _run_on(new_loop: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> Any:
    """``asyncio.run`` on a loop made by ``new_loop`` (3.10 has no ``asyncio.Runner``)."""
    loop = new_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        leftover = asyncio.all_tasks(loop)
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    """Run a coroutine on a fresh loop of each kind: the test runs once per loop."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return lambda coro: _run_on(uvloop.new_event_loop, coro)
    return lambda coro: _run_on(asyncio.new_event_loop, coro)


@pytest.fixture
def kernel(pool_home: Path) -> Iterator[Any]:
    """A real ipykernel with the widgets on, as JupyterLab starts it: (manager, client)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env={**os.environ, "POOL_NOTEBOOK_WIDGETS": "1"})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        yield km, kc
    finally:
        kc.execute("%pool_disconnect --all --shutdown", store_history=False)
        time.sleep(0.5)
        kc.stop_channels()
        km.shutdown_kernel(now=True)
