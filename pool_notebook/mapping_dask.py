"""``pool_notebook.map(..., cluster=client)``: the rows as Dask tasks.

The inputs are cut into partitions; each partition is one Dask task
(``client.submit``), so Dask places the work. Every Dask worker process keeps
its own :class:`~pool_notebook.mapping.WorkerPool` of bundled workers through a
:class:`PoolPlugin` (a ``distributed.WorkerPlugin``): started by the first task,
reused by the next ones, shut down with the Dask worker. The code, the inputs
and the responder travel with Dask's serialisation (cloudpickle). The rows come
back with the ``node`` (host:pid) of the Dask worker that drove them.

Progress travels with Dask's structured events: each task logs its rows as they
start and end (``Worker.log_event`` on a topic made for this map call, gathered
over 50 ms) and the driver subscribes to that topic (``Client.subscribe_topic``),
so the bar moves per row and rows done inside a partition that is later
cancelled are kept. The task's return value only fills in the rows whose event was missed.
Stopping the map sets a ``distributed.Event`` that the running tasks look at
every second, so their sessions stop too instead of running on unseen.

Imported only when ``cluster=`` is given: ``distributed`` is the ``[dask]`` extra.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import math
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import InvalidArgument
from .mapping import Row, WorkerPool, run_rows
from .session import PauseResponder, Responder

try:
    import distributed
    from distributed.comm.registry import get_backend
except ImportError as exc:  # pragma: no cover - the [dask] extra is missing
    raise ImportError("map(cluster=...) needs Dask distributed: pip install "
                      "'pool-notebook[dask]'") from exc

__all__ = ["PLUGIN_NAME", "PoolPlugin", "RowEvents", "close_clients", "cluster_client",
           "connect", "dask_rows"]

log = logging.getLogger("pool_notebook.map")

#: The name the plugin is registered under on every Dask worker.
PLUGIN_NAME = "pool_notebook.map"
#: How long (seconds) one wait of a running task's stop watcher lasts (a stop itself
#: is seen at once; the watcher notices its task ended within this time).
_STOP_POLL = 1.0
#: After a stop: seconds until the map's events and stop flag are dropped from the
#: scheduler (the stopped tasks' last rows and their final flush arrive meanwhile).
_STOP_GRACE = 2.0
#: How long (seconds) a task gathers row starts and ends into one Dask event.
_FLUSH = 0.05

Todo = list[tuple[int, dict[str, Any]]]


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

    def _stop(self, work: asyncio.Future[Any], pool: WorkerPool) -> None:
        """The map was stopped: cancel the partition's sessions and shut the pool down."""
        if work.done():  # it ended meanwhile: the pool may already serve the next task
            return
        work.cancel()
        pool.close()
        if self._pool is pool:
            self._pool = None

    def run(self, code: str, todo: Todo, respond: Responder | PauseResponder | None,
            lib_paths: Sequence[str], timeout: float | None, *,
            report: RowEvents | None = None,
            stop: distributed.Event | None = None) -> list[Row]:
        """Run one partition on this process's pool (blocks the calling task thread).

        ``report`` hears each input start and end (on the pool's loop thread) and
        is flushed before this returns. If ``stop`` is set, the partition's
        sessions are cancelled and the pool is shut down (the next task starts a
        fresh one), as a local map does when it is stopped.
        """
        if self._loop is None or self._lock is None:
            raise RuntimeError("PoolPlugin.run before setup (or after teardown)")

        async def partition() -> list[Row]:
            pool = await self._ensure_pool()
            work = asyncio.ensure_future(run_rows(
                pool, code, todo, respond=respond, lib_paths=lib_paths, timeout=timeout,
                on_row=None if report is None else report.finished,
                on_start=None if report is None else report.started))
            if stop is not None:
                loop = asyncio.get_running_loop()
                ended = threading.Event()
                work.add_done_callback(lambda _work: ended.set())
                threading.Thread(
                    target=_watch, name="pool_notebook.map.stop", daemon=True,
                    args=(stop, ended, lambda: loop.call_soon_threadsafe(self._stop, work, pool)),
                ).start()
            try:
                rows = await work
            finally:
                if report is not None:
                    report.flush()  # before the task returns: its events come first
            return [rows[position] for position, _ctx in todo]

        with self._lock:  # one partition at a time uses the pool's workers
            if stop is not None and stop.is_set():  # type: ignore[no-untyped-call]
                return []  # stopped while this task waited its turn: run nothing
            future = asyncio.run_coroutine_threadsafe(partition(), self._loop)
            try:
                return future.result()
            except BaseException:
                future.cancel()
                raise


def _watch(stop: distributed.Event, ended: threading.Event,
           on_stop: Callable[[], None]) -> None:
    """Until ``ended``, wait on the scheduler for the map's stop (its own thread): a
    stop is seen at once; ``ended`` within ``_STOP_POLL`` seconds."""
    while not ended.is_set():
        try:
            stopped = stop.wait(timeout=_STOP_POLL)  # type: ignore[no-untyped-call]
        except Exception:  # the scheduler cannot be asked: no one is left to stop this map
            return
        if stopped:
            on_stop()
            return


class RowEvents:
    """One task's row starts and ends, sent to the driver as Dask events on ``topic``.

    Called on the pool's loop thread. What happened within ``_FLUSH`` seconds
    goes as one event ``{"started": [positions], "rows": [row fields]}``, so a
    map of quick rows does not cost the scheduler two messages per row.
    """

    def __init__(self, worker: distributed.Worker, topic: str) -> None:
        self.worker, self.topic = worker, topic
        self._started: list[int] = []
        self._rows: list[dict[str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None

    def started(self, position: int) -> None:
        self._started.append(position)
        self._soon()

    def finished(self, row: Row) -> None:
        self._rows.append(dataclasses.asdict(row))
        self._soon()

    def _soon(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_FLUSH, self.flush)

    def flush(self) -> None:
        """Send what is pending now (``Worker.log_event`` is thread-safe and ordered)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._started or self._rows:
            self.worker.log_event(self.topic, {"started": self._started, "rows": self._rows})
            self._started, self._rows = [], []


def _run_partition(topic: str, code: str, todo: Todo,
                   respond: Responder | PauseResponder | None, lib_paths: Sequence[str],
                   timeout: float | None) -> list[Row]:
    """The Dask task: this worker process's plugin runs the partition, reporting each row."""
    worker = distributed.get_worker()
    plugin = worker.plugins[PLUGIN_NAME]
    assert isinstance(plugin, PoolPlugin)
    stop = distributed.Event(f"{topic}.stop",  # type: ignore[no-untyped-call]
                             client=distributed.get_client())
    return plugin.run(code, todo, respond, lib_paths, timeout, report=RowEvents(worker, topic),
                      stop=stop)


def _has_plugin(workers: int, dask_worker: Any = None) -> bool:
    plugin = dask_worker.plugins.get(PLUGIN_NAME) if dask_worker is not None else None
    return isinstance(plugin, PoolPlugin) and plugin.workers == workers


def _forget_topic(topic: str, dask_scheduler: Any = None) -> None:
    """Drop a finished map's events from the scheduler's log (they carry its results),
    and the topic itself once no one subscribes to it.

    Dask has no public call for this; the scheduler's event broker does it.
    """
    broker = dask_scheduler._broker
    broker.truncate(topic)
    known = broker._topics.get(topic)
    if known is not None and not known.subscribers:
        del broker._topics[topic]


class _Rows:
    """The rows of one map on the driver's loop: each counted once, however it arrives.

    A row arrives by its event or, if that was missed, with its task's result;
    whichever comes first counts, the other is ignored. ``on_start`` is called
    once for every row before its ``on_row`` (so a bar's running count returns
    to 0), and nothing is passed on after :meth:`close`.
    """

    def __init__(self, positions: set[int], on_start: Callable[[int], None] | None,
                 on_row: Callable[[Row], None]) -> None:
        self.positions = positions
        self.rows: dict[int, Row] = {}
        self.started: set[int] = set()
        self.open = True
        self._on_start = on_start
        self._on_row = on_row

    def event(self, msg: Any) -> None:
        """One event a task logged (:class:`RowEvents`): rows started, rows ended."""
        for position in msg["started"]:
            self.start(position)
        for fields in msg["rows"]:
            self.finish(Row(**{**fields, "result": _lists(fields["result"])}))

    def start(self, position: int) -> None:
        if self.open and position in self.positions and position not in self.started:
            self.started.add(position)
            if self._on_start is not None:
                self._on_start(position)

    def finish(self, row: Row) -> None:
        if not self.open or row.position not in self.positions or row.position in self.rows:
            return
        self.start(row.position)
        self.rows[row.position] = row
        self._on_row(row)

    def fill(self, rows: list[Row]) -> None:
        """A task's result: its rows not reported by an event."""
        for row in rows:
            self.finish(row)

    def close(self) -> None:
        self.open = False


def _lists(value: Any) -> Any:
    """A result as the task returns it: events come through msgpack, which makes lists tuples."""
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


class _Relay:
    """The topic's handler: runs on the Client's loop thread, hands events to the driver's loop.

    The Client keeps a handler after ``unsubscribe_topic``, so :meth:`close`
    drops the references (and any event still in flight).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, handle: Callable[[Any], None]) -> None:
        self._target: tuple[asyncio.AbstractEventLoop, Callable[[Any], None]] | None = \
            (loop, handle)

    def __call__(self, event: tuple[float, Any]) -> None:
        target = self._target
        if target is not None:
            with contextlib.suppress(RuntimeError):  # the driver's loop is closed
                target[0].call_soon_threadsafe(target[1], event[1])

    def close(self) -> None:
        self._target = None


async def dask_rows(client: Any, code: str, todo: Todo, *,
                    respond: Responder | PauseResponder | None, lib_paths: Sequence[str],
                    timeout: float | None, workers: Any,
                    on_row: Callable[[Row], None],
                    on_start: Callable[[int], None] | None = None) -> dict[int, Row]:
    """Run ``todo`` as Dask tasks on ``client``'s cluster; rows by position.

    ``workers`` is the number of bundled workers per Dask worker process.
    ``on_start(position)`` and ``on_row(row)`` are called on this loop as each row starts
    and ends on its Dask worker. Cancelling stops the running tasks' sessions and
    cancels the others; the rows already reported stay with ``on_row``'s caller.
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
    topic = f"{PLUGIN_NAME}.{uuid.uuid4().hex}"  # one per call: late events hit no other map
    rows = _Rows({position for position, _ctx in todo}, on_start, on_row)
    relay = _Relay(loop, rows.event)
    stop = distributed.Event(f"{topic}.stop", client=client)  # type: ignore[no-untyped-call]

    futures: dict[Any, Todo] = {}  # task -> its inputs
    stopping = threading.Event()  # set by a stop: the submitting thread submits no more

    def submit() -> None:
        # subscribed before the tasks are submitted (one ordered stream): no event is missed
        client.subscribe_topic(topic, relay)  # type: ignore[no-untyped-call]
        ready = client.run(_has_plugin, workers)
        if not ready or not all(ready.values()):
            client.register_plugin(PoolPlugin(workers))
        n_dask = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
        size = math.ceil(len(todo) / (2 * n_dask))
        for i in range(0, len(todo), size):
            if stopping.is_set():
                break
            part = todo[i:i + size]
            futures[client.submit(_run_partition, topic, code, part, respond,
                                  tuple(lib_paths), timeout, pure=False)] = part
        if stopping.is_set():  # stopped while submitting: cancel what went out meanwhile
            client.cancel(list(futures))  # type: ignore[no-untyped-call]

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
                continue  # cancelled: its rows not reported stay cancelled
            loop.call_soon_threadsafe(rows.fill, done)

    stopped = False
    try:
        await asyncio.to_thread(submit)
        await asyncio.to_thread(collect)
        await asyncio.sleep(0)  # let the last call_soon_threadsafe deliveries run
    except (asyncio.CancelledError, KeyboardInterrupt):
        # stopped (even while submitting): tasks running now or later end their sessions
        # and shut their pools down; those not started are cancelled. A scheduler that
        # is gone must not turn the stop into another error (the rows are the answer).
        stopped = True
        stopping.set()
        with contextlib.suppress(Exception):
            stop.set()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            client.cancel(list(futures))  # type: ignore[no-untyped-call]
        raise
    finally:
        rows.close()
        relay.close()
        with contextlib.suppress(Exception):  # a closed client has nothing left to drop
            client.unsubscribe_topic(topic)  # type: ignore[no-untyped-call]
        if stopped:  # the stopped tasks' last events are still on their way
            later = threading.Timer(_STOP_GRACE, _forget, (client, topic, stop))
            later.daemon = True
            later.start()
        else:
            await asyncio.to_thread(_forget, client, topic, stop)
    return rows.rows


def _forget(client: distributed.Client, topic: str, stop: distributed.Event) -> None:
    """Drop a map's events, topic and stop flag from the scheduler (said once if it
    cannot: e.g. a scheduler that refuses ``run_on_scheduler``)."""
    global _forget_failed
    try:
        client.run_on_scheduler(_forget_topic, topic)  # type: ignore[no-untyped-call]
    except Exception as exc:
        if not _forget_failed and client.status == "running":
            _forget_failed = True
            log.warning("the Dask scheduler kept this map's events (%s: %s): up to "
                        "distributed.admin.low-level-log-length of them per map stay in its "
                        "event log", type(exc).__name__, exc)
    with contextlib.suppress(Exception):
        stop.clear()  # type: ignore[no-untyped-call]


_forget_failed = False


# ------------------------------------------------------ clients by address

_clients: dict[str, distributed.Client] = {}


def cluster_client(spec: str, namespace: Mapping[str, Any]) -> distributed.Client:
    """``%%pool_map --cluster SPEC``: the Client named ``spec`` in ``namespace``, or one for
    the scheduler address ``spec`` (:func:`connect`)."""
    value = namespace.get(spec)
    if isinstance(value, distributed.Client):
        return value
    if value is not None or "://" not in spec:
        raise InvalidArgument("pass the name of a distributed.Client or a scheduler address "
                              "such as tcp://127.0.0.1:8786")
    return connect(spec)


def connect(address: str) -> distributed.Client:
    """A Client for the scheduler at ``address``, made once per address (``%%pool_map --cluster``).

    It is not made the default Dask client. :func:`close_clients` closes them
    (at ``%unload_ext pool_notebook`` and when the process exits).
    """
    client = _clients.pop(address, None)
    if client is not None:
        if client.status == "running":
            _clients[address] = client
            return client
        with contextlib.suppress(Exception):  # reconnecting or broken: replaced, not leaked
            client.close()  # type: ignore[no-untyped-call]
    if "://" not in address:
        raise InvalidArgument(f"{address!r} is not a scheduler address: pass one such as "
                              "tcp://127.0.0.1:8786")
    try:  # checked first: a Client made for an unknown scheme hangs 20 s when collected
        get_backend(address.split("://", 1)[0])
    except ValueError as exc:
        raise InvalidArgument(f"{exc}; pass a scheduler address such as "
                              "tcp://127.0.0.1:8786") from None
    try:
        client = distributed.Client(  # type: ignore[no-untyped-call]
            address, set_as_default=False, timeout=10)
    except OSError as exc:
        raise InvalidArgument(f"no Dask scheduler there ({exc}); pass a running "
                              "scheduler's address or the name of a distributed.Client") from None
    _clients[address] = client
    return client


@atexit.register
def close_clients() -> None:
    """Close the Clients :func:`connect` made."""
    while _clients:
        _address, client = _clients.popitem()
        with contextlib.suppress(Exception):  # already closed, or its scheduler is gone
            client.close()  # type: ignore[no-untyped-call]
