"""The Lua side of the bundled worker: one ``alc`` session as a Lua coroutine.

``alc.llm`` pauses the session's coroutine with a batch of queries (a yield
tagged with a private sentinel, so a user's own ``coroutine.yield`` is never
taken for one); the worker's ``continue`` answers resume it. Every session gets
a fresh Lua 5.4 VM (``lupa``), sandboxed by default, under one memory cap that
also counts what the worker keeps for the session in Python (transcript, log,
``alc.state`` values). A count hook makes running Lua interruptible from another
thread. :class:`SessionFactory` keeps one VM built ahead, so a session starts
without paying for the runtime, the sandbox and the ``alc`` prelude.

Methods here block; the server calls them from its one Lua thread, except
:meth:`LuaSession.interrupt` (any thread).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from lupa import lua54 as _lua  # algocline embeds Lua 5.4: the same dialect

from ..errors import ContinueRejected, InvalidArgument, LuaMemoryError
from ..protocol.messages import MAX_USAGE_TOKENS
from . import natives
from .natives import lua_size
from .sandbox import SandboxPolicy, install_sandbox, module_path

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "HISTORY_ENTRIES",
    "LOG_ENTRIES",
    "LOG_TEXT_LIMIT",
    "TEXT_LIMIT",
    "LuaSession",
    "SessionFactory",
    "Step",
    "estimate_tokens",
    "lua_size",
]

log = logging.getLogger("pool_notebook.worker.lua")

DEFAULT_MAX_MEMORY = 256 * 1024 * 1024
#: Transcript entries kept for ``status`` (algocline: the last 10).
HISTORY_ENTRIES = 10
#: Characters kept of each transcript text (the rest is cut, with a note).
TEXT_LIMIT = 65536
#: Log entries kept per session (algocline's ring buffer: 20), and characters of each.
LOG_ENTRIES = 20
LOG_TEXT_LIMIT = 4096
#: Lua instructions between two interrupt checks (~30-100 µs of plain Lua; a loop
#: of costly C calls, e.g. sorting a huge table each turn, checks less often).
HOOK_EVERY = 10_000
#: Extra room while Python copies data into Lua: an allocation failing there
#: would abort the process (lupa pushes outside a protected call).
HEADROOM = 1024 * 1024
_MAX_DEPTH = 100

# The coroutine driver. It runs before the sandbox, which then only sees the
# coroutine.create/resume/wrap defined here: every coroutine user code makes is
# interruptible and anchored (lupa 2.8 crashes if a coroutine that called into
# Python is collected while Python still holds one of its objects), and an
# alc.llm pause inside one is relayed up to the session.
_DRIVER = r"""
local interrupted, settle = ...
local create, resume, status, yield = coroutine.create, coroutine.resume, coroutine.status,
      coroutine.yield
local sethook, traceback = debug.sethook, debug.traceback
local error, pack, setmetatable, tostring, type, unpack, xpcall =
      error, table.pack, setmetatable, tostring, type, table.unpack, xpcall
local concat, ssub, utf8_len, math_type = table.concat, string.sub, utf8.len, math.type

local D = {}
local PAUSE = {}        -- private: only alc.llm's yields carry it
local anchored = {}
local co

local stopping = false

local function hook()
  if stopping or interrupted() then
    stopping = true
    sethook(hook, "", 1)  -- from now on every instruction of this thread fails
    error("interrupted", 0)
  end
end

local function hooked(c)
  if stopping then error("interrupted", 0) end
  sethook(c, hook, "", HOOK_EVERY)
  anchored[#anchored + 1] = c
  return c
end

-- An alc.llm pause inside a coroutine of the user's goes up to the session (and
-- the answers come back down), as algocline's blocking alc.llm works anywhere.
local function relay(c, ok, first, ...)
  if ok and first == PAUSE and status(c) == "suspended" then
    return relay(c, resume(c, yield(PAUSE, ...)))
  end
  return ok, first, ...
end
local function user_resume(c, ...) return relay(c, resume(c, ...)) end

coroutine.create = function(f) return hooked(create(f)) end
coroutine.resume = user_resume
coroutine.wrap = function(f)
  local c = hooked(create(f))
  return function(...)
    local r = pack(user_resume(c, ...))
    if r[1] then return unpack(r, 2, r.n) end
    error(r[2], 0)
  end
end

-- Invalid UTF-8 replaced by U+FFFD (error messages must always get through).
function D.clean(s)
  if utf8_len(s) then return s end
  local out, i, n = {}, 1, #s
  while i <= n do
    local ok, bad = utf8_len(s, i)
    if ok then out[#out + 1] = ssub(s, i); break end
    out[#out + 1] = ssub(s, i, bad - 1)
    out[#out + 1] = "\u{FFFD}"
    i = bad + 1
  end
  return concat(out)
end

local function text(q, key, i, optional)
  local s = q[key]
  if s == nil and optional then return end
  if type(s) ~= "string" then
    error("alc.llm: query " .. i .. ": " .. key .. " must be a string, got " .. type(s), 0)
  end
  local ok, bad = utf8_len(s)
  if not ok then
    error("alc.llm: query " .. i .. ": " .. key .. " is not valid UTF-8 (byte " .. bad .. ")", 0)
  end
end

-- alc.llm's only way out: one pause with these queries; returns the answers in order.
function D.pause(queries)
  if type(queries) ~= "table" or #queries == 0 then
    error("alc.llm: a pause needs at least one query", 0)
  end
  for i = 1, #queries do
    local q = queries[i]
    if type(q) ~= "table" then error("alc.llm: query " .. i .. " must be a table", 0) end
    text(q, "prompt", i)
    text(q, "system", i, true)
    local m = q.max_tokens
    if math_type(m) ~= "integer" or m < 0 or m > 4294967295 then
      error("alc.llm: query " .. i .. ": max_tokens must be an integer in 0..2^32-1", 0)
    end
  end
  local answers = yield(PAUSE, queries)
  if type(answers) == "string" then error(answers, 0) end  -- refused by the host
  return answers
end

function D.start(chunk)
  co = hooked(create(function() return xpcall(chunk, traceback) end))
end

-- One step of the session: ("paused", queries) | ("done", {result}) |
-- ("error", message) | ("yield", nil) for a yield that is not alc.llm's.
function D.resume(value)
  local ok, a, b = resume(co, value)
  if not ok then return "error", D.clean(tostring(a)) end
  if status(co) == "suspended" then
    if a == PAUSE then return "paused", b end
    return "yield", nil
  end
  if a then return "done", { b } end
  return "error", D.clean(tostring(b))
end

-- Host functions lift the cap on entry (Python copies their results into Lua
-- outside a protected call); alc.lua calls this when one has returned.
function D.settle() settle() end

-- Tables that are JSON arrays even when empty (weak keys: no leak).
D.arrays = setmetatable({}, { __mode = "k" })
function D.mark_array(t) D.arrays[t] = true return t end

D.null = setmetatable({}, {
  __metatable = "null",
  __tostring = function() return "null" end,
  __newindex = function() error("null is read-only", 2) end,
})
D.arrays[D.null] = "null"  -- to_py's one lookup tells null, arrays and objects apart
return D
""".replace("HOOK_EVERY", str(HOOK_EVERY))


@dataclass
class Step:
    """What a resume produced: ``paused`` (queries), ``accepted`` or ``done``/``error``."""

    kind: str
    queries: list[dict[str, Any]] = field(default_factory=list)
    remaining: int = 0
    result: Any = None
    error: str | None = None


@dataclass(eq=False)  # identity: two queries may carry the same fields
class _Entry:
    """One LLM query of the transcript (algocline's TranscriptEntry), texts cut."""

    query_id: str
    prompt: str
    system: str | None
    prompt_tokens: int
    started_at: int
    prompt_source: str = "estimated"
    response: str | None = None
    response_tokens: int = 0
    response_source: str = "estimated"
    completed_at: int | None = None
    held: int = 0  # bytes charged for the texts kept

    def to_history(self) -> dict[str, Any]:
        return {"query_id": self.query_id, "prompt": self.prompt, "response": self.response,
                "prompt_tokens": self.prompt_tokens, "response_tokens": self.response_tokens,
                "started_at": self.started_at, "completed_at": self.completed_at}


class _Tokens:
    """A session's token total with provenance (algocline's TokenCount, summed)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.by_source = {"estimated": 0, "provided": 0}

    def add(self, tokens: int, source: str) -> None:
        self.tokens += tokens
        self.by_source[source] += 1

    def remove(self, tokens: int, source: str) -> None:
        self.tokens -= tokens
        self.by_source[source] -= 1

    @property
    def source(self) -> str:
        """The weakest source counted: estimated < provided < definite (nothing counted)."""
        for source in ("estimated", "provided"):
            if self.by_source[source]:
                return source
        return "definite"


def _weaker(a: str, b: str) -> str:
    order = ("estimated", "provided", "definite")
    return order[min(order.index(a), order.index(b))]


def estimate_tokens(text: str) -> int:
    """algocline's estimate: ASCII ~4 chars per token, other characters ~1.5."""
    ascii_chars = len(text) if text.isascii() else len(text.encode("ascii", "ignore"))
    other = len(text) - ascii_chars
    return -(-ascii_chars // 4) + -(-(other * 2) // 3)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _cut(text: str, limit: int = TEXT_LIMIT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters not kept]"


def _mib(n: int) -> str:
    return f"{round(n / 2**20, 1):g} MiB"


class LuaSession:
    """One run of Lua code in its own VM, paused and resumed by LLM queries.

    ``LuaSession(sandbox=..., max_memory=..., allow_env=...)`` builds the VM only
    (see :class:`SessionFactory`); :meth:`bind` gives it its code, then
    :meth:`start`. Passing ``session_id`` and ``code`` does both at once.
    """

    def __init__(
        self,
        session_id: str | None = None,
        code: str = "",
        *,
        ctx: Any = None,
        lib_paths: Sequence[str] = (),
        sandbox: bool = True,
        max_memory: int = DEFAULT_MAX_MEMORY,
        allow_env: Iterable[str] = frozenset(),
    ) -> None:
        if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0:
            raise InvalidArgument(f"max_memory must be a positive number of bytes, "
                                  f"got {max_memory!r}")
        self.session_id = ""
        self.state = "idle"
        self.stats: dict[str, Any] = {}
        self.progress: dict[str, Any] | None = None
        self.pending: dict[str, dict[str, Any]] = {}
        self.answers: dict[str, str] = {}
        self.max_memory = max_memory
        self.lib_paths: tuple[str, ...] = ()
        self._allow_env = frozenset(allow_env)
        self._parent: LuaSession | None = None
        self._children: list[LuaSession] = []
        self._charged = 0
        self._interrupted: str | None = None
        self._failure: str | None = None
        self._code = ""
        self._started = self._ended = 0.0
        self._logs: deque[dict[str, Any]] = deque(maxlen=LOG_ENTRIES)
        self._history: deque[_Entry] = deque(maxlen=HISTORY_ENTRIES)
        self._open: dict[str, _Entry] = {}
        self._prompt_tokens = _Tokens()
        self._response_tokens = _Tokens()
        self.llm_calls = self.pauses = self.rounds = 0
        self.prompt_chars = self.response_chars = 0
        self._sandboxed = sandbox
        self._lua = _lua.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            max_memory=max_memory,
            attribute_filter=_deny_attributes,
        )
        g = self._lua.globals()
        g.python = None
        self._driver = self._lua.execute(_chunk("driver"), self._is_interrupted, self._settle)
        self._arrays = self._driver.arrays
        self._mark_array: Callable[[Any], Any] = self._driver.mark_array
        self.null = self._driver.null
        self._sandbox = (install_sandbox(self._lua, SandboxPolicy(
            allow_env=self._allow_env, log=self._sandbox_log)) if sandbox else None)
        host = self._lua.table()
        for name, value in natives.host_functions(self).items():
            is_python = _lua.lua_type(value) is None and callable(value)
            host[name] = self._lifting(value) if is_python else value
        host.array = self._driver.mark_array
        host.pause = self._driver.pause
        host.settle = self._driver.settle
        g.alc = self._lua.execute(_chunk("alc"), host)
        self._settle()
        if session_id is not None:
            self.bind(session_id, code, ctx=ctx, lib_paths=lib_paths)

    # -------------------------------------------------------------- lifecycle

    def bind(self, session_id: str, code: str, *, ctx: Any = None,
             lib_paths: Sequence[str] = ()) -> None:
        """Give this (fresh) VM its session: id, code, ``ctx`` and module paths."""
        if self.state != "idle":
            raise InvalidArgument("a LuaSession runs one session; build a new one")
        self.session_id, self._code, self.state = session_id, code, "running"
        self.lib_paths = tuple(lib_paths)
        self._started = time.perf_counter()
        try:  # a failure here is the session's (start() reports it), never the caller's
            if self._sandbox is not None:
                self._sandbox.add_lib_paths(lib_paths)
            else:
                package = self._lua.globals().package
                package.path = module_path(lib_paths) + ";" + package.path
            if ctx is not None:
                self.ensure_room(lua_size(ctx), "ctx")
                self._lua.globals().ctx = self.to_lua(ctx)
                self._settle()
        except LuaMemoryError as exc:
            self._failure = str(exc)
        except Exception as exc:  # e.g. a lone surrogate in ctx (API callers)
            log.exception("session %s could not be set up", session_id)
            self._failure = f"the worker could not set up this session: {type(exc).__name__}: {exc}"

    def start(self) -> Step:
        """Compile and run the code until its first pause or its end."""
        try:
            if self._failure is not None:
                return self._fail(self._failure)
            if self._stop_reason is not None:
                return self._fail(f"interrupted: {self._stop_reason}")
            self.ensure_room(_utf8_len(self._code), "the code")
            loaded = self._lua.globals().load(self._code, "=run", "t")
            self._settle()
            if isinstance(loaded, tuple):  # (nil, message)
                return self._fail(f"syntax error: {loaded[1]}")
            self._driver.start(loaded)
            return self._resume(None)
        except LuaMemoryError as exc:
            return self._fail(str(exc))
        except Exception as exc:  # whatever it was, the worker must go on
            return self._crashed(exc)

    def answer(self, query_id: str | None, response: str,
               usage: Mapping[str, Any] | None = None) -> Step:
        """Store one answer; resume the code once every pending query has one.

        Raises :class:`~pool_notebook.errors.ContinueRejected` (algocline's texts)
        for an answer that does not fit; the session is unchanged then.
        """
        if self.state != "paused":
            raise ContinueRejected("no paused session to continue")
        if query_id is None:
            waiting = [q for q in self.pending if q not in self.answers]
            if len(waiting) != 1:
                raise ContinueRejected(
                    f"query_id is required: {len(waiting)} queries are pending ({waiting})")
            query_id = waiting[0]
        if query_id not in self.pending:
            raise ContinueRejected(f"unknown query_id: {query_id}")
        if query_id in self.answers:
            raise ContinueRejected(f"already responded to query_id: {query_id}")
        if not isinstance(response, str):
            raise ContinueRejected(f"response must be a string, got {type(response).__name__}")
        prompt_tokens, completion_tokens = _usage(usage)
        try:
            if self._stop_reason is not None:
                return self._fail(f"interrupted: {self._stop_reason}")
            self.answers[query_id] = response
            self._record_answer(query_id, response, prompt_tokens, completion_tokens)
            remaining = len(self.pending) - len(self.answers)
            if remaining:
                return Step("accepted", remaining=remaining)
            return self._resume(self._answers_for_lua())
        except Exception as exc:  # whatever it was, the worker must go on
            return self._crashed(exc)

    def interrupt(self, reason: str) -> None:
        """Stop this session (any thread): running Lua fails at the next hook check
        (HOOK_EVERY instructions); a paused session fails at its next ``continue``;
        its fork children stop too."""
        self._interrupted = reason

    def fail(self, reason: str) -> Step:
        """End the session as Failed from outside (e.g. its reply cannot be sent)."""
        return self._fail(reason)

    def child(self) -> LuaSession:
        """A fresh VM for ``alc.fork`` (unbound): this session's sandbox and
        environment, inside this session's memory cap, stopped with it."""
        child = LuaSession(sandbox=self._sandboxed, max_memory=self.max_memory,
                           allow_env=self._allow_env)
        child._parent = self
        self._children.append(child)
        return child

    # -------------------------------------------------------------- observation

    def metrics(self) -> dict[str, Any]:
        """algocline's Finished metrics ``{"auto": {...}, "custom": {...}}``, plus
        ``recent_logs`` and ``progress`` (ours; algocline has them in its status)."""
        p, r = self._prompt_tokens, self._response_tokens
        auto = {
            "elapsed_ms": self.elapsed_ms,
            "llm_calls": self.llm_calls,
            "pauses": self.pauses,
            "rounds": self.rounds,
            "total_prompt_chars": self.prompt_chars,
            "total_response_chars": self.response_chars,
            "prompt_tokens": {"tokens": p.tokens, "source": p.source},
            "response_tokens": {"tokens": r.tokens, "source": r.source},
            "total_tokens": {"tokens": p.tokens + r.tokens,
                             "source": _weaker(p.source, r.source)},
        }
        out: dict[str, Any] = {"auto": auto, "custom": dict(self.stats),
                               "recent_logs": self.logs()}
        if self.progress is not None:
            out["progress"] = dict(self.progress)
        return out

    def history(self, limit: int = HISTORY_ENTRIES) -> list[dict[str, Any]]:
        """The last ``limit`` (at most 10) transcript entries, oldest first, the
        pending ones included (``response`` None); texts cut at TEXT_LIMIT."""
        entries = list(self._history)[-limit:] if limit > 0 else []
        return [e.to_history() for e in entries]

    def logs(self) -> list[dict[str, Any]]:
        """The last LOG_ENTRIES log entries ``{ts, level, source, message}``, oldest first."""
        return list(self._logs)

    def counters(self) -> tuple[int, int, int]:
        """(llm calls, elapsed ms, total tokens): what algocline's budget checks."""
        return (self.llm_calls, self.elapsed_ms,
                self._prompt_tokens.tokens + self._response_tokens.tokens)

    @property
    def elapsed_ms(self) -> int:
        """Wall-clock milliseconds since the session was bound, frozen when it ends."""
        end = self._ended or time.perf_counter()
        return int((end - self._started) * 1000) if self._started else 0

    # -------------------------------------------------------------- for natives

    def emit_log(self, level: str, message: str, source: str = "alc.log") -> None:
        """A log line of the session (print, io.write, alc.log): kept (bounded) and logged."""
        self._logs.append({"ts": _now_ms(), "level": level, "source": source,
                           "message": _cut(message, LOG_TEXT_LIMIT)})
        number = logging.getLevelName(level.upper())
        log.log(number if isinstance(number, int) else logging.INFO, "[%s] %s",
                self.session_id, message)

    def set_progress(self, step: int, total: int, message: str | None) -> None:
        """``alc.progress``: the session's current step (0 total = unknown)."""
        self.progress = {"step": step, "total": total,
                         "message": None if message is None else _cut(message, LOG_TEXT_LIMIT)}

    def ensure_room(self, nbytes: int, what: str) -> None:
        """Refuse (LuaMemoryError) ``nbytes`` more for the session if they would pass
        its cap; else make room to copy them into Lua safely (until the host
        function returns)."""
        used = self._used()
        if used + nbytes > self.max_memory:
            raise LuaMemoryError(
                f"{what}: {_mib(nbytes)} would exceed the session's memory cap of "
                f"{_mib(self.max_memory)} ({_mib(used)} in use); use less data or start "
                f"the worker with a larger --max-memory-mb")
        self._lua.set_max_memory(self._limit() + HEADROOM + nbytes)

    def charge(self, nbytes: int, what: str = "data kept by the worker") -> None:
        """Count ``nbytes`` the worker keeps for the session (alc.state, stats,
        cards) against its cap; LuaMemoryError if they do not fit."""
        self.ensure_room(nbytes, what)
        self._account(nbytes)

    def to_py(self, value: Any, depth: int = 0) -> Any:
        """Lua value -> JSON-able Python (arrays for 1..n tables and marked empties;
        alc.null is None). ValueError names what cannot be converted."""
        if depth > _MAX_DEPTH:
            raise ValueError(f"nesting deeper than {_MAX_DEPTH} (a cycle?)")
        kind = _lua.lua_type(value)
        if kind is None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{value} is not representable in JSON")
            return value
        if kind != "table":
            raise ValueError(f"a Lua {kind} is not representable in JSON")
        mark = self._arrays[value]
        if mark == "null":
            return None
        try:
            items = list(value.items())
        except UnicodeDecodeError as exc:
            raise _not_utf8(exc) from None
        if not items:
            return [] if mark is True else {}
        keys = [k for k, _ in items]
        if all(type(k) is int for k in keys) and sorted(keys) == list(range(1, len(keys) + 1)):
            return [self.to_py(v, depth + 1) for _, v in sorted(items, key=lambda kv: kv[0])]
        out = {}
        for k, v in items:
            if isinstance(k, float) and k.is_integer():
                k = int(k)
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise ValueError(f"table key of type {_lua.lua_type(k) or type(k).__name__}")
            out[str(k)] = self.to_py(v, depth + 1)
        return out

    def to_lua(self, value: Any) -> Any:
        """JSON-able Python -> Lua (lists become marked arrays; None inside
        containers becomes alc.null, a top-level None is nil)."""
        if isinstance(value, dict):
            table = self._lua.table()
            for k, v in value.items():
                table[k] = self.null if v is None else self.to_lua(v)
            return table
        if isinstance(value, list):
            table = self._lua.table()
            for i, v in enumerate(value, 1):
                table[i] = self.null if v is None else self.to_lua(v)
            return self._mark_array(table)
        return value

    # -------------------------------------------------------------- internals

    def _resume(self, value: Any) -> Step:
        self._settle()
        try:
            kind, payload = self._driver.resume(value)
        except _lua.LuaError as exc:  # the driver itself failed (e.g. a bad __tostring)
            kind, payload = "error", str(exc)
        if self._stop_reason is not None:
            return self._fail(f"interrupted: {self._stop_reason}")
        if kind == "paused":
            return self._pause(payload)
        if kind == "yield":
            return self._fail("coroutine.yield() outside a coroutine the code created: "
                              "only alc.llm may pause a session")
        if kind == "done":
            try:
                result = self.to_py(payload[1])
            except UnicodeDecodeError as exc:  # a string result
                return self._fail(f"cannot return this value: {_not_utf8(exc)}")
            except ValueError as exc:
                return self._fail(f"cannot return this value: {exc}")
            return self._finish(Step("done", result=result))
        message = str(payload)
        if "not enough memory" in message:
            message += (f" (the session's memory cap of {_mib(self.max_memory)} was reached;"
                        " start the worker with a larger --max-memory-mb)")
        return self._fail(message)

    def _pause(self, batch: Any) -> Step:
        """Record the queries of a pause (validated by the driver) and report them."""
        now = _now_ms()
        queries = []
        for i in range(len(batch)):
            q = batch[i + 1]
            query: dict[str, Any] = {"id": f"q-{i}", "prompt": q["prompt"],
                                     "system": q["system"], "max_tokens": q["max_tokens"]}
            for flag in ("grounded", "underspecified"):
                if q[flag] is True:
                    query[flag] = True
            queries.append(query)
        self.pending = {q["id"]: q for q in queries}
        self.answers = {}
        self.pauses += 1
        self.llm_calls += len(queries)
        self._open = {}
        for q in queries:
            prompt, system = q["prompt"], q["system"]
            tokens = estimate_tokens(prompt) + (estimate_tokens(system) if system else 0)
            self.prompt_chars += _utf8_len(prompt) + (_utf8_len(system) if system else 0)
            entry = _Entry(q["id"], _cut(prompt), None if system is None else _cut(system),
                           tokens, now)
            self._prompt_tokens.add(tokens, "estimated")
            self._response_tokens.add(0, "estimated")
            self._keep(entry)
            self._open[entry.query_id] = entry
        self.state = "paused"
        return Step("paused", queries=queries)

    def _record_answer(self, query_id: str, response: str, prompt_tokens: int | None,
                       completion_tokens: int | None) -> None:
        """algocline's on_response_fed: the entry's response, tokens and timestamp."""
        entry = self._open[query_id]
        self.response_chars += _utf8_len(response)
        entry.response, entry.completed_at = _cut(response), _now_ms()
        if entry in self._history:  # what is kept is charged until it is dropped
            self._account(len(entry.response))
            entry.held += len(entry.response)
        if prompt_tokens is not None:
            self._prompt_tokens.remove(entry.prompt_tokens, entry.prompt_source)
            entry.prompt_tokens, entry.prompt_source = prompt_tokens, "provided"
            self._prompt_tokens.add(prompt_tokens, "provided")
        self._response_tokens.remove(entry.response_tokens, entry.response_source)
        if completion_tokens is not None:
            entry.response_tokens, entry.response_source = completion_tokens, "provided"
        else:
            entry.response_tokens = estimate_tokens(response)
        self._response_tokens.add(entry.response_tokens, entry.response_source)

    def _answers_for_lua(self) -> Any:
        """The answers of the pause as a Lua array, or an error text for alc.llm when
        they do not fit the memory cap (checked before anything is copied)."""
        ordered = [self.answers[q] for q in self.pending]
        self.pending, self.answers, self._open = {}, {}, {}
        self.rounds += 1
        self.state = "running"
        size = sum(32 + _utf8_len(a) for a in ordered)
        try:
            self.ensure_room(size, "the answers")
        except LuaMemoryError as exc:
            return f"alc.llm: {exc}"
        return self._mark_array(self._lua.table_from(ordered))

    def _keep(self, entry: _Entry) -> None:
        """Add a transcript entry; the oldest beyond HISTORY_ENTRIES is dropped."""
        if len(self._history) == self._history.maxlen:
            self._account(-self._history[0].held)
        entry.held = len(entry.prompt) + len(entry.system or "")
        self._account(entry.held)
        self._history.append(entry)

    def _fail(self, error: str) -> Step:
        return self._finish(Step("error", error=error))

    def _finish(self, step: Step) -> Step:
        self.state = "completed" if step.kind == "done" else "failed"
        self._ended = time.perf_counter()
        self.pending, self.answers, self._open = {}, {}, {}
        if self._parent is not None and self in self._parent._children:
            self._parent._children.remove(self)  # a finished child no longer counts
        return step

    def _crashed(self, exc: Exception) -> Step:
        log.exception("session %s failed inside the worker", self.session_id)
        return self._fail(f"the worker could not run this session: {type(exc).__name__}: {exc}")

    @property
    def _stop_reason(self) -> str | None:
        """Why this session must stop: its own interrupt or a parent's."""
        session: LuaSession | None = self
        while session is not None:
            if session._interrupted is not None:
                return session._interrupted
            session = session._parent
        return None

    def _is_interrupted(self) -> bool:
        """(count hook) whether to stop; also settles the cap if a host call left it lifted."""
        self._settle()
        return self._stop_reason is not None

    def _sandbox_log(self, level: str, source: str, message: str) -> None:
        self.emit_log(level, message, source)

    # memory: Lua may use the cap minus what Python keeps for the session

    def _heap(self) -> int:
        return int(self._lua.get_memory_used() or 0)

    def _used(self) -> int:
        """Bytes counted against the cap: every VM of the family (this session,
        its fork children, its parent) and what Python keeps for them."""
        root = self
        while root._parent is not None:
            root = root._parent
        total, stack = 0, [root]
        while stack:
            session = stack.pop()
            total += session._heap() + session._charged
            stack.extend(session._children)
        return total

    def _limit(self) -> int:
        """What this VM's Lua heap may reach: the cap minus everything else counted."""
        return max(self.max_memory - self._used() + self._heap(), 1)

    def _account(self, nbytes: int) -> None:
        self._charged = max(self._charged + nbytes, 0)

    def _lifting(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a host function) run with room to copy its results into Lua."""
        def call(*args: Any) -> Any:
            self._lua.set_max_memory(self._limit() + HEADROOM)
            return fn(*args)
        return call

    def _settle(self) -> None:
        """Back to the session's cap (Lua allocations past it fail as Lua errors)."""
        self._lua.set_max_memory(self._limit())


class SessionFactory:
    """Builds :class:`LuaSession` objects, keeping the next VM built ahead.

    Building a VM (runtime, driver, sandbox, ``alc`` prelude) is most of a short
    session's cost, so it happens off the request path: ``prewarm(wait=False)``
    (at worker start, and after each reply is sent) builds the next VM on a
    background thread, and ``new`` hands it out (waiting for it if it is still
    being built, building one itself if none was asked for).
    ``prewarm()`` (``wait=True``) builds and waits.
    """

    def __init__(self, *, sandbox: bool = True, max_memory: int = DEFAULT_MAX_MEMORY,
                 allow_env: Iterable[str] = frozenset()) -> None:
        allow = frozenset(allow_env)
        SandboxPolicy(allow_env=allow)  # InvalidArgument now (worker start), not at each run
        self._build: Callable[[], LuaSession] = lambda: LuaSession(
            sandbox=sandbox, max_memory=max_memory, allow_env=allow)
        self._next: Future[LuaSession] | None = None
        self._lock = threading.Lock()

    def new(self, session_id: str, code: str, *, ctx: Any = None,
            lib_paths: Sequence[str] = ()) -> LuaSession:
        """A session bound to ``code``, on the VM built ahead when there is one."""
        with self._lock:
            built, self._next = self._next, None
        session = _result(built) if built is not None else None
        if session is None:
            session = self._build()
        session.bind(session_id, code, ctx=ctx, lib_paths=lib_paths)
        return session

    def prewarm(self, *, wait: bool = True) -> None:
        """Start building the next session's VM unless one is built or building."""
        with self._lock:
            if self._next is None:
                self._next = _BUILDER.submit(self._build)
            building = self._next
        if wait:
            _result(building)


#: Builds VMs ahead for every SessionFactory (one thread: builds do not pile up).
_BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lua-prewarm")


def _result(built: Future[LuaSession]) -> LuaSession | None:
    """The VM built ahead, or None (logged) if building it failed."""
    try:
        return built.result()
    except Exception:  # the caller builds one itself, which raises where it belongs
        log.exception("building a Lua VM ahead failed")
        return None


def _usage(usage: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from ``continue``'s usage, validated."""
    if not usage:
        return None, None
    out: list[int | None] = []
    for key in ("prompt_tokens", "completion_tokens"):
        value = usage.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= MAX_USAGE_TOKENS):
            raise ContinueRejected(f"usage.{key} must be an integer in 0..2^53, got {value!r}")
        out.append(value)
    return out[0], out[1]


def _utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (algocline counts chars as Rust's ``len()``: bytes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@functools.cache
def _chunk(name: str) -> bytes:
    """The driver or the ``alc`` prelude (``alc.lua``) compiled once per process:
    loading bytecode into each new VM is several times cheaper than parsing it.
    Chunk names are ``<driver>``/``<alc>`` (runtime-internal in tracebacks)."""
    source = (_DRIVER if name == "driver" else
              resources.files(__package__).joinpath("alc.lua").read_text("utf-8"))
    compiler = _lua.LuaRuntime(encoding=None)
    dump = compiler.eval("function(s, n) return string.dump(assert(load(s, n, 't'))) end")
    code: bytes = dump(source.encode("utf-8"), f"=<{name}>".encode())
    return code


def _not_utf8(exc: UnicodeDecodeError) -> ValueError:
    return ValueError(f"a string is not valid UTF-8 ({exc.reason} at byte {exc.start + 1}); "
                      "cut strings with utf8.offset, not string.sub")


def _deny_attributes(obj: Any, name: Any, is_setting: bool) -> Any:
    raise AttributeError("Python objects are opaque to sandboxed Lua")
