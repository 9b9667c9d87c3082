"""One command, one run, ratios side by side: ``python benchmarks/run.py [part ...]``.

1. client (bench_client.py): status round trip, ours before/after on asyncio and uvloop vs
   a blocking ``socket`` client vs naive asyncio streams, and a 16-way fan-out;
2. worker (bench_worker.py): spawn-to-ready and status round trip, before/after;
3. magics: %%pool_send overhead over the bare client, display cost, 64-worker fan-out;
4. history: recording cost per request, 1,000,000 rows -> DataFrame time and bytes/row;
5. llm (bench_llm.py): a 64-query pause answered concurrently vs one at a time;
6. runtime (bench_runtime.py): Lua session start, cot vs bare lupa, the interrupt hook,
   run and pause+continue through a real worker before/after;
7. alc (bench_alc.py): CPU per alc call; sandbox (bench_sandbox.py): VM build, require;
8. map (bench_map.py): 256 inputs x 2 rounds x 50 ms on 16 workers vs the ideal;
9. soak (soak.py): one worker under 10 minutes of mixed load, RSS over time (not in "all").
Default: all parts but soak. Medians and p99 over interleaved rounds (the machines here
are noisy).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_worker import p50_p99_us

from pool_notebook.history import History

N = 2000
ROUNDS = 5
def magics_bench() -> None:
    """Magic overhead over the bare client, what widgets cost, and 64-worker fan-out."""
    from IPython.core.interactiveshell import InteractiveShell

    from pool_notebook.connections import Reply, manager
    from pool_notebook.display import SessionView, history_figure, parse_lua_error, reply_html
    from pool_notebook.history import History
    from pool_notebook.loop import runner

    os.environ["POOL_NOTEBOOK_WIDGETS"] = "0"
    manager.history = History(None)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "pool_notebook")
    conn = ip.run_line_magic("pool_connect", "--name bench")
    bare: list[float] = []
    magic: list[float] = []
    for _ in range(ROUNDS):
        for _ in range(N // 4):
            t = time.perf_counter()
            runner.run(conn.client.status())
            bare.append(time.perf_counter() - t)
        for _ in range(N // 4):
            t = time.perf_counter()
            ip.run_cell_magic("pool_send", "", "status")
            magic.append(time.perf_counter() - t)
    b50, m50 = p50_p99_us(bare)[0], p50_p99_us(magic)[0]
    reply: Reply = ip.run_cell_magic("pool_send", "", "status")
    html_us = _timeit(lambda: reply_html(reply))
    paused = runner.run(conn.run("return alc.llm('q?')"))
    static_us = _timeit(lambda: SessionView(paused, use_widgets=False).html())
    widget_us = _timeit(lambda: SessionView(paused, use_widgets=True), 200)
    runner.run(paused.answer("done"))
    failed = runner.run(conn.run("local x = 1\nerror('boom from Lua')"))
    failed_us = _timeit(lambda: SessionView(failed, use_widgets=False).html())
    parse_us = _timeit(lambda: parse_lua_error(failed.error or "", failed.code))
    for _ in range(300):
        ip.run_cell_magic("pool_send", "", "status")
    frame = manager.history.frame()
    plot_ms = _timeit(lambda: history_figure(frame)._repr_png_(), 5) / 1000
    print("\n## magics\n")
    print(f"%%pool_send status, widgets off: p50 {m50:.1f} µs vs bare client {b50:.1f} µs "
          f"through the same loop: overhead {m50 - b50:.1f} µs (target <= 1000 µs)")
    print(f"display cost: reply HTML {html_us:.0f} µs; paused-session view static "
          f"{static_us:.0f} µs, as ipywidgets {widget_us:.0f} µs; failed-session view "
          f"{failed_us:.0f} µs (Lua error parse {parse_us:.0f} µs); history plot of "
          f"{len(frame):,} rows drawn to PNG {plot_ms:.0f} ms")
    runner.run(conn.shutdown())
    ip.run_line_magic("pool_disconnect", "--all")

    async def spawn_many(n: int, batch: int = 8) -> list[Any]:  # 2 cores: not all at once
        out: list[Any] = []
        for start in range(0, n, batch):
            out += await asyncio.gather(*(manager.connect(name=f"f{i}")
                                          for i in range(start, min(n, start + batch))))
        return out

    conns = runner.run(spawn_many(64))
    one: list[float] = []
    fan: list[float] = []
    seq: list[float] = []

    async def one_by_one() -> None:
        for c in conns:
            await c.status()

    for _ in range(20):
        t = time.perf_counter()
        runner.run(one_by_one())
        seq.append(time.perf_counter() - t)
        t = time.perf_counter()
        runner.run(conns[0].status())
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        ip.run_cell_magic("pool_send", "--all", "status")
        fan.append(time.perf_counter() - t)
    o50, f50 = statistics.median(one) * 1e6, statistics.median(fan) * 1e6
    print(f"fan-out %%pool_send --all to 64 workers: p50 {f50:.0f} µs vs one round trip "
          f"{o50:.0f} µs = {f50 / o50:.1f}x (target <= 3x; {os.cpu_count()} cores for 64 "
          f"worker processes); the same 64 requests one after another: "
          f"{statistics.median(seq) * 1e6:.0f} µs")
    ip.run_line_magic("pool_disconnect", "--all --shutdown")


def _timeit(fn: Callable[[], Any], n: int = 1000) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def history_bench() -> None:
    """Recording cost with and without the background SQLite writer, interleaved rounds."""
    from pool_notebook.history import Counts, Outcome

    usage = Counts(prompt_tokens=120, completion_tokens=30)
    clock = iter(range(1_700_000_000_000_000_000, 1_800_000_000_000_000_000, 1000))

    def fill(h: History, n: int, counts: Counts | None = None) -> float:
        t = time.perf_counter()
        for _ in range(n):
            h.record(connection="w0", socket="/tmp/x.sock", worker_pid=1234,
                     worker_version="0.1.0", op="status", sent_ns=next(clock),
                     latency_ms=0.05, outcome=Outcome.OK, request_bytes=16,
                     response_bytes=120, counts=counts)
        return (time.perf_counter() - t) / n * 1e6

    rounds, per_round = 5, 100_000
    directory = Path(tempfile.mkdtemp(prefix="pnb-history-"))
    memory, durable = History(None), History(directory / "h.sqlite")
    results: dict[str, list[float]] = {"memory only": [], "background writer": [],
                                       "background writer, with token counts": []}
    for _ in range(rounds):  # interleaved, so machine noise hits every variant alike
        results["memory only"].append(fill(memory, per_round))
        results["background writer"].append(fill(durable, per_round))
        results["background writer, with token counts"].append(
            fill(durable, per_round, usage))
    durable.close()
    print("\n## history\n")
    print(f"record, median of {rounds} interleaved rounds of {per_round:,} requests "
          "(target <= 2 µs):")
    for name, samples in results.items():
        print(f"  {name}: {statistics.median(samples):.2f} µs/request "
              f"(min {min(samples):.2f}, max {max(samples):.2f})")
    # the writer's own cost: rows recorded while it sleeps, then one timed write
    writes = []
    for i in range(3):
        batch = History(directory / f"w{i}.sqlite", interval=3600.0)
        fill(batch, per_round)
        t = time.perf_counter()
        batch.flush()
        writes.append((time.perf_counter() - t) / per_round * 1e6)
        batch.close()
    per_row = statistics.median(writes)
    print(f"background writer: {per_row:.2f} µs of writer-thread time per row (median of 3 "
          f"writes of {per_round:,}), {os.path.getsize(directory / 'w0.sqlite') / per_round:.0f} "
          f"B/row on disk; at 10,000 requests/s that is {per_row * 10_000 / 1e6:.1%} of one core")

    n = 1_000_000
    h = History(None)
    fill(h, n)
    import pandas  # noqa: F401  (import cost is not the DataFrame's: measured apart)

    t = time.perf_counter()
    df = h.frame()
    first_s = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        df = h.frame()
        times.append(time.perf_counter() - t)
    frame_s = statistics.median(times)
    bytes_per_row = df.memory_usage(deep=True).sum() / n
    print(f"1,000,000 records -> DataFrame: median {frame_s:.2f} s, first call {first_s:.2f} s "
          f"(target <= 0.5 s), "
          f"{bytes_per_row:.0f} B/record in the DataFrame (target <= 120 B)")


if __name__ == "__main__":
    os.environ.setdefault("POOL_NOTEBOOK_HOME", tempfile.mkdtemp(prefix="pnb-home-"))
    os.environ.setdefault("POOL_NOTEBOOK_HISTORY", "off")
    parts = {"client": lambda: __import__("bench_client").main([]),
             "worker": lambda: __import__("bench_worker").main(),
             "magics": magics_bench, "history": history_bench}
    parts["llm"] = lambda: __import__("bench_llm").main()  # model responders (issue 10)
    parts["runtime"] = lambda: __import__("bench_runtime").main()  # Lua sessions (issue 12)
    parts["soak"] = lambda: __import__("soak").main()  # one worker, mixed load (issue 8)
    parts["alc"] = lambda: __import__("bench_alc").main()  # alc API per-call cost (issue 12)
    parts["sandbox"] = lambda: __import__("bench_sandbox").main()  # sandbox costs (issue 12)
    parts["map"] = lambda: __import__("bench_map").main()  # pool_notebook.map (issue 11)
    for name in sys.argv[1:] or [p for p in parts if p != "soak"]:
        parts[name]()
