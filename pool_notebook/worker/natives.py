"""The native half of the ``alc`` API: Python functions handed to ``alc.lua`` as ``host``.

``alc.lua`` (the pure-Lua half, like algocline's prelude) receives the table
built by :func:`host_functions` and wires ``alc.*`` to it. Every value crossing
into Lua goes through the session's ``to_lua`` / ``to_py`` conversions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runtime import LuaSession

__all__ = ["host_functions", "read_source"]

log = logging.getLogger("pool_notebook.worker.lua")


def read_source(path: str) -> str:
    """A Lua module's text (the module searcher's only file access)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def host_functions(session: LuaSession) -> dict[str, Callable[..., Any]]:
    """The ``host`` table ``alc.lua`` is run with, bound to ``session``."""

    def log_(level: Any, message: Any = None) -> None:
        if message is None:
            level, message = "info", level
        number = logging.getLevelName(str(level).upper())
        log.log(number if isinstance(number, int) else logging.INFO, "[%s] %s",
                session.session_id, message)

    def json_encode(value: Any) -> str:
        try:
            return json.dumps(session.to_py(value), ensure_ascii=False, allow_nan=False)
        except ValueError as exc:
            raise ValueError(f"alc.json_encode: {exc}") from None

    def json_decode(text: Any) -> Any:
        if not isinstance(text, str):
            raise ValueError("alc.json_decode: expected a string")
        try:
            return session.to_lua(json.loads(text))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"alc.json_decode: invalid JSON: {exc}") from None

    def state_get(key: Any, default: Any = None) -> Any:
        kv = session.kv
        return session.to_lua(kv[key]) if key in kv else default

    def state_set(key: Any, value: Any) -> None:
        session.kv[key] = session.to_py(value)

    return {
        "log": log_,
        "json_encode": json_encode,
        "json_decode": json_decode,
        "state_get": state_get,
        "state_set": state_set,
        "read_source": read_source,
    }
