"""``pool_notebook.map(..., cluster=client)``: the rows as Dask tasks.

The inputs are cut into partitions; each partition is one Dask task
(``client.submit``), so Dask places the work. Every Dask worker process keeps
its own :class:`~pool_notebook.mapping.WorkerPool` of bundled workers through a
:class:`PoolPlugin` (a ``distributed.WorkerPlugin``): started by the first task,
reused by the next ones, shut down with the Dask worker. The code, the inputs
and the responder travel with Dask's serialisation (cloudpickle). The rows come
back with the ``node`` (host:pid) of the Dask worker that drove them.

Imported only when ``cluster=`` is given: ``distributed`` is the ``[dask]`` extra.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .errors import InvalidArgument
from .mapping import Row, WorkerPool, run_rows
from .session import PauseResponder, Responder

try:
    import distributed
except ImportError as exc:  # pragma: no cover - the [dask] extra is missing
    raise ImportError("map(cluster=...) needs Dask distributed: pip install "
                      "'pool-notebook[dask]'") from exc

__all__ = ["PLUGIN_NAME", "PoolPlugin", "dask_rows"]

#: The name the plugin is registered under on every Dask worker.
PLUGIN_NAME = "pool_notebook.map"


class PoolPlugin(distributed.WorkerPlugin):
    """Owns one pool of bundled workers per Dask worker process, on its own loop thread.

    Tasks run in Dask's thread pool; the pool's connections belong to one
    asyncio loop, so tasks hand their rows to that loop and wait.
    """

    name = PLUGIN_NAME

    def __init__(self, workers: int = 8) -> None:
        self.workers = workers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: WorkerPool | None = None
        self._lock: threading.Lock | None = None  # made in setup: the plugin is pickled

    def setup(self, worker: Any) -> None:
        """Start the loop thread (the pool itself starts with the first task)."""
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="pool_notebook.map", daemon=True)
        self._thread.start()

    def teardown(self, worker: Any) -> None:
        """Stop the bundled workers and the loop thread with the Dask worker."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._pool is not None:
            loop.call_soon_threadsafe(self._pool.close)
            self._pool = None
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5.0)
        loop.close()

    async def _ensure_pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = await WorkerPool.spawn(self.workers, name="dask-map")
        return self._pool

    def run(self, code: str, todo: list[tuple[int, dict[str, Any]]],
            respond: Responder | PauseResponder | None, lib_paths: Sequence[str],
            timeout: float | None) -> list[Row]:
        """Run one partition on this process's pool (blocks the calling task thread)."""
        if self._loop is None or self._lock is None:
            raise RuntimeError("PoolPlugin.run before setup (or after teardown)")

        async def partition() -> list[Row]:
            pool = await self._ensure_pool()
            rows = await run_rows(pool, code, todo, respond=respond, lib_paths=lib_paths,
                                  timeout=timeout)
            return [rows[position] for position, _ctx in todo]

        with self._lock:  # one partition at a time uses the pool's workers
            future = asyncio.run_coroutine_threadsafe(partition(), self._loop)
            try:
                return future.result()
            except BaseException:
                future.cancel()
                raise


def _run_partition(code: str, todo: list[tuple[int, dict[str, Any]]],
                   respond: Responder | PauseResponder | None, lib_paths: Sequence[str],
                   timeout: float | None) -> list[Row]:
    """The Dask task: this worker process's plugin runs the partition."""
    plugin = distributed.get_worker().plugins[PLUGIN_NAME]
    assert isinstance(plugin, PoolPlugin)
    return plugin.run(code, todo, respond, lib_paths, timeout)


def _has_plugin(workers: int, dask_worker: Any = None) -> bool:
    plugin = dask_worker.plugins.get(PLUGIN_NAME) if dask_worker is not None else None
    return isinstance(plugin, PoolPlugin) and plugin.workers == workers


async def dask_rows(client: Any, code: str, todo: list[tuple[int, dict[str, Any]]], *,
                    respond: Responder | PauseResponder | None, lib_paths: Sequence[str],
                    timeout: float | None, workers: Any,
                    on_row: Callable[[Row], None]) -> dict[int, Row]:
    """Run ``todo`` as Dask tasks on ``client``'s cluster; rows by position.

    ``workers`` is the number of bundled workers per Dask worker process.
    Cancelling cancels the tasks not finished (their rows stay ``cancelled``).
    """
    if not isinstance(client, distributed.Client):
        raise InvalidArgument(f"cluster= takes a distributed.Client, not {type(client).__name__}")
    if client.asynchronous:
        raise InvalidArgument("cluster= takes a synchronous distributed.Client (the default); "
                              "this one was made with asynchronous=True")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise InvalidArgument("with cluster=, workers is the number of bundled workers per "
                              f"Dask worker process (a positive int), not {workers!r}")
    if not todo:
        return {}
    loop = asyncio.get_running_loop()

    def submit() -> dict[Any, list[tuple[int, dict[str, Any]]]]:
        ready = client.run(_has_plugin, workers)
        if not ready or not all(ready.values()):
            client.register_plugin(PoolPlugin(workers))
        n_dask = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
        size = math.ceil(len(todo) / (2 * n_dask))
        parts = [todo[i:i + size] for i in range(0, len(todo), size)]
        return {client.submit(_run_partition, code, part, respond, tuple(lib_paths), timeout,
                              pure=False): part for part in parts}

    futures = await asyncio.to_thread(submit)
    rows: dict[int, Row] = {}

    def collect() -> None:
        for future in distributed.as_completed(list(futures)):  # type: ignore[no-untyped-call]
            if future.status == "finished":
                done = future.result()
            elif future.status == "error":  # the task itself failed: say so on its rows
                exc = future.exception()
                done = [Row(position, state="failed",
                            error=f"the Dask task failed: {type(exc).__name__}: {exc}")
                        for position, _ctx in futures[future]]
            else:
                continue  # cancelled: its rows stay cancelled
            for row in done:
                loop.call_soon_threadsafe(_deliver, rows, row, on_row)

    try:
        await asyncio.to_thread(collect)
    except BaseException:
        client.cancel(list(futures))  # type: ignore[no-untyped-call]
        raise
    await asyncio.sleep(0)  # let the last call_soon_threadsafe deliveries run
    return rows


def _deliver(rows: dict[int, Row], row: Row, on_row: Callable[[Row], None]) -> None:
    rows[row.position] = row
    on_row(row)
