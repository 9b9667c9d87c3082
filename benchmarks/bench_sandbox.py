"""What the Lua sandbox costs: ``python benchmarks/run.py sandbox``.

Medians over interleaved rounds, in process (no worker):

1. building a VM: a bare ``lupa`` runtime against the same runtime with
   ``install_sandbox`` and a session's ``lib_paths`` granted;
2. loading real packages (``cot``, ``flow``, ``conformal_vote``, ``alc_shapes``
   from the pinned corpus) with ``require``: the stock Lua searcher over the same
   ``package.path`` against the sandbox's (every candidate path checked);
3. one path check (``Sandbox.resolve``) for a file that exists and one that
   does not, against ``os.path.realpath`` alone.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lupa import lua54

from pool_notebook.worker.sandbox import SandboxPolicy, install_sandbox, module_path

PACKAGES = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / \
    "algocline-bundled-packages"
REQUIRE = "for _, m in ipairs({'cot', 'flow', 'conformal_vote', 'alc_shapes'}) do require(m) end"
POLICY = SandboxPolicy(log=lambda *args: None)


def _bare() -> Any:
    return lua54.LuaRuntime(register_eval=False, register_builtins=False,
                            unpack_returned_tuples=True)


def _sandboxed() -> Any:
    lua = _bare()
    install_sandbox(lua, POLICY, lib_paths=[str(PACKAGES)])
    return lua


def _plain_path() -> Any:
    lua = _bare()
    package = lua.globals().package
    package.path = module_path([str(PACKAGES)]) + ";" + package.path
    return lua


def _medians(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median µs per case, the cases interleaved round by round."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(xs) for name, xs in samples.items()}


def main() -> None:
    print("\n== sandbox (in process) ==")
    build = _medians({"bare": _bare, "sandboxed": _sandboxed}, 400)
    print(f"VM build: bare lupa {build['bare']:.0f} µs, with the sandbox "
          f"{build['sandboxed']:.0f} µs (+{build['sandboxed'] - build['bare']:.0f} µs)")
    if PACKAGES.is_dir():
        vms = {"stock": _plain_path, "sandbox": _sandboxed}
        times: dict[str, list[float]] = {name: [] for name in vms}
        for _ in range(30):
            for name, make in vms.items():
                lua = make()
                start = time.perf_counter()
                lua.execute(REQUIRE)
                times[name].append((time.perf_counter() - start) * 1e3)
        stock, ours = (statistics.median(times[n]) for n in ("stock", "sandbox"))
        print(f"require cot+flow+conformal_vote+alc_shapes: stock searcher {stock:.2f} ms, "
              f"sandbox {ours:.2f} ms ({ours / stock:.2f}x)")
    else:
        print(f"require: skipped, no corpus at {PACKAGES}")
    sandbox = install_sandbox(_bare(), POLICY, lib_paths=[str(PACKAGES)])
    hit, miss = str(PACKAGES / "flow" / "util.lua"), str(PACKAGES / "flow" / "nope.lua")
    check = _medians({"hit": lambda: sandbox.resolve(hit), "miss": lambda: sandbox.resolve(miss),
                      "realpath": lambda: os.path.realpath(hit)}, 20000)
    print(f"path check: existing file {check['hit']:.1f} µs, missing {check['miss']:.1f} µs "
          f"(os.path.realpath alone: {check['realpath']:.1f} µs)")


if __name__ == "__main__":
    main()
