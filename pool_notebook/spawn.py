"""Start worker processes that survive a kernel restart, and connect to them.

A worker runs in its own session (``setsid``) so a kernel restart does not kill
it; once its client is gone it exits, unless a session is paused (then it waits
for a reconnect, up to its idle timeout). It gets a fresh algocline-style sid,
its socket in the private pool directory and its output in ``<sid>.log`` beside
it (removed when it exits cleanly; ``Registry.gc`` removes those of dead
workers). The command is a template, so other workers can be spawned the same
way, e.g. algocline's ``alc pool-worker --sid {sid} --sock {sock}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import PoolClient
from .errors import ConnectError, SpawnError
from .registry import LOG_FILE_ENV, Registry, WorkerEntry, new_id, pool_dir
from .security import ensure_private_dir

__all__ = ["DEFAULT_COMMAND", "WorkerProcess", "new_sid", "reap_children", "spawn_and_connect",
           "spawn_worker"]

#: The bundled worker. Placeholders: {python}, {sid}, {sock}.
DEFAULT_COMMAND = "{python} -m pool_notebook.worker --sid {sid} --sock {sock}"

_MAX_SOCK_PATH = 107  # sun_path is 108 bytes with its NUL

_children: list[subprocess.Popen[bytes]] = []


def new_sid() -> str:
    """A worker id like algocline's: ``p-<hex nanos>-<16 hex>``."""
    return new_id("p")


def reap_children() -> None:
    """Collect exit statuses of spawned workers that have exited (no zombies)."""
    _children[:] = [p for p in _children if p.poll() is None]


@dataclass(frozen=True)
class WorkerProcess:
    """A spawned worker: where it listens and where its log is."""

    sid: str
    pid: int
    sock: str
    log_path: str
    argv: tuple[str, ...]


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


def _argv(command: str | Sequence[str], sid: str, sock: str) -> list[str]:
    parts = shlex.split(command) if isinstance(command, str) else list(command)
    if not parts:
        raise SpawnError("the worker command is empty")
    values = {"python": sys.executable, "sid": sid, "sock": sock}
    try:
        return [part.format(**values) for part in parts]
    except (KeyError, IndexError, ValueError) as exc:
        raise SpawnError(
            f"bad worker command template {command!r}: {exc!r} "
            "(placeholders are {python}, {sid} and {sock})"
        ) from exc


async def spawn_worker(
    command: str | Sequence[str] | None = None,
    *,
    directory: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 5.0,
    poll_interval: float = 0.01,
) -> WorkerProcess:
    """Start a worker in its own session and wait until its socket exists.

    Raises ``SpawnError`` with the exit status and the tail of the worker's log
    if it exits first or does not create its socket within ``timeout``.
    """
    reap_children()
    base = ensure_private_dir(directory or pool_dir())
    sid = new_sid()
    sock = str(base / f"{sid}.sock")
    if len(os.fsencode(sock)) > _MAX_SOCK_PATH:
        raise SpawnError(f"socket path {sock} is longer than the {_MAX_SOCK_PATH} bytes Unix "
                         "sockets allow; set POOL_NOTEBOOK_HOME to a shorter directory")
    log_path = base / f"{sid}.log"
    argv = _argv(command or DEFAULT_COMMAND, sid, sock)
    child_env = {**os.environ, LOG_FILE_ENV: str(log_path), **(env or {})}
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=child_env,
            start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        raise SpawnError(f"cannot start worker {argv[0]!r}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    _children.append(proc)
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if proc.poll() is not None:
            raise SpawnError(f"worker {shlex.join(argv)} exited before creating its socket",
                             returncode=proc.returncode, stderr_tail=_tail(log_path))
        if time.monotonic() >= deadline:
            _terminate(proc)
            raise SpawnError(f"worker {shlex.join(argv)} did not create {sock} within "
                             f"{timeout:g}s; it was stopped", returncode=proc.returncode,
                             stderr_tail=_tail(log_path))
        await asyncio.sleep(poll_interval)
    return WorkerProcess(sid, proc.pid, sock, str(log_path), tuple(argv))


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(1.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def spawn_and_connect(
    command: str | Sequence[str] | None = None,
    *,
    registry: Registry | None = None,
    spawn_timeout: float = 5.0,
    env: Mapping[str, str] | None = None,
    **connect_options: Any,
) -> tuple[PoolClient, WorkerProcess]:
    """Spawn a worker, connect to it, and register it; returns both.

    ``connect_options`` go to :meth:`PoolClient.connect` (``version``,
    ``handshake_timeout`` ...). If the connection fails the worker is stopped.
    """
    registry = registry or Registry.default()
    worker = await spawn_worker(command, directory=registry.path.parent, env=env,
                                timeout=spawn_timeout)
    deadline = time.monotonic() + spawn_timeout
    try:
        while True:
            try:
                client = await PoolClient.connect(worker.sock, **connect_options)
                break
            except ConnectError as exc:
                # the socket file exists from bind(); connect is refused until listen()
                if not isinstance(exc.__cause__, ConnectionRefusedError) or \
                        time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.005)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, 15)
        raise
    registry.add(WorkerEntry.new(worker.sid, worker.pid, worker.sock,
                                 client.server_version or ""))
    return client, worker
