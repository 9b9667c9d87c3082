"""pool_notebook: drive pool workers from Jupyter.

``%load_ext pool_notebook`` for the magics; the same features as plain Python:
:class:`PoolClient` (asyncio, one connection), :func:`spawn_worker`, the
registry, and the notebook-level :func:`connect` / :func:`history` API.

Importing the package has no side effects: every name below is loaded on first
use (``__getattr__``), so ``python -m pool_notebook.worker`` never loads the
notebook layer (pandas, IPython, the connection manager or the history).
"""

from __future__ import annotations

import importlib
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from . import errors as _errors
from ._version import PROTOCOL_VERSION, __version__

if TYPE_CHECKING:
    import pandas as pd
    from IPython.core.interactiveshell import InteractiveShell

    from . import llm
    from .client import LateReply, PoolClient
    from .connections import Connection, ConnectionManager, ConnectionState, Reply
    from .errors import *  # noqa: F403
    from .history import Outcome
    from .mapping import WorkerPool, compare_maps, map_summary
    from .mapping import map as map  # lazy, and not in __all__ (it would hide map())
    from .protocol import (
        Accepted,
        Cancelled,
        Completed,
        Continue,
        Failed,
        FeedData,
        Finished,
        Handshake,
        Paused,
        Query,
        RawRequest,
        Response,
        Run,
        Shutdown,
        Status,
        StatusData,
    )
    from .registry import Registry, WorkerEntry
    from .session import Answer, Session, SessionState, resolve_responder
    from .spawn import WorkerProcess, spawn_and_connect, spawn_worker

    def history(*, all_sessions: bool = False) -> pd.DataFrame:
        """Every request made through pool_notebook, as a DataFrame (``history.py``)."""

#: Where each lazily loaded public name lives (module relative to this package).
_LAZY = {
    "LateReply": "client", "PoolClient": "client",
    "Connection": "connections", "ConnectionState": "connections", "Reply": "connections",
    "Outcome": "history", "history": "history", "llm": "llm",
    "Answer": "session", "Session": "session", "SessionState": "session",
    "resolve_responder": "session",
    "Registry": "registry", "WorkerEntry": "registry",
    "map": "mapping", "WorkerPool": "mapping", "map_summary": "mapping",
    "compare_maps": "mapping",
    "WorkerProcess": "spawn", "spawn_and_connect": "spawn", "spawn_worker": "spawn",
    **{name: "protocol" for name in (
        "Accepted", "Cancelled", "Completed", "Continue", "Failed", "FeedData", "Finished",
        "Handshake", "Paused", "Query", "RawRequest", "Response", "Run", "Shutdown", "Status",
        "StatusData")},
}

__all__ = [
    "PROTOCOL_VERSION", "Accepted", "Answer", "Cancelled", "Completed", "Connection",
    "ConnectionState", "Continue", "Failed", "FeedData", "Finished", "Handshake", "LateReply",
    "Outcome", "Paused", "PoolClient", "Query", "RawRequest", "Registry", "Reply", "Response",
    "Run", "Session", "SessionState", "Shutdown", "Status", "StatusData", "WorkerEntry",
    "WorkerProcess", "__version__", "connect", "connection", "disconnect", "history",
    "llm", "load_ipython_extension", "resolve_responder", "spawn_and_connect", "spawn_worker",
    "unload_ipython_extension",
]
# issue 11 (mapping.py); pool_notebook.map is lazy too, but not starred: it would hide map()
__all__ += ["WorkerPool", "compare_maps", "map_summary"]
__all__ += _errors.__all__


def __getattr__(name: str) -> Any:
    if name in _errors.__all__:
        return getattr(_errors, name)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pool_notebook' has no attribute {name!r}")
    loaded = importlib.import_module(f".{module}", __name__)
    value = loaded if name == module else getattr(loaded, name)  # history, llm: modules
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _manager() -> ConnectionManager:
    """The kernel-wide connection manager (created on first use, with the history)."""
    from .connections import manager

    return manager


def connect(sock: Any = None, **options: Any) -> Coroutine[Any, Any, Connection]:
    """Connect (spawning the bundled worker when no socket is given); await it.

    Options as :meth:`pool_notebook.connections.ConnectionManager.connect`:
    ``name``, ``sid``, ``spawn``, ``version``, ``timeout``, ``allow_insecure``.
    """
    return _manager().connect(sock, **options)


def connection(name: str | None = None) -> Connection:
    """The named open connection, or the current one."""
    return _manager().get(name)


def disconnect(name: str | None = None) -> Connection:
    """Close a connection; its worker exits unless it holds a paused session."""
    return _manager().disconnect(name)


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """``%load_ext pool_notebook``: register the magics (loading twice is harmless)."""
    from .magics import PoolMagics, complete_names

    ipython.register_magics(PoolMagics)
    for magic in ("pool_send", "pool_run", "pool_status", "pool_disconnect", "pool_history"):
        ipython.set_hook("complete_command", complete_names, str_key=f"%{magic}")
        ipython.set_hook("complete_command", complete_names, str_key=f"%%{magic}")


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """``%unload_ext pool_notebook``: close our connections and write the history."""
    _manager().close_all()
    import sys

    dask_side = sys.modules.get(f"{__name__}.mapping_dask")  # only if a map used Dask
    if dask_side is not None:
        dask_side.close_clients()  # the Clients %%pool_map --cluster ADDRESS made
