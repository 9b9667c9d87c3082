"""Per-call cost of the ``alc`` API inside a session: ``python benchmarks/run.py alc``.

Each case runs a loop of one ``alc`` call in a fresh session (sandbox on) and
reports the median over interleaved rounds of the CPU time per call (Lua's
``os.clock``), beside a pure-Lua helper (``alc.parse_score``) as the floor.
Native calls cross into Python and back; ``rng_float`` is buffered (one host
call per 256 draws); state and cards write files (atomic replace under flock).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pool_notebook.worker.runtime import LuaSession

ROUNDS = 5
CASES: dict[str, tuple[str, str, int]] = {
    "alc.parse_score (pure Lua)": ("", "alc.parse_score('Score: 7/10')", 50000),
    "alc.json_encode({a=1,b={1,2}})": ("local t = {a = 1, b = {1, 2}}", "alc.json_encode(t)",
                                       20000),
    "alc.json_decode(small object)": ("local s = '{\"a\":1,\"b\":[1,2]}'", "alc.json_decode(s)",
                                      20000),
    "alc.math.rng_float": ("local r = alc.math.rng_create(1)", "alc.math.rng_float(r)", 50000),
    "alc.math.mean(10 numbers)": ("local d = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}",
                                  "alc.math.mean(d)", 20000),
    "alc.match_enum": ("", "alc.match_enum('Verdict: BLOCKED', {'PASS', 'BLOCKED'})", 20000),
    "alc.state.set + get (file)": ("", "alc.state.set('k', 1); alc.state.get('k')", 300),
    "alc.card.create (file)": ("local k = 0",
                               "k = k + 1; alc.card.create({pkg = {name = 'bench'}, "
                               "params = {k = k, r = math.random()}})", 200),
}


def per_call_us(setup: str, call: str, n: int) -> float:
    code = (f"{setup}\nlocal t0 = os.clock()\nfor i = 1, {n} do {call} end\n"
            f"return (os.clock() - t0) / {n} * 1e6")
    step = LuaSession("bench", code).start()
    if step.kind != "done":
        raise RuntimeError(f"{call}: {step.error}")
    return float(step.result)


def main() -> None:
    os.environ.setdefault("POOL_NOTEBOOK_HOME", tempfile.mkdtemp(prefix="pnb-alc-"))
    samples: dict[str, list[float]] = {label: [] for label in CASES}
    for _ in range(ROUNDS):
        for label, case in CASES.items():
            samples[label].append(per_call_us(*case))
    print(f"alc API, CPU time per call inside a session (median of {ROUNDS} rounds):")
    floor = statistics.median(samples["alc.parse_score (pure Lua)"])
    for label, xs in samples.items():
        m = statistics.median(xs)
        print(f"  {label:34s} {m:9.2f} us  ({m / floor:7.1f}x the pure-Lua helper)")


if __name__ == "__main__":
    main()
