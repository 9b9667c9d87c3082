"""The client round trip, side by side: ours (before/after, asyncio/uvloop) vs baselines.

``python benchmarks/run.py client`` (or ``python benchmarks/bench_client.py
[--before REF] [--rounds N] [--delay-us D]``). A stub responder in another
process answers every request with a fixed ``status`` reply (after busy-waiting
``--delay-us``, to stand in for a worker that computes). Measured in the same
run, interleaved round by round, N ``status`` requests each:

- a blocking ``socket`` client (the floor: ``sendall`` + buffered ``readline``);
- naive asyncio streams (``open_unix_connection``, ``write``/``drain``/``readline``);
- ours, ``PoolClient`` on asyncio and on uvloop, and with polling off;
- ours "before": ``pool_notebook/client.py`` of git ``REF`` (default: the commit
  before the protocol state machine), run against the current protocol package.

Then a fan-out: one ``status`` to each of 16 stub responders at once
(``asyncio.gather`` on one loop), against one round trip alone; these stubs
sleep 200 µs per reply, so a client that sends every request before waiting
finishes in about one round trip and one that serialises them in about 16.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import uvloop
from bench_worker import p50_p99_us

from pool_notebook import PROTOCOL_VERSION, PoolClient, protocol

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BEFORE = "81264a7"  # the client with its own phase strings and loop._ready
N = 2000
FAN_OUT = 16
#: Fan-out stubs sleep this long per reply: 16 busy stubs on a 2-core machine would make
#: any fan-out CPU-bound, hiding whether the client sends all requests before waiting.
FAN_OUT_SLEEP = 200e-6
STATUS = protocol.encode_request(protocol.Status())
STATUS_OK = protocol.encode_response(protocol.StatusData(False))
HELLO = protocol.encode_request(protocol.Handshake(PROTOCOL_VERSION))


def _stub(path: str, ready: EventType, delay: float, sleep: float) -> None:
    """A blocking responder: echo the handshake, answer anything else with STATUS_OK.

    Before each reply it busy-waits ``delay`` (a worker computing) and sleeps
    ``sleep`` seconds (a worker waiting, without using a core).
    """
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    ready.set()
    while True:
        conn, _ = srv.accept()
        buf = b""
        while data := conn.recv(65536):
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if b'"handshake"' in line:
                    hello = protocol.HandshakeData(json.loads(line)["version"])
                    conn.sendall(protocol.encode_response(hello))
                    continue
                until = time.perf_counter() + delay
                while time.perf_counter() < until:
                    pass
                if sleep:
                    time.sleep(sleep)
                conn.sendall(STATUS_OK)
        conn.close()


def _start_stubs(
    n: int, delay: float, sleep: float = 0.0
) -> tuple[list[str], list[multiprocessing.Process]]:
    d = tempfile.mkdtemp(prefix="pnb-client-")
    os.chmod(d, 0o700)
    paths, procs = [], []
    for i in range(n):
        path = os.path.join(d, f"stub{i}.sock")
        ready = multiprocessing.Event()
        proc = multiprocessing.Process(target=_stub, args=(path, ready, delay, sleep),
                                       daemon=True)
        proc.start()
        ready.wait(10)
        paths.append(path)
        procs.append(proc)
    return paths, procs


Run = tuple[list[float], float]  # round-trip times (s), and this thread's CPU time (s)


def _blocking(path: str) -> Run:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rb")
    s.sendall(HELLO)
    f.readline()
    out = []
    cpu = time.thread_time()
    for _ in range(N):
        t = time.perf_counter()
        s.sendall(STATUS)
        protocol.decode_response(f.readline())
        out.append(time.perf_counter() - t)
    cpu = time.thread_time() - cpu
    s.close()
    return out, cpu


async def _naive(path: str) -> Run:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(HELLO)
    await reader.readline()
    out = []
    cpu = time.thread_time()
    for _ in range(N):
        t = time.perf_counter()
        writer.write(STATUS)
        await writer.drain()
        protocol.decode_response(await reader.readline())
        out.append(time.perf_counter() - t)
    cpu = time.thread_time() - cpu
    writer.close()
    return out, cpu


async def _ours(client_class: Any, path: str, **options: Any) -> Run:
    out = []
    async with await client_class.connect(path, allow_insecure=True, **options) as c:
        cpu = time.thread_time()
        for _ in range(N):
            t = time.perf_counter()
            await c.status()
            out.append(time.perf_counter() - t)
        cpu = time.thread_time() - cpu
    return out, cpu


async def _fan_out(
    client_class: Any, paths: list[str], rounds: int
) -> tuple[list[float], list[float]]:
    """(one round trip alone, one status to every path at once) per iteration, seconds."""
    clients = [await client_class.connect(p, allow_insecure=True) for p in paths]
    single, fan = [], []
    try:
        for _ in range(rounds):
            t = time.perf_counter()
            await clients[0].status()
            single.append(time.perf_counter() - t)
            t = time.perf_counter()
            await asyncio.gather(*(c.status() for c in clients))
            fan.append(time.perf_counter() - t)
    finally:
        for c in clients:
            c.close()
    return single, fan


def _before_client(ref: str) -> ModuleType:
    """``pool_notebook/client.py`` of ``ref``, imported beside the current package."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:pool_notebook/client.py"],
                            check=True, capture_output=True).stdout
    path = Path(tempfile.mkdtemp(prefix="pnb-before-")) / "client_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("pool_notebook._client_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _on(loop: str, coro: Coroutine[Any, Any, Run]) -> Run:
    return uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git ref of the 'before' client")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delay-us", type=float, default=0.0,
                        help="stub busy-waits this long before each reply")
    args = parser.parse_args(argv)
    before = _before_client(args.before).PoolClient
    (path,), procs = _start_stubs(1, args.delay_us * 1e-6)
    clients: dict[str, Callable[[], Run]] = {
        "blocking socket": lambda: _blocking(path),
        "naive asyncio streams": lambda: asyncio.run(_naive(path)),
        "ours, asyncio": lambda: _on("asyncio", _ours(PoolClient, path)),
        "ours, uvloop": lambda: _on("uvloop", _ours(PoolClient, path)),
        "ours, asyncio, no polling (spin_seconds=0)":
            lambda: _on("asyncio", _ours(PoolClient, path, spin_seconds=0)),
        f"ours before ({args.before}), asyncio": lambda: _on("asyncio", _ours(before, path)),
        f"ours before ({args.before}), uvloop": lambda: _on("uvloop", _ours(before, path)),
    }
    runs: dict[str, list[float]] = {name: [] for name in clients}
    cpu: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for _ in range(args.rounds):
            for name, fn in clients.items():
                samples, seconds = fn()
                runs[name] += samples
                cpu[name].append(seconds / N)
    finally:
        for proc in procs:
            proc.kill()
    floor = p50_p99_us(runs["blocking socket"])[0]
    cpu_floor = min(cpu["blocking socket"])
    print(f"\n## client: status round trip vs a stub responder (delay {args.delay_us:g} µs, "
          f"{args.rounds}x{N} requests each, interleaved)\n")
    print("| client | p50 µs | p99 µs | p50 / blocking | client CPU µs/request | CPU / blocking |")
    print("|---|---|---|---|---|---|")
    for name, samples in runs.items():
        p50, p99 = p50_p99_us(samples)
        used = min(cpu[name])
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {p50 / floor:.2f}x | {used * 1e6:.1f} | "
              f"{used / cpu_floor:.2f}x |")
    print("\ntarget: ours <= 1.05x the blocking socket. CPU is this thread's own time "
          "(time.thread_time, best round): steadier than wall time on a shared machine.")

    paths, procs = _start_stubs(FAN_OUT, 0.0, FAN_OUT_SLEEP)
    try:
        print(f"\n## client: fan-out, one status to each of {FAN_OUT} stub responders at once "
              f"(each waits {FAN_OUT_SLEEP * 1e6:g} µs before replying, using no CPU)\n")
        print("| client | one round trip p50 µs | fan-out p50 µs | fan-out / one |")
        print("|---|---|---|---|")
        for name, client_class in (("ours", PoolClient), (f"ours before ({args.before})", before)):
            for loop in ("asyncio", "uvloop"):
                runner = uvloop.run if loop == "uvloop" else asyncio.run
                single, fan = runner(_fan_out(client_class, paths, 200 * args.rounds))
                one, all_ = p50_p99_us(single)[0], p50_p99_us(fan)[0]
                print(f"| {name}, {loop} | {one:.1f} | {all_:.1f} | {all_ / one:.1f}x |")
        print(f"\n(serialised, the fan-out would cost about {FAN_OUT}x one round trip)")
    finally:
        for proc in procs:
            proc.kill()


if __name__ == "__main__":
    main()
