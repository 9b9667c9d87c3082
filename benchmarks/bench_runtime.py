"""Lua session cost: warm VMs, a real package against bare lupa, and the worker's wire.

``python benchmarks/run.py runtime`` (or ``python benchmarks/bench_runtime.py
[--before REF] [--rounds N]``). Medians over interleaved rounds:

1. in process: a session of ``return 1`` on a cold VM (``LuaSession(...)``:
   runtime, driver, sandbox and ``alc`` prelude built per session) against a
   warm one (``SessionFactory.new``, the VM built ahead by ``prewarm``), and a
   pause+continue on a warm VM (target: a session starts in <= 200 µs);
2. the ``cot`` package (depth 3, four instant answers) as our session (warm VM,
   sandbox on) against the same Lua in a bare ``lupa`` runtime whose ``alc.llm``
   is an in-process stub returning the answer, with the bare runtime built
   inside the timing (what a fresh VM costs) and outside it (target: ours <= 1.2x),
   and a tight arithmetic loop, where the interrupt hook costs most;
3. through a real worker over its socket, before (git ``REF``) and after (the
   working tree): ``run`` of ``return 1``, and ``run`` + ``continue`` of one
   ``alc.llm`` call, back to back (sessions as fast as VMs can be built) and
   5 ms apart (as from a notebook: the next VM is built in between).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lupa import lua54

from pool_notebook.protocol import Paused
from pool_notebook.spawn import spawn_and_connect
from pool_notebook.worker.runtime import LuaSession, SessionFactory

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
PACKAGES = CORPUS / "algocline-bundled-packages"
COT = 'return require("cot").run({task = "Why is the sky blue?", depth = 3})'
ANSWER = "Light scatters off molecules; shorter wavelengths scatter more."
N = 300

# The bare baseline: lupa, the package path, and alc.llm answering in process.
_BARE = """
alc = {}
function alc.llm(prompt, opts) return ANSWER end
function alc.log() end
return function(code) return load(code, "=run", "t")() end
"""


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _time(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _drive(session: LuaSession) -> Any:
    step = session.start()
    while step.kind == "paused":
        for q in step.queries:
            step = session.answer(q["id"], ANSWER)
    if step.kind != "done":
        raise RuntimeError(f"session failed: {step.error}")
    return step.result


def _bare_runtime() -> Callable[[str], Any]:
    lua = lua54.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().ANSWER = ANSWER
    lua.globals().package.path = f"{PACKAGES}/?.lua;{PACKAGES}/?/init.lua;" + \
        lua.globals().package.path
    run: Callable[[str], Any] = lua.execute(_BARE)
    return run


def in_process(rounds: int, n: int) -> None:
    factory = SessionFactory()
    cold: list[float] = []
    warm: list[float] = []
    pause: list[float] = []
    for _ in range(rounds):
        for _ in range(n):
            cold.append(_time(lambda: _drive(LuaSession("s-b", "return 1"))))
            factory.prewarm()
            warm.append(_time(lambda: _drive(factory.new("s-b", "return 1"))))
            factory.prewarm()
            pause.append(_time(lambda: _drive(factory.new("s-b", "return alc.llm('q')"))))
    build = [_time(LuaSession) for _ in range(n)]
    print("\n## Lua session, in process (start + run + metrics; "
          f"{rounds} rounds x {n} interleaved)\n")
    print("| session | p50 µs |")
    print("|---|---|")
    print(f"| `return 1`, cold VM (built per session) | {_median_us(cold):.0f} |")
    print(f"| `return 1`, warm VM (SessionFactory) | {_median_us(warm):.0f} |")
    print(f"| pause + continue, warm VM | {_median_us(pause):.0f} |")
    print(f"| building one VM (prewarm, off the request path) | {_median_us(build):.0f} |")
    print(f"\nwarm start {_median_us(warm):.0f} µs (target <= 200 µs); "
          f"cold/warm = {_median_us(cold) / _median_us(warm):.1f}x")


LOOP = "local s = 0 for i = 1, 3e6 do s = s + i % 7 end return s"


def hook_cost(rounds: int) -> None:
    """What interruptibility costs: a tight arithmetic loop under the count hook."""
    factory = SessionFactory()
    ours: list[float] = []
    bare: list[float] = []
    for _ in range(rounds * 3):
        factory.prewarm()
        ours.append(_time(lambda: _drive(factory.new("s-b", LOOP))))
        run = _bare_runtime()
        bare.append(_time(lambda: run(LOOP)))  # noqa: B023 - called at once
    o, b = statistics.median(ours) * 1e3, statistics.median(bare) * 1e3
    print(f"\n## the interrupt hook's price: a tight loop of 3e6 iterations, {rounds * 3} rounds\n")
    print(f"ours {o:.1f} ms, bare lupa {b:.1f} ms: {o / b:.2f}x (Lua 5.4 checks a count "
          "hook at every instruction; code that builds strings or waits for answers "
          "hardly notices, see cot)")


def cot(rounds: int, n: int) -> None:
    if not PACKAGES.is_dir():
        print(f"\n(cot skipped: {PACKAGES} is absent)")
        return
    factory = SessionFactory()
    ours: list[float] = []
    bare_fresh: list[float] = []
    bare_built: list[float] = []
    libs = [str(PACKAGES)]
    for _ in range(rounds):
        for _ in range(n):
            factory.prewarm()
            ours.append(_time(lambda: _drive(factory.new("s-b", COT, lib_paths=libs))))
            bare_fresh.append(_time(lambda: _bare_runtime()(COT)))
            run = _bare_runtime()
            bare_built.append(_time(lambda: run(COT)))  # noqa: B023 - called at once
    print(f"\n## `cot` (depth 3, 4 instant answers), {rounds} rounds x {n} interleaved\n")
    print("| runner | p50 µs | ours / it |")
    print("|---|---|---|")
    o = _median_us(ours)
    print(f"| ours: warm VM, sandbox, alc prelude, pauses | {o:.0f} | 1.00x |")
    for name, samples in (("bare lupa, runtime built in the timing", bare_fresh),
                          ("bare lupa, runtime built beforehand", bare_built)):
        print(f"| {name} | {_median_us(samples):.0f} | {o / _median_us(samples):.2f}x |")
    print("\ntarget: ours <= 1.2x the bare runtime")


async def _wire_one(tree: Path | None, version: str, n: int,
                    gap: float) -> tuple[list[float], list[float]]:
    from bench_worker import COMMAND, tree_env

    client, _w = await spawn_and_connect(COMMAND, env=tree_env(tree), version=version)
    runs: list[float] = []
    pauses: list[float] = []
    async with client:
        for _ in range(n):
            await asyncio.sleep(gap)  # untimed: a user between two cells
            t = time.perf_counter()
            await client.run("return 1")
            runs.append(time.perf_counter() - t)
            t = time.perf_counter()
            feed = await client.run("return alc.llm('q')")
            assert isinstance(feed.feed_result, Paused)
            await client.continue_(feed.session_id, ANSWER)
            pauses.append(time.perf_counter() - t)
            await asyncio.sleep(gap)
        await client.shutdown()
    return runs, pauses


async def wire(before_ref: str, rounds: int, n: int) -> None:
    from bench_worker import _extract, _version  # the worker benchmark's tree helpers

    trees = {"before": _extract(before_ref), "after": None}
    versions = {name: _version(tree) for name, tree in trees.items()}
    gaps = {"back to back": 0.0, "5 ms apart": 0.005}
    runs: dict[tuple[str, str], list[float]] = {}
    pauses: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for gap_name, gap in gaps.items():
            for name, tree in trees.items():
                r, p = await _wire_one(tree, versions[name], n, gap)
                runs.setdefault((name, gap_name), []).extend(r)
                pauses.setdefault((name, gap_name), []).extend(p)
    print(f"\n## through a real worker (before = {before_ref}, after = working tree; "
          f"{rounds} interleaved rounds x {n})\n")
    print("| worker | requests | run `return 1` p50 µs | run + continue p50 µs |")
    print("|---|---|---|---|")
    for gap_name in gaps:
        for name in trees:
            key = (name, gap_name)
            print(f"| {name} | {gap_name} | {_median_us(runs[key]):.0f} | "
                  f"{_median_us(pauses[key]):.0f} |")
    for gap_name in gaps:
        before, after = ("before", gap_name), ("after", gap_name)
        print(f"\n{gap_name}: run before/after = "
              f"{_median_us(runs[before]) / _median_us(runs[after]):.2f}x, pause+continue "
              f"before/after = {_median_us(pauses[before]) / _median_us(pauses[after]):.2f}x")


def main(argv: list[str] | None = None) -> None:
    from bench_worker import before_after_args

    opts = before_after_args(__doc__, argv, N, "sessions per round and runner")
    in_process(opts.rounds, opts.n)
    cot(opts.rounds, max(opts.n // 3, 1))
    hook_cost(opts.rounds)
    asyncio.run(wire(opts.before, opts.rounds, opts.n))


if __name__ == "__main__":
    main(sys.argv[1:])
