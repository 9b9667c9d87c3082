"""pool_notebook: drive pool workers from Jupyter.

``%load_ext pool_notebook`` for the magics; the same features as plain Python:
:class:`PoolClient` (asyncio, one connection), :func:`spawn_worker`, the
registry, and the notebook-level :func:`connect` / :func:`history` API.
"""

from __future__ import annotations

import atexit
from typing import TYPE_CHECKING, Any

from ._version import PROTOCOL_VERSION, __version__
from .client import LateReply, PoolClient
from .connections import Connection, Reply, manager
from .errors import (
    ClientClosed,
    ConnectError,
    ConnectionBroken,
    ConnectionClosed,
    ConnectionNotFound,
    HandshakeError,
    HandshakeTimeout,
    InsecureSocketError,
    MalformedRequest,
    PoolError,
    ProtocolError,
    ReadError,
    RegistryCorrupted,
    RegistryError,
    RequestTimeout,
    ResponseParseError,
    ResponseTooLarge,
    SpawnError,
    TransportError,
    UnsolicitedResponse,
    VersionMismatch,
    WorkerError,
    WriteError,
)
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
from .spawn import WorkerProcess, spawn_and_connect, spawn_worker

if TYPE_CHECKING:
    import pandas as pd
    from IPython.core.interactiveshell import InteractiveShell

__all__ = [
    "PROTOCOL_VERSION",
    "Accepted",
    "Cancelled",
    "ClientClosed",
    "Completed",
    "ConnectError",
    "Connection",
    "ConnectionBroken",
    "ConnectionClosed",
    "ConnectionNotFound",
    "Continue",
    "Failed",
    "FeedData",
    "Finished",
    "Handshake",
    "HandshakeError",
    "HandshakeTimeout",
    "InsecureSocketError",
    "LateReply",
    "MalformedRequest",
    "Paused",
    "PoolClient",
    "PoolError",
    "ProtocolError",
    "Query",
    "RawRequest",
    "ReadError",
    "Registry",
    "RegistryCorrupted",
    "RegistryError",
    "Reply",
    "RequestTimeout",
    "Response",
    "ResponseParseError",
    "ResponseTooLarge",
    "Run",
    "Shutdown",
    "SpawnError",
    "Status",
    "StatusData",
    "TransportError",
    "UnsolicitedResponse",
    "VersionMismatch",
    "WorkerEntry",
    "WorkerError",
    "WorkerProcess",
    "WriteError",
    "__version__",
    "connect",
    "connection",
    "disconnect",
    "history",
    "load_ipython_extension",
    "spawn_and_connect",
    "spawn_worker",
    "unload_ipython_extension",
]


#: Connect (spawning the bundled worker when no socket is given); see ConnectionManager.connect.
connect = manager.connect


def connection(name: str | None = None) -> Connection:
    """The named open connection, or the current one."""
    return manager.get(name)


def disconnect(name: str | None = None) -> Connection:
    """Close a connection (its worker keeps running)."""
    return manager.disconnect(name)


def history(*, all_sessions: bool = False) -> pd.DataFrame:
    """Every request made through pool_notebook, as a DataFrame."""
    return manager.history.frame(all_sessions=all_sessions)


def _flush_history(*_: Any) -> None:
    manager.history.flush()


atexit.register(_flush_history)


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """``%load_ext pool_notebook``: register the magics (loading twice is harmless)."""
    from .magics import PoolMagics, complete_names

    ipython.register_magics(PoolMagics)
    callbacks = ipython.events.callbacks["post_run_cell"]
    if _flush_history not in callbacks:
        ipython.events.register("post_run_cell", _flush_history)
    for magic in ("pool_send", "pool_run", "pool_status", "pool_disconnect", "pool_history"):
        ipython.set_hook("complete_command", complete_names, str_key=f"%{magic}")
        ipython.set_hook("complete_command", complete_names, str_key=f"%%{magic}")


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """``%unload_ext pool_notebook``: close our connections (workers keep running)."""
    manager.close_all()
    if _flush_history in ipython.events.callbacks["post_run_cell"]:
        ipython.events.unregister("post_run_cell", _flush_history)
