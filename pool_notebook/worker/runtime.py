"""The Lua side of the bundled worker: one ``alc`` session as a Lua coroutine.

``alc.llm`` yields a batch of queries out of the coroutine; the worker's
``continue`` answers resume it. Lua runs through ``lupa`` (Lua 5.4 where the
wheel has it), sandboxed by default: no process, file-writing, C-loading or
Python escape hatches, a memory cap, and modules from ``lib_paths`` loaded as
text only. Methods here block; the server calls them from a worker thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from lupa import lua54 as _lua  # algocline embeds Lua 5.4: the same dialect

from . import natives
from .sandbox import install_sandbox

__all__ = ["LuaSession", "SessionError", "Step"]

log = logging.getLogger("pool_notebook.worker.lua")

DEFAULT_MAX_MEMORY = 256 * 1024 * 1024
_MAX_DEPTH = 100

# The coroutine driver: xpcall inside the coroutine keeps the full traceback.
_DRIVER = r"""
local D = {}
local co
function D.start(chunk)
  co = coroutine.create(function() return xpcall(chunk, debug.traceback) end)
end
function D.resume(value)
  local ok, a, b = coroutine.resume(co, value)
  if not ok then return "error", tostring(a) end
  if coroutine.status(co) == "suspended" then return "paused", a end
  if a then return "done", b end
  return "error", tostring(b)
end
-- Tables that are JSON arrays even when empty (weak keys: no leak).
D.arrays = setmetatable({}, { __mode = "k" })
function D.mark_array(t) D.arrays[t] = true return t end
return D
"""


class SessionError(Exception):
    """A ``continue`` that does not fit the session (message goes to the client)."""


@dataclass
class Step:
    """What a resume produced: ``paused`` (queries), ``accepted`` or ``done``/``error``."""

    kind: str
    queries: list[dict[str, Any]] = field(default_factory=list)
    remaining: int = 0
    result: Any = None
    error: str | None = None


class LuaSession:
    """One run of Lua code, paused and resumed by LLM queries."""

    def __init__(
        self,
        session_id: str,
        code: str,
        *,
        ctx: Any = None,
        lib_paths: Sequence[str] = (),
        state: dict[str, Any],
        sandbox: bool = True,
        max_memory: int = DEFAULT_MAX_MEMORY,
    ) -> None:
        self.session_id = session_id
        self.state = "running"
        self.pending: dict[str, dict[str, Any]] = {}
        self.answers: dict[str, str] = {}
        self.transcript: list[dict[str, Any]] = []
        self.rounds = 0
        self.queries = 0
        self.usage: dict[str, int] = {}
        self._started = time.perf_counter()
        self.kv = state
        self._max_memory = max_memory
        self._lua = _lua.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            max_memory=max_memory or None,
            attribute_filter=_deny_attributes,
        )
        g = self._lua.globals()
        g.python = None
        host = self._lua.table_from(natives.host_functions(self))
        self._driver = self._lua.execute(_DRIVER)
        self._arrays = self._driver.arrays
        host.array = self._driver.mark_array
        if sandbox:
            install_sandbox(self._lua, host, lib_paths=lib_paths)
        package = g.package
        extra = ";".join(f"{p}/?.lua;{p}/?/init.lua" for p in lib_paths)
        if extra:
            package.path = extra + ";" + package.path
        prelude = resources.files(__package__).joinpath("alc.lua").read_text("utf-8")
        g.alc = self._lua.execute(prelude, host)
        g.ctx = self.to_lua(ctx)
        self._code = code

    # -------------------------------------------------------------- lifecycle

    def start(self) -> Step:
        """Compile and run the code until its first pause or its end."""
        loader = self._lua.globals().load
        loaded = loader(self._code, "=run", "t")
        if isinstance(loaded, tuple):  # (nil, message)
            return self._finish(Step("error", error=f"syntax error: {loaded[1]}"))
        chunk = loaded
        self._driver.start(chunk)
        return self._resume(None)

    def answer(self, query_id: str | None, response: str, usage: Mapping[str, Any] | None) -> Step:
        """Store one answer; resume the code once every pending query has one."""
        if self.state != "paused":
            raise SessionError("no paused session to continue")
        if query_id is None:
            open_ids = [q for q in self.pending if q not in self.answers]
            if len(open_ids) != 1:
                raise SessionError(
                    f"query_id is required: {len(open_ids)} queries are pending ({open_ids})"
                )
            query_id = open_ids[0]
        if query_id not in self.pending:
            raise SessionError(f"unknown query_id {query_id!r} (pending: {list(self.pending)})")
        if query_id in self.answers:
            raise SessionError(f"query {query_id!r} was already answered")
        self.answers[query_id] = response
        for key, value in (usage or {}).items():
            if isinstance(value, int):
                self.usage[key] = self.usage.get(key, 0) + value
        query = self.pending[query_id]
        self.transcript.append({"query_id": query_id, "prompt": query["prompt"],
                                "system": query.get("system"), "response": response})
        remaining = len(self.pending) - len(self.answers)
        if remaining:
            return Step("accepted", remaining=remaining)
        ordered = [self.answers[q] for q in self.pending]
        self.pending, self.answers = {}, {}
        self.state = "running"
        return self._resume(self._lua.table_from(ordered))

    def metrics(self) -> dict[str, Any]:
        return {
            "wall_ms": round((time.perf_counter() - self._started) * 1000, 3),
            "llm_rounds": self.rounds,
            "llm_queries": self.queries,
            "usage": dict(self.usage),
        }

    # -------------------------------------------------------------- internals

    def _resume(self, value: Any) -> Step:
        try:
            kind, payload = self._driver.resume(value)
        except _lua.LuaError as exc:
            kind, payload = "error", str(exc)
        if kind == "paused":
            queries = []
            for i, q in enumerate(self.to_py(payload) or []):
                query = {"id": f"q-{i}", **q}
                queries.append(query)
                self.pending[query["id"]] = query
            self.rounds += 1
            self.queries += len(queries)
            self.state = "paused"
            return Step("paused", queries=queries)
        if kind == "done":
            try:
                result = self.to_py(payload)
            except ValueError as exc:
                return self._finish(Step("error", error=f"cannot return this value: {exc}"))
            return self._finish(Step("done", result=result))
        message = str(payload)
        if message.startswith("not enough memory"):
            message += f" (the Lua memory cap of {self._max_memory // 2**20} MiB was reached)"
        return self._finish(Step("error", error=message))

    def _finish(self, step: Step) -> Step:
        self.state = "completed" if step.kind == "done" else "failed"
        return step

    def to_py(self, value: Any, depth: int = 0) -> Any:
        """Lua value -> JSON-able Python (arrays for 1..n tables and marked empties)."""
        if depth > _MAX_DEPTH:
            raise ValueError(f"nesting deeper than {_MAX_DEPTH} (a cycle?)")
        kind = _lua.lua_type(value)
        if kind is None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{value} is not representable in JSON")
            return value
        if kind != "table":
            raise ValueError(f"a Lua {kind} is not representable in JSON")
        items = list(value.items())
        if not items:
            return [] if self._arrays[value] else {}
        keys = [k for k, _ in items]
        if all(type(k) is int for k in keys) and sorted(keys) == list(range(1, len(keys) + 1)):
            return [self.to_py(v, depth + 1) for _, v in sorted(items, key=lambda kv: kv[0])]
        out = {}
        for k, v in items:
            if isinstance(k, float) and k.is_integer():
                k = int(k)
            if not isinstance(k, (str, int)):
                raise ValueError(f"table key of type {_lua.lua_type(k) or type(k).__name__}")
            out[str(k)] = self.to_py(v, depth + 1)
        return out

    def to_lua(self, value: Any) -> Any:
        """JSON-able Python -> Lua (lists become marked arrays, null becomes nil)."""
        if isinstance(value, dict):
            table = self._lua.table()
            for k, v in value.items():
                table[k] = self.to_lua(v)
            return table
        if isinstance(value, list):
            table = self._lua.table()
            for i, v in enumerate(value, 1):
                table[i] = self.to_lua(v)
            self._arrays[table] = True
            return table
        return value


def _deny_attributes(obj: Any, name: Any, is_setting: bool) -> Any:
    raise AttributeError("Python objects are opaque to sandboxed Lua")
