"""Model responders: a 64-query pause answered concurrently vs one at a time.

A real Lua run on the bundled worker pauses with ``alc.llm_batch`` of 64
queries; a model responder answers them through the real ``openai`` SDK from a
loopback OpenAI-compatible server (in its own process, so it does not share our
GIL) that takes 100 ms per answer. Side by side,
interleaved rounds: ``max_concurrency=64`` vs ``max_concurrency=1`` (the old
one-after-another behaviour), and the same batch replayed from the answers store.

Then a long session: one run that pauses 2,000 times, each answered at once by
``answer_all``: the time per answer early (pauses 1-100) and late (1901-2000) in
the session. Equal means the session's bookkeeping does not grow with its length.
Run: ``python benchmarks/run.py llm``.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pool_notebook import llm
from pool_notebook.connections import Connection, ConnectionManager
from pool_notebook.history import History
from pool_notebook.protocol import Query
from tests.fakes import FakeChatServer

QUERIES = 64
DELAY = 0.1
ROUNDS = 5
BATCH = (f"local qs = {{}} for i = 1, {QUERIES} do qs[i] = {{prompt = 'item ' .. i}} end "
         "return alc.llm_batch(qs)")


async def _answer(conn: Connection, responder: llm.ModelResponder, concurrency: int) -> float:
    """Seconds from the pause to the end of the session (the run itself not counted)."""
    session = await conn.run(BATCH)
    start = time.perf_counter()
    await session.answer_all(responder, max_concurrency=concurrency)
    elapsed = time.perf_counter() - start
    assert len(session.result) == QUERIES
    return elapsed


async def _sdk_alone(responder: llm.ModelResponder) -> float:
    """The same 64 requests straight through the responder: no worker, no session."""
    queries = [Query(f"q-{i}", f"item {i + 1}") for i in range(QUERIES)]
    start = time.perf_counter()
    await asyncio.gather(*(responder(q) for q in queries))
    return time.perf_counter() - start


LONG = 2000


async def _long_session() -> tuple[float, float]:
    """Median µs per answer over the first and the last 100 pauses of one session."""
    manager = ConnectionManager(History(None))
    conn = await manager.connect(name="llm-bench-long")
    stamps: list[float] = []

    async def instant(query: Query) -> str:
        stamps.append(time.perf_counter())
        return "a"

    try:
        session = await conn.run(f'for i = 1, {LONG} do alc.llm("q" .. i) end return 1')
        await session.answer_all(instant)
        assert session.result == 1 and len(stamps) == LONG
    finally:
        await conn.shutdown()
        manager.close_all()
    gaps = [(b - a) * 1e6 for a, b in itertools.pairwise(stamps)]
    return statistics.median(gaps[:100]), statistics.median(gaps[-100:])


def _serve(pipe: Any) -> None:
    """The chat server's process: send its URL, serve until told to stop, send its peak."""
    with FakeChatServer(delay=DELAY) as server:
        pipe.send(server.base_url)
        pipe.recv()
        pipe.send(server.max_in_flight)


async def _bench(base_url: str, store: llm.AnswerStore) -> dict[str, list[float]]:
    manager = ConnectionManager(History(None))
    conn = await manager.connect(name="llm-bench")
    concurrent = llm.openai("m", base_url=base_url, max_concurrency=QUERIES, cache="off")
    serial = llm.openai("m", base_url=base_url, max_concurrency=1, cache="off")
    recording = llm.openai("m", base_url=base_url, max_concurrency=QUERIES, store=store)
    replay = llm.openai("m", cache="replay", max_concurrency=QUERIES, store=store)
    await _answer(conn, recording, QUERIES)  # records the batch (and warms the SDK up)
    times: dict[str, list[float]] = {"concurrent (64)": [], "one at a time": [],
                                     "replayed from the store": [],
                                     "the 64 SDK calls alone (no worker)": []}
    try:
        for _ in range(ROUNDS):
            times["concurrent (64)"].append(await _answer(conn, concurrent, QUERIES))
            times["one at a time"].append(await _answer(conn, serial, 1))
            times["replayed from the store"].append(await _answer(conn, replay, QUERIES))
            times["the 64 SDK calls alone (no worker)"].append(await _sdk_alone(concurrent))
    finally:
        await conn.shutdown()
        manager.close_all()
    return times


def main() -> None:
    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(theirs,), daemon=True)
    server.start()
    base_url = ours.recv()
    with tempfile.TemporaryDirectory(prefix="pn-llm-bench-") as tmp:
        store = llm.AnswerStore(os.path.join(tmp, "answers.sqlite"))
        try:
            times = asyncio.run(_bench(base_url, store))
        finally:
            ours.send("stop")
            peak = ours.recv()
            server.join(5)
    print(f"\n## llm: a {QUERIES}-query pause, {DELAY * 1000:.0f} ms per answer "
          f"(loopback server, real openai SDK, real worker; median of {ROUNDS} rounds)\n")
    print("| answered | median s | all rounds s |")
    print("|---|---|---|")
    for name, samples in times.items():
        shown = ", ".join(f"{t:.2f}" for t in samples)
        print(f"| {name} | {statistics.median(samples):.3f} | {shown} |")
    con = statistics.median(times["concurrent (64)"])
    ser = statistics.median(times["one at a time"])
    print(f"\none at a time / concurrent = {ser / con:.1f}x; concurrent = {con / DELAY:.1f}x "
          f"one answer's {DELAY * 1000:.0f} ms; the server saw at most {peak} requests at once")
    print("(concurrent - SDK alone = what the session and worker add; replayed = the "
          "session, worker and store without any provider call)")
    early, late = asyncio.run(_long_session())
    print(f"\nlong session ({LONG} pauses, instant answers): {early:.0f} µs per answer over "
          f"pauses 1-100, {late:.0f} µs over {LONG - 99}-{LONG} (late / early = "
          f"{late / early:.2f}x)")


if __name__ == "__main__":
    main()
