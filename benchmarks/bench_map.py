"""pool_notebook.map: a 256-input map against its ideal time, and per-row overhead.

1. spawn: ``WorkerPool.spawn(16)`` (16 bundled workers started concurrently),
   reported on its own;
2. the map: 256 inputs, two simulated model rounds of 50 ms each (an async
   responder that sleeps), on those 16 workers (spawn excluded): wall time vs
   the ideal 256 x 2 x 50 ms / 16 = 1.6 s;
3. per-row overhead with instant answers (the same two-round code, the
   responder returns at once): wall time per row on 16 workers and on 1.
Medians over interleaved rounds (the machine is shared and noisy); the history
is recorded in memory. Run: ``python benchmarks/run.py map``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pool_notebook import spawn
from pool_notebook.connections import manager
from pool_notebook.history import History
from pool_notebook.mapping import WorkerPool, pool_map
from pool_notebook.protocol import Query
from tests.fakes import TWO_ROUNDS

INPUTS = 256
WORKERS = 16
ROUNDS_PER_INPUT = 2
DELAY = 0.05
REPEATS = 3
CODE = TWO_ROUNDS


async def _slow(query: Query) -> str:
    await asyncio.sleep(DELAY)
    return query.prompt


async def _instant(query: Query) -> str:
    return query.prompt


_CPU: list[float] = []  # this process's CPU seconds per row of each slow map


async def _timed_map(pool: WorkerPool, respond: object, n: int) -> float:
    start, cpu = time.perf_counter(), time.process_time()
    df = await pool_map(CODE, list({"input": i} for i in range(n)), workers=pool,
                        respond=respond, progress=False)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    if respond is _slow:
        _CPU.append((time.process_time() - cpu) / n)
    assert (df["state"] == "completed").all(), df["error"].dropna().head()
    return elapsed


async def _main() -> None:
    spawn_s: list[float] = []
    wall: list[float] = []
    per_row_16: list[float] = []
    per_row_1: list[float] = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        pool = await WorkerPool.spawn(WORKERS)
        spawn_s.append(time.perf_counter() - start)
        one = WorkerPool(pool.connections[:1])
        try:
            await _timed_map(pool, _instant, WORKERS)  # warm: every worker ran once
            wall.append(await _timed_map(pool, _slow, INPUTS))
            per_row_16.append(await _timed_map(pool, _instant, INPUTS) / INPUTS)
            per_row_1.append(await _timed_map(one, _instant, INPUTS // 4) / (INPUTS // 4))
        finally:
            pool.close()
    ideal = INPUTS * ROUNDS_PER_INPUT * DELAY / WORKERS
    med = statistics.median
    print(f"map: spawn of {WORKERS} bundled workers (concurrent): median {med(spawn_s):.3f} s "
          f"(runs: {', '.join(f'{s:.3f}' for s in spawn_s)})")
    print(f"map: {INPUTS} inputs x {ROUNDS_PER_INPUT} rounds x {DELAY * 1000:.0f} ms on "
          f"{WORKERS} workers: median {med(wall):.3f} s, ideal {ideal:.3f} s, "
          f"ratio {med(wall) / ideal:.3f} (target <= 1.1; runs: "
          f"{', '.join(f'{w / ideal:.3f}' for w in wall)})")
    print(f"map: the driving process used {med(_CPU) * 1e3:.2f} ms CPU per row in that map "
          f"({os.cpu_count()} cores here, shared with the {WORKERS} workers)")
    print(f"map: per-row wall time with instant answers ({ROUNDS_PER_INPUT} rounds/row): "
          f"{WORKERS} workers {med(per_row_16) * 1e3:.3f} ms/row, "
          f"1 worker {med(per_row_1) * 1e3:.3f} ms/row")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pnb-", dir="/tmp") as home:
        os.environ["POOL_NOTEBOOK_HOME"] = home
        manager.history = History(None)
        asyncio.run(_main())
        for child in spawn._children:  # stopped by pool.close(): let them exit before cleanup
            child.wait(30)


if __name__ == "__main__":
    main()
