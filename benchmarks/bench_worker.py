"""The bundled worker, before and after: spawn-to-ready and the status round trip.

``python benchmarks/run.py worker`` (or ``python benchmarks/bench_worker.py
[--before REF] [--rounds N]``). "after" is the working tree; "before" is the
worker of git ``REF`` (default: the commit before the worker's state machine,
import diet and fault work), extracted into a temporary directory and spawned
with that tree first on ``PYTHONPATH``. Both run in the same process,
interleaved round by round, through the same (current) ``PoolClient``:

- spawn-to-ready: ``spawn_and_connect`` (process start, imports, socket, handshake);
- status round trip: N ``status`` requests on one connection, p50/p99 and req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pool_notebook.spawn import spawn_and_connect

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BEFORE = "81264a7"  # before: protocol/worker.py, server rewrite, import diet
N = 2000


def _extract(ref: str) -> Path:
    """``pool_notebook/`` of ``ref`` in a fresh temporary directory."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "pool_notebook"],
                          check=True, capture_output=True).stdout
    target = Path(tempfile.mkdtemp(prefix="pnb-before-"))
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(target, filter="data")
    return target


def _version(tree: Path | None) -> str:
    code = "from pool_notebook._version import PROTOCOL_VERSION as v; print(v)"
    env = {**os.environ, "PYTHONPATH": str(tree or REPO)}
    return subprocess.run([sys.executable, "-P", "-c", code], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


#: -P: no current directory on sys.path, so PYTHONPATH picks the tree measured.
COMMAND = "{python} -P -m pool_notebook.worker --sid {sid} --sock {sock}"


def tree_env(tree: Path | None) -> dict[str, str]:
    """The environment that makes COMMAND run the worker of ``tree`` (None: this one)."""
    return {"PYTHONPATH": str(tree or REPO)}


async def _one(tree: Path | None, version: str, n: int) -> tuple[float, list[float]]:
    t = time.perf_counter()
    client, _w = await spawn_and_connect(COMMAND, env=tree_env(tree), version=version)
    ready = time.perf_counter() - t
    rtts = []
    async with client:
        for _ in range(n):
            t = time.perf_counter()
            await client.status()
            rtts.append(time.perf_counter() - t)
        await client.shutdown()
    return ready, rtts


def p50_p99_us(samples: list[float]) -> tuple[float, float]:
    """Median and 99th percentile of ``samples`` (seconds), in microseconds."""
    ordered = sorted(samples)
    return (statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6)


async def _main(before_ref: str, rounds: int, n: int) -> None:
    before = _extract(before_ref)
    trees = {"before": before, "after": None}
    versions = {name: _version(tree) for name, tree in trees.items()}
    spawn: dict[str, list[float]] = {name: [] for name in trees}
    rtt: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(rounds):  # interleaved: both see the same machine noise
        for name, tree in trees.items():
            ready, samples = await _one(tree, versions[name], n)
            spawn[name].append(ready)
            rtt[name].extend(samples)
    print(f"\n## bundled worker (before = {before_ref}, after = working tree; "
          f"{rounds} interleaved rounds, {n} status requests each)\n")
    print("| worker | spawn-to-ready median ms | status p50 µs | status p99 µs | req/s |")
    print("|---|---|---|---|---|")
    for name in trees:
        p50, p99 = p50_p99_us(rtt[name])
        print(f"| {name} | {statistics.median(spawn[name]) * 1000:.0f} | {p50:.1f} | "
              f"{p99:.1f} | {1e6 / p50:,.0f} |")
    ratio = statistics.median(spawn["before"]) / statistics.median(spawn["after"])
    print(f"\nspawn-to-ready before/after = {ratio:.2f}x (target: spawn <= 300 ms); "
          f"status round trip target >= 10k req/s on one connection")


def before_after_args(doc: str | None, argv: list[str] | None, n: int,
                      n_help: str) -> argparse.Namespace:
    """The options of a before/after benchmark (--before, --rounds, -n), and a private home."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git ref of 'before'")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", type=int, default=n, help=n_help)
    opts = parser.parse_args(argv if argv is not None else [])
    os.environ.setdefault("POOL_NOTEBOOK_HOME", tempfile.mkdtemp(prefix="pnb-home-"))
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = before_after_args(__doc__, argv, N, "status requests per round")
    asyncio.run(_main(opts.before, opts.rounds, opts.n))


if __name__ == "__main__":
    main(sys.argv[1:])
