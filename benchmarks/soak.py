"""Soak: one bundled worker under mixed load, its memory sampled over time.

``python benchmarks/run.py soak`` (10 minutes) or ``python benchmarks/soak.py
--minutes 2``. One worker is spawned and kept busy by one client that loops
over a mix of: single pauses answered, batch pauses answered query by query,
failing runs, ``status`` with ``include_history``, requests cancelled by a
timeout mid-flight (their late replies consumed by the client), and
disconnects while a session is paused followed by a reconnect that finishes
it. RSS (``/proc/PID/status`` VmRSS) is sampled every few seconds; the report
gives RSS at start (after warm-up), at the end and the maximum, the drift
between the first and last minute, and counts per operation.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pool_notebook import PoolClient, RequestTimeout
from pool_notebook.protocol import Finished, Paused
from pool_notebook.spawn import spawn_and_connect

SAMPLE_EVERY = 5.0
KINDS = ("single", "batch", "fail", "status", "cancel", "disconnect")
WEIGHTS = (30, 15, 10, 25, 10, 5)
SINGLE = 'local a = alc.llm("q " .. ctx.i, {system = "s"}) return {a = a, i = ctx.i}'
BATCH = ('local r = alc.llm_batch({{prompt = "x"}, {prompt = "y"}, {prompt = "z"}}) '
         'return table.concat(r, ",")')
FAILING = 'error("planned failure " .. ctx.i)'
SLOW = "local x = 0 for i = 1, 3e6 do x = x + i end return x"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _answer_all(client: PoolClient, sid: str, feed: Paused, counts: collections.Counter[
        str]) -> None:
    result: Paused | object = feed
    while isinstance(result, Paused):
        for q in result.queries:
            reply = await client.continue_(sid, f"answer to {q.prompt}" * 20, query_id=q.id,
                                           usage={"input_tokens": 10, "output_tokens": 5})
            result = reply.feed_result
            counts["continue"] += 1


async def _soak(minutes: float, seed: int) -> None:
    rng = random.Random(seed)
    client, worker = await spawn_and_connect()
    counts: collections.Counter[str] = collections.Counter()
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    end = start + minutes * 60
    next_sample = start
    i = 0
    try:
        while time.monotonic() < end:
            i += 1
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - start, _rss_kib(worker.pid)))
                next_sample = now + SAMPLE_EVERY
            kind = rng.choices(KINDS, weights=WEIGHTS)[0]
            counts[kind] += 1
            if kind in ("single", "batch", "disconnect"):
                feed = await client.run(BATCH if kind == "batch" else SINGLE, ctx={"i": i})
                assert isinstance(feed.feed_result, Paused), feed
                if kind == "disconnect":  # leave it paused, come back on a new connection
                    client.close()
                    client = await PoolClient.connect(worker.sock)
                    status = await client.status(include_history=True)
                    assert status.session_id == feed.session_id, status
                await _answer_all(client, feed.session_id, feed.feed_result, counts)
            elif kind == "fail":
                done = await client.run(FAILING, ctx={"i": i})
                assert isinstance(done.feed_result, Finished), done
            elif kind == "status":
                await client.status(include_history=rng.random() < 0.5)
            else:  # a request abandoned mid-flight; the client consumes its late reply
                try:
                    await client.run(SLOW, timeout=0.001)
                    counts["cancel_too_late"] += 1
                except RequestTimeout:
                    pass
                await client.settle(timeout=30)
        samples.append((time.monotonic() - start, _rss_kib(worker.pid)))
        await client.shutdown()
    finally:
        client.close()
    _report(minutes, samples, counts, time.monotonic() - start)


def _report(minutes: float, samples: list[tuple[float, int]],
            counts: collections.Counter[str], elapsed: float) -> None:
    warm = [rss for t, rss in samples if t >= min(30.0, elapsed / 4)] or [samples[-1][1]]
    first_minute = [rss for t, rss in samples if t < 60 + min(30.0, elapsed / 4)] or warm
    last_minute = [rss for t, rss in samples if t >= elapsed - 60] or warm
    operations = sum(counts[k] for k in KINDS)
    print(f"\n## soak: one worker, {minutes:g} min of mixed load ({operations:,} operations, "
          f"{counts['continue']:,} continues)\n")
    print("operations: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    print(f"RSS KiB: start (after warm-up) {warm[0]:,}, end {samples[-1][1]:,}, "
          f"max {max(rss for _, rss in samples):,}; median first minute "
          f"{statistics.median(first_minute):,.0f}, last minute "
          f"{statistics.median(last_minute):,.0f} "
          f"({len(samples)} samples every {SAMPLE_EVERY:g} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=8)
    opts = parser.parse_args(argv if argv is not None else [])
    os.environ.setdefault("POOL_NOTEBOOK_HOME", tempfile.mkdtemp(prefix="pnb-soak-"))
    asyncio.run(_soak(opts.minutes, opts.seed))


if __name__ == "__main__":
    main(sys.argv[1:])
