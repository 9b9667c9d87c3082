"""The native half of the ``alc`` API: Python functions handed to ``alc.lua`` as ``host``.

``alc.lua`` (the pure-Lua half, like algocline's prelude) receives the table
built by :func:`host_functions` and wires ``alc.*`` to it. Every host function
answers ``(true, results...)`` or ``(false, message)`` (see :func:`_guarded`),
which ``alc.lua`` raises as a plain Lua error. Values crossing into Lua go
through the session's ``to_lua`` / ``to_py`` conversions, so Lua never sees a
Python object. What lives on disk (state, cards) is in :mod:`.stores`, the
numerics of ``alc.math`` in :mod:`.mathlib`, text helpers in :mod:`.textops`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..registry import algocline_home, home
from . import textops
from .jsontext import json_text
from .stores import CardStore, StateStore, StoreError

if TYPE_CHECKING:
    from .mathlib import MathLib
    from .runtime import LuaSession, Step

__all__ = ["host_functions", "lua_size"]

def lua_size(value: Any) -> int:
    """Bytes ``value`` (JSON-able Python) will take as Lua values, roughly."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += 32 + len(v) if v.isascii() else 32 + len(v.encode("utf-8", "replace"))
        elif isinstance(v, dict):
            total += 64 + 48 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            total += 64 + 16 * len(v)
            stack.extend(v)
    return total


def _json_int(text: str) -> int | float:
    """A JSON integer as serde_json reads it: i64, else a float (Lua has no bigger ints)."""
    n = int(text)
    return n if -2**63 <= n < 2**63 else float(n)


def _no_constant(name: str) -> Any:
    """NaN / Infinity are not JSON (Python's json accepts them, serde_json does not)."""
    raise ValueError(f"{name} is not valid JSON")


def _opt(table: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    """``table[key]`` when ``table`` is a dict and the value has type ``kind``, else None."""
    if not isinstance(table, dict):
        return None
    value = table.get(key)
    if isinstance(value, bool) and kind is not bool:
        return None
    return value if isinstance(value, kind) else None


def _count(table: Any, key: str, fname: str) -> int | None:
    """``table[key]`` as a non-negative integer (a usize for algocline), None if absent."""
    value = table.get(key) if isinstance(table, dict) else None
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{fname}: {key} must be a non-negative integer, got {value!r}")
    return value


def _text(value: Any, fname: str, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{fname}: {what} must be a string, got {_lua_type(value)}")
    return value


def _lua_type(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "table"


@functools.lru_cache(maxsize=4)
def _places(pool_home: str | None, alc_home: str | None) -> tuple[dict[str, str], StateStore,
                                                                 CardStore]:
    """``alc._dirs`` and the stores for these homes (built once: sessions are many)."""
    del pool_home, alc_home  # the cache key; home() and algocline_home() read them
    root = home()
    dirs = {"state": str(root / "state"), "cards": str(root / "cards"),
            "scenarios": str(algocline_home() / "scenarios")}
    return dirs, StateStore(root / "state"), CardStore(root / "cards")


@dataclass
class _Child:
    """One strategy of an ``alc.fork``: its own VM and its last step."""

    strategy: str
    session: LuaSession
    step: Step

    def report(self) -> dict[str, Any]:
        if self.step.kind == "paused":
            return {"strategy": self.strategy,
                    "queries": [{k: v for k, v in q.items() if k != "id" and v is not None}
                                for q in self.step.queries]}
        if self.step.kind == "done":
            return {"strategy": self.strategy, "ok": True, "result": self.step.result}
        return {"strategy": self.strategy, "ok": False, "error": self.step.error}


class _Bridge:
    """The host functions of one session, with the stores and RNGs they share."""

    def __init__(self, session: LuaSession) -> None:
        self.session = session
        self.dirs, self.state, self.cards = _places(os.environ.get("POOL_NOTEBOOK_HOME"),
                                                    os.environ.get("ALC_HOME"))
        self._math: MathLib | None = None
        self.forks: dict[int, list[_Child]] = {}
        self.slot_sizes: dict[tuple[str, ...], int] = {}

    @property
    def math_lib(self) -> MathLib:
        """The session's alc.math (imported on first use: the worker starts without numpy)."""
        if self._math is None:
            from .mathlib import MathLib
            self._math = MathLib()
        return self._math

    # ------------------------------------------------------------------ values

    def py(self, value: Any) -> Any:
        """A Lua argument as JSON-able Python (alc.null is None)."""
        return self.session.to_py(value)

    def lua(self, value: Any) -> Any:
        """JSON-able Python as a Lua value (None inside containers is alc.null)."""
        return self.session.to_lua(value)

    def charge(self, value: Any, what: str) -> None:
        """Count data the worker keeps for the session against its memory cap."""
        self.session.charge(lua_size(value), what)

    def charge_slot(self, slot: tuple[str, ...], size: int, what: str) -> None:
        """Count a value the session keeps under a name (a state key, a stat) while it
        stands: set again, only the difference is charged; deleted, it is given back."""
        before = self.slot_sizes.get(slot, 0)
        self.session.charge(size - before, what)
        self.slot_sizes[slot] = size

    # ------------------------------------------------------------------ log, json

    def log(self, level: Any, message: Any = None) -> None:
        if message is None:
            level, message = "info", level
        self.emit(str(level), str(message))

    def emit(self, level: str, message: str, source: str = "alc.log") -> None:
        """Into the session log; an unknown level is kept as given (logged as info), as
        algocline's log sink keeps it."""
        self.session.emit_log(level, message, source)

    def print(self, line: Any) -> None:
        self.emit("info", str(line).rstrip("\n"), "alc.lua.print")

    def json_encode(self, value: Any) -> str:
        try:
            return json_text(self.py(value))
        except ValueError as exc:
            raise ValueError(f"alc.json_encode: {exc}") from None

    def json_decode(self, text: Any) -> Any:
        _text(text, "alc.json_decode", "the argument")
        try:
            value = json.loads(text, parse_int=_json_int, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"alc.json_decode: {exc}") from None
        self.reserve(value, "alc.json_decode")
        return self.session.null if value is None else self.lua(value)

    def reserve(self, value: Any, fname: str) -> None:
        """Refuse, before copying into Lua, a value the session's memory cap cannot hold
        (copying first would abort or thrash the VM at the cap)."""
        self.session.ensure_room(lua_size(value), fname)

    # ------------------------------------------------------------------ state

    def state_op(self, op: str, ns: str, key: Any = None, *args: Any) -> Any:
        if op == "keys":
            return self.lua(self.state.keys(ns))
        key = _text(key, f"alc.state.{op}", "key")
        if op == "get":
            found, value = self.state.get(ns, key)
            if not found:
                return args[0] if args else None
            self.reserve(value, "alc.state.get")
            return self.session.null if value is None else self.lua(value)
        if op in ("set", "set_nx"):
            value = self.py(args[0] if args else None)
            if op == "set_nx" and self.state.has(ns, key):
                return False
            self.charge_slot(("state", ns, key), lua_size(value), f"alc.state.{op}")
            if op == "set":
                self.state.set(ns, key, value)
                return None
            return self.state.set_nx(ns, key, value)
        if op == "delete":
            self.state.delete(ns, key)
            self.charge_slot(("state", ns, key), 0, "alc.state.delete")
            return None
        if op == "has":
            return self.state.has(ns, key)
        delta = args[0] if args and args[0] is not None else 1.0
        default = args[1] if len(args) > 1 and args[1] is not None else 0.0
        for name, v in (("delta", delta), ("default", default)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"alc.state.incr: {name} must be a number")
        return self.state.incr(ns, key, float(delta), float(default))

    # ------------------------------------------------------------------ cards

    def card_op(self, op: str, *args: Any) -> Any:
        a = [self.py(v) for v in args]
        first = a[0] if a else None
        second = a[1] if len(a) > 1 else None
        cards = self.cards
        if op == "create":
            self.charge(first, "alc.card.create")
            card_id, path = cards.create(first)
            return self.lua({"card_id": card_id, "path": path})
        if op in ("list", "alias_list"):
            pkg = _opt(first, "pkg", str)
            return self.lua(cards.list_cards(pkg) if op == "list" else cards.alias_list(pkg))
        if op == "find":
            q = first if isinstance(first, dict) else {}
            return self.lua(cards.find(pkg=_opt(q, "pkg", str), where=q.get("where"),
                                       order_by=q.get("order_by"),
                                       limit=_count(q, "limit", "alc.card.find"),
                                       offset=_count(q, "offset", "alc.card.find")))
        if op == "sink_backfill":
            if not isinstance(first, dict) or not isinstance(first.get("sink"), str):
                raise ValueError("alc.card.sink_backfill: params.sink must be a string")
            return self.lua(cards.sink_backfill(first["sink"], bool(first.get("dry_run"))))
        if op == "lineage":
            if not isinstance(first, dict):
                raise ValueError("alc.card.lineage: expected a query table")
            filt = first.get("relation_filter")
            return self.lua(cards.lineage(
                _text(first.get("card_id"), "alc.card.lineage", "card_id"),
                direction=_opt(first, "direction", str) or "up",
                depth=_count(first, "depth", "alc.card.lineage"),
                include_stats=first.get("include_stats") is not False,
                relation_filter=[str(r) for r in filt] if isinstance(filt, list) else None))
        card_id = _text(first, f"alc.card.{op}", "the first argument")
        if op in ("get", "get_by_alias"):
            card = cards.get(card_id) if op == "get" else cards.get_by_alias(card_id)
            self.reserve(card, f"alc.card.{op}")
            return self.lua(card)
        if op == "append":
            self.charge(second, "alc.card.append")
            return self.lua(cards.append(card_id, second))
        if op == "alias_set":
            opts = a[2] if len(a) > 2 else None
            target = _text(second, "alc.card.alias_set", "card_id")
            return self.lua(cards.alias_set(card_id, target, _opt(opts, "pkg", str),
                                            _opt(opts, "note", str)))
        if op == "write_samples":
            self.charge(second, "alc.card.write_samples")
            path, count = cards.write_samples(card_id, second)
            return self.lua({"path": path, "count": count})
        if op == "read_samples":
            samples = cards.read_samples(card_id,
                                         offset=_count(second, "offset", "alc.card.read_samples")
                                         or 0,
                                         limit=_count(second, "limit", "alc.card.read_samples"),
                                         where=_opt(second, "where", dict))
            self.reserve(samples, "alc.card.read_samples")
            return self.lua(samples)
        raise ValueError(f"alc.card.{op}: no such function")

    # ------------------------------------------------------------------ the rest

    def stats_record(self, key: Any, value: Any) -> None:
        name, converted = _text(key, "alc.stats.record", "key"), self.py(value)
        self.charge_slot(("stats", name), lua_size(converted), "alc.stats.record")
        self.session.stats[name] = converted

    def stats_get(self, key: Any) -> Any:
        return self.lua(self.session.stats.get(_text(key, "alc.stats.get", "key")))

    def progress(self, step: Any, total: Any, message: Any = None) -> None:
        for name, v in (("step", step), ("total", total)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"alc.progress: {name} must be a non-negative integer")
        self.session.set_progress(int(step), int(total), None if message is None else str(message))

    def math(self, name: Any, *args: Any) -> Any:
        """``alc.math.<name>(args...)``."""
        if name not in self.math_lib.NAMES:
            raise ValueError(f"alc.math.{name}: no such function")
        return self.lua(getattr(self.math_lib, name)(*(self.py(a) for a in args)))

    def fork_start(self, strategies: Any, ctx: Any) -> tuple[int, Any]:
        """Start each strategy's ``run(ctx)`` in a VM of its own (``session.child()``:
        same sandbox, inside the session's memory cap); returns (fork id, report)."""
        names, context = self.py(strategies), self.py(ctx)
        parent = self.session
        children = []
        for i, name in enumerate(names):
            child = parent.child()
            child.bind(f"{parent.session_id}/fork-{i}",
                       f"return require({json.dumps(name)}).run(ctx)", ctx=context,
                       lib_paths=parent.lib_paths)
            children.append(_Child(name, child, child.start()))
        fork_id = max(self.forks, default=0) + 1
        self.forks[fork_id] = children
        return self._fork_report(fork_id)

    def fork_answer(self, fork_id: Any, answers: Any) -> tuple[int, Any]:
        """Hand one round's answers (in query order) to the paused children."""
        texts = iter(self.py(answers))
        for c in self.forks[fork_id]:
            if c.step.kind == "paused":
                for query in c.step.queries:
                    step = c.session.answer(query["id"], next(texts), None)
                c.step = step
        return self._fork_report(fork_id)

    def _fork_report(self, fork_id: int) -> tuple[int, Any]:
        children = self.forks[fork_id]
        if all(c.step.kind != "paused" for c in children):
            del self.forks[fork_id]  # the children's VMs go with it
        return fork_id, self.lua([c.report() for c in children])

    def chunk(self, text: Any, opts: Any = None) -> Any:
        o = self.py(opts)
        mode = _opt(o, "mode", str) or "lines"
        size = _opt(o, "size", int)
        overlap = _opt(o, "overlap", int)
        pieces = textops.chunk(_text(text, "alc.chunk", "text"), mode=mode,
                               size=50 if size is None else max(size, 0),
                               overlap=0 if overlap is None else max(overlap, 0))
        return self.lua(pieces)

    def match_enum(self, text: Any, candidates: Any, opts: Any = None) -> Any:
        values = self.py(candidates)
        if not isinstance(values, list) or not all(isinstance(c, str) for c in values):
            raise ValueError("alc.match_enum: candidates must be an array of strings")
        threshold = _opt(self.py(opts), "threshold", (int, float))
        return textops.match_enum(_text(text, "alc.match_enum", "text"), values,
                                  0.7 if threshold is None else float(threshold))

    def table(self) -> dict[str, Any]:
        """Every host function, guarded (see :func:`_guarded`); ``null`` as a value."""
        return {name: f if name == "null" else _guarded(name, f)
                for name, f in self._functions().items()}

    def _functions(self) -> dict[str, Any]:
        return {
            "null": self.session.null,
            "log": self.log,
            "print": self.print,
            "json_encode": self.json_encode,
            "json_decode": self.json_decode,
            "state": self.state_op,
            "card": self.card_op,
            "stats_record": self.stats_record,
            "stats_get": self.stats_get,
            "counters": self.session.counters,
            "progress": self.progress,
            "chunk": self.chunk,
            "fork_start": self.fork_start,
            "fork_answer": self.fork_answer,
            "match_enum": self.match_enum,
            "match_bool": lambda text: textops.match_bool(_text(text, "alc.match_bool", "text")),
            "time": time.time,
            "dirs": lambda: self.lua(self.dirs),
            "math": self.math,
            "math_names": lambda: self.lua(sorted(self.math_lib.NAMES)),
            "rng_floats": lambda rng, n: self.lua(self.math_lib.floats(rng, n)),
        }


_DOMAIN_ERRORS = (ValueError, StoreError, KeyError, MemoryError)  # MathError is a ValueError


def _guarded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` returning ``(True, *results)``, or ``(False, message)`` instead of raising.

    ``alc.lua`` raises the message as a Lua error. No Python exception ever reaches
    Lua: its traceback would keep the Lua arguments (and their coroutine's state)
    alive past the coroutine, and it would be a Python object in the sandbox.
    """
    def call(*args: Any) -> tuple[Any, ...]:
        try:
            result = fn(*args)
        except _DOMAIN_ERRORS as exc:
            message = str(exc) if not isinstance(exc, KeyError) else f"unknown handle {exc}"
        except Exception as exc:  # a bug here must still fail the Lua call, not the worker
            message = f"{name}: internal error: {type(exc).__name__}: {exc}"
        else:
            return (True, *result) if isinstance(result, tuple) else (True, result)
        del args
        return (False, message)
    return call


def host_functions(session: LuaSession) -> dict[str, Any]:
    """The ``host`` table ``alc.lua`` is run with, bound to ``session``."""
    return _Bridge(session).table()
