"""One Lua strategy over a whole table of inputs, on a pool of workers.

``df = await pool_notebook.map(code, inputs, workers=8, respond=...)`` runs
``code`` once per input (a DataFrame row, a dict, or a Series value becomes the
Lua ``ctx``) on a :class:`WorkerPool` of bundled workers, each running one
session at a time, and returns one row per input in input order with the
result, state, latency, LLM counts, and the worker and node that ran it.

A failing input is a failed row; a worker that dies is replaced and its input
retried once; cancelling (the kernel's stop button) returns the rows done so far
with the rest ``cancelled``, and ``resume=`` runs only what is not completed.
Every request goes through :class:`~pool_notebook.connections.Connection`, so
the history records it. With ``cluster=`` (a ``distributed.Client``) the rows
run as Dask tasks (:mod:`pool_notebook.mapping_dask`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import math
import os
import signal
import socket
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from .connections import Connection, ConnectionState
from .errors import (
    ClientClosed,
    ConnectionBroken,
    InvalidArgument,
    PoolError,
    SpawnError,
    TransportError,
)
from .history import History, counts_from_metrics
from .session import PauseResponder, Responder, Session, SessionState, resolve_responder
from .spawn import spawn_and_connect

#: ``map`` (the alias below) is left out: a star import must not hide Python's map.
__all__ = ["RESULT_COLUMNS", "STATES", "Row", "WorkerPool", "compare_maps", "map_summary",
           "node_name", "pool_map", "run_rows", "strategy_code"]

#: The states a row can end in.
STATES = ("completed", "failed", "timeout", "cancelled")
#: The columns a map adds after the input's own (``score`` follows when scored).
RESULT_COLUMNS = ("result", "error", "state", "latency_ms", "llm_calls", "prompt_tokens",
                  "completion_tokens", "worker", "node")
_COUNT_COLUMNS = ("llm_calls", "prompt_tokens", "completion_tokens")
_UNANSWERED = ("the code paused for an LLM answer but no responder was given: pass "
               "respond= (a callable or 'openai:MODEL')")


def node_name() -> str:
    """``host:pid`` of this process (the one that drives the sessions)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def strategy_code(package: str) -> str:
    """The Lua code that runs a strategy package on ``ctx`` (``--strategy cot``)."""
    if not package.replace("_", "").replace(".", "").isalnum():
        raise InvalidArgument(f"strategy {package!r} is not a Lua package name (letters, "
                              "digits, '_' and '.' only), e.g. 'cot' or 'sc'")
    return f'return require("{package}").run(ctx)'


# ------------------------------------------------------------------- inputs

def _jsonable(value: Any, where: str) -> Any:
    """``value`` as JSON-able Python: numpy scalars unwrapped, NaN/NA -> None."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (pd.Timestamp, datetime.date, datetime.datetime)):
        return None if pd.isna(value) else value.isoformat()
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return _jsonable(tolist(), where)
    with contextlib.suppress(TypeError, ValueError):
        if pd.isna(value):
            return None
    raise InvalidArgument(f"input {where} is a {type(value).__name__}, which cannot become "
                          "a Lua value; convert it to str, a number, a list or a dict first")


def _inputs(inputs: Any) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The input table (for the output's first columns) and one ctx per row."""
    if isinstance(inputs, pd.Series):
        name = str(inputs.name) if inputs.name is not None else "input"
        frame = inputs.to_frame(name)
        ctxs = [{"input": _jsonable(v, f"row {i}")} for i, v in enumerate(inputs.tolist())]
        return frame, ctxs
    if isinstance(inputs, pd.DataFrame):
        frame = inputs
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)) and \
            all(isinstance(row, Mapping) for row in inputs):
        frame = pd.DataFrame(list(inputs))
    else:
        raise InvalidArgument(f"inputs must be a DataFrame, a Series or a list of dicts, not "
                              f"{type(inputs).__name__}")
    if not frame.columns.is_unique:
        raise InvalidArgument("the input columns must be unique (each becomes a ctx key)")
    taken = sorted({str(c) for c in frame.columns} & {*RESULT_COLUMNS, "score"})
    if taken:
        raise InvalidArgument(f"input column(s) {taken} clash with the columns map adds; "
                              "rename them, e.g. df.rename(columns={'result': 'expected'})")
    records = frame.to_dict("records") if isinstance(inputs, pd.DataFrame) else list(inputs)
    ctxs = [{str(k): _jsonable(v, f"row {i} column {k!r}") for k, v in row.items()}
            for i, row in enumerate(records)]
    return frame, ctxs


# --------------------------------------------------------------------- rows

@dataclasses.dataclass
class Row:
    """What happened to one input."""

    position: int
    result: Any = None
    error: str | None = None
    state: str = "cancelled"
    latency_ms: float = math.nan
    llm_calls: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    worker: str | None = None
    node: str | None = None


#: Errors that mean the worker is gone (the connection closed or broke under us).
_LOST = (TransportError, ConnectionBroken, ClientClosed)


class _WorkerLost(Exception):
    """The connection to the worker broke while it ran an input."""


class WorkerPool:
    """Connections to workers, each running one session at a time.

    :meth:`spawn` starts bundled workers concurrently (the pool owns them: it
    replaces those that die and stops them on :meth:`close`); ``WorkerPool(conns)``
    wraps connections you made (they are only replaced if they spawned their worker).
    """

    def __init__(self, connections: Sequence[Connection], *, owned: bool = False) -> None:
        if not connections:
            raise InvalidArgument("a worker pool needs at least one connection")
        self.connections = list(connections)
        self.owned = owned
        self.replaced = 0

    @classmethod
    async def spawn(cls, workers: int, *, history: History | None = None,
                    command: str | Sequence[str] | None = None,
                    name: str = "map") -> WorkerPool:
        """Start ``workers`` bundled workers concurrently and connect to each."""
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise InvalidArgument(f"workers must be a positive int, not {workers!r}")
        if history is None:
            from .connections import manager

            history = manager.history
        options: dict[str, Any] = {}  # connect's defaults, kept for respawns
        tasks = [asyncio.ensure_future(spawn_and_connect(command, **options))
                 for _ in range(workers)]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:  # stopped while starting: stop what did start
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None:
                    client, process = task.result()
                    client.close()
                    _terminate(process.pid)
            raise
        conns = [Connection(f"{name}-{i}", r[0], history, worker=r[1],
                            respawn=(command, options))
                 for i, r in enumerate(results) if isinstance(r, tuple)]
        errors = [r for r in results if isinstance(r, BaseException)]
        pool = cls(conns, owned=True) if conns else None
        if errors:
            if pool is not None:
                pool.close()
            raise errors[0]
        assert pool is not None
        return pool

    async def replace(self, index: int) -> Connection:
        """A fresh worker in place of connection ``index`` (its old worker is stopped).

        Raises ``SpawnError`` if the worker cannot be replaced (not spawned by us,
        or the new one does not start).
        """
        conn = self.connections[index]
        if conn.worker is None:
            raise SpawnError(f"the worker of {conn.name} ({conn.sock_path}) died or hung and "
                             "was not spawned by pool_notebook, so it cannot be replaced")
        _stop(conn)
        try:
            await conn.respawn()
        except InvalidArgument as exc:
            raise SpawnError(str(exc)) from exc
        self.replaced += 1
        return conn

    def close(self) -> None:
        """Close every connection; workers the pool spawned are stopped (SIGTERM)."""
        for conn in self.connections:
            if self.owned:
                _stop(conn)
            conn.close()

    def __len__(self) -> int:
        return len(self.connections)


def _stop(conn: Connection) -> None:
    """Stop the worker process this connection spawned (it may hold a session)."""
    if conn.worker is not None:
        _terminate(conn.worker.pid)


def _terminate(pid: int) -> None:
    """SIGTERM a worker we spawned: it interrupts its Lua and exits."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


async def _run_one(conn: Connection, code: str, ctx: dict[str, Any], *,
                   respond: Responder | PauseResponder | None, lib_paths: Sequence[str],
                   timeout: float | None, row: Row, node: str) -> bool:
    """Run one input on ``conn``, filling ``row``; True if the worker must be replaced.

    Raises ``_WorkerLost`` if the connection broke (the caller retries elsewhere).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    row.worker, row.node = conn.worker_sid, node
    session: Session | None = None

    async def drive() -> Session:
        nonlocal session
        session = await conn.run(code, ctx=ctx, lib_paths=lib_paths)
        if respond is not None and session.state is SessionState.PAUSED:
            await session.answer_all(respond)
        return session

    try:
        session = await asyncio.wait_for(drive(), timeout)
    except asyncio.TimeoutError:
        row.state, row.error = "timeout", f"no result within {timeout:g} s (timeout=)"
        return True
    except PoolError as exc:
        if isinstance(exc, _LOST) or conn.state is not ConnectionState.OPEN:
            raise _WorkerLost(f"{type(exc).__name__}: {exc}") from exc
        row.state, row.error = "failed", f"{type(exc).__name__}: {exc}"
        return session is None or session.state is SessionState.PAUSED
    finally:
        row.latency_ms = (loop.time() - start) * 1000.0
    counts = counts_from_metrics(session.metrics)
    if counts is not None:
        for name in _COUNT_COLUMNS:
            value = getattr(counts, name)
            setattr(row, name, value if value >= 0 else None)
    if session.state is SessionState.PAUSED:
        row.state, row.error = "failed", _UNANSWERED
        return True
    row.state = str(session.state)
    row.result = session.result
    row.error = session.error
    return False


async def run_rows(pool: WorkerPool, code: str, todo: Iterable[tuple[int, dict[str, Any]]],
                   *, respond: Responder | PauseResponder | None, lib_paths: Sequence[str],
                   timeout: float | None,
                   on_row: Callable[[Row], None] | None = None,
                   on_start: Callable[[int], None] | None = None) -> dict[int, Row]:
    """Run every ``(position, ctx)`` of ``todo`` on the pool; rows by position.

    One task per connection takes the next input when its session ends
    (``on_start(position)`` is called as it takes one, ``on_row(row)`` as it ends).
    Cancelling it cancels the sessions in flight (the history marks their
    requests cancelled); the caller keeps the rows ``on_row`` already reported.
    """
    queue = deque(todo)
    node = node_name()
    rows: dict[int, Row] = {}

    async def attempt(index: int, ctx: dict[str, Any], row: Row) -> bool:
        """Run one input, retried once on a fresh worker if its worker died.

        False if connection ``index`` could not be replaced (its driver stops).
        """
        for retry in (False, True):
            lost = False
            try:
                replace = await _run_one(pool.connections[index], code, ctx, respond=respond,
                                         lib_paths=lib_paths, timeout=timeout, row=row,
                                         node=node)
            except _WorkerLost as exc:
                lost = replace = True
                row.state = "failed"
                row.error = (f"the worker died while running this input ({exc})" +
                             (", and again on the retry" if retry else ""))
            if replace:
                try:
                    await pool.replace(index)
                except PoolError as exc:
                    row.error = f"{row.error}; the worker could not be replaced: {exc}"
                    return False
            if not lost:
                break
        return True

    async def drive(index: int) -> None:
        alive = True
        while queue and alive:
            position, ctx = queue.popleft()
            row = rows[position] = Row(position)
            if on_start is not None:
                on_start(position)
            alive = await attempt(index, ctx, row)
            if on_row is not None:
                on_row(row)

    drivers = [asyncio.ensure_future(drive(i)) for i in range(len(pool))]
    try:
        await asyncio.gather(*drivers)
    finally:
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
    for position, _ctx in queue:  # every driver stopped: no worker could be replaced
        rows[position] = Row(position, state="failed",
                             error="no worker left in the pool to run this input")
    return rows


# ----------------------------------------------------------------- progress

class _Progress:
    """A tqdm bar (ipywidgets in a notebook, text elsewhere) with done/failed/running."""

    def __init__(self, total: int, enabled: bool, desc: str, *, already: int = 0) -> None:
        self.done, self.failed, self.running = already, 0, 0
        self.bar: Any = None  # tqdm.auto: ipywidgets in a notebook, a text line elsewhere
        if enabled:
            from tqdm.auto import tqdm as auto_tqdm  # type: ignore[import-untyped]

            self.bar = auto_tqdm(total=total, initial=already, desc=desc, unit="row",
                                 dynamic_ncols=True)
            self._show(0)

    def started(self, _position: int | None = None) -> None:
        self.running += 1
        self._show(0)

    def finished(self, row: Row) -> None:
        self.running = max(0, self.running - 1)
        if row.state == "completed":
            self.done += 1
        else:
            self.failed += 1
        self._show(1)

    def _show(self, advance: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix(done=self.done, failed=self.failed, running=self.running,
                                 refresh=False)
            self.bar.update(advance)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------- map

async def pool_map(
    code: str | None,
    inputs: Any,
    *,
    workers: int | WorkerPool | Sequence[Connection] = 8,
    respond: Responder | PauseResponder | str | None = None,
    lib_paths: Sequence[str] = (),
    timeout: float | None = None,
    cluster: Any = None,
    score: Callable[[dict[str, Any], Any], float] | None = None,
    resume: pd.DataFrame | None = None,
    strategy: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run ``code`` once per input on a pool of workers; one row per input, in order.

    ``inputs``: a DataFrame (each row is ``ctx``, columns are keys), a list of
    dicts, or a Series (each value is ``ctx.input``). ``workers``: how many bundled
    workers to spawn (per Dask worker process with ``cluster=``), a
    :class:`WorkerPool`, or connections. ``respond`` answers every LLM query
    (sync/async callable or ``"openai:MODEL"``). ``timeout``: seconds one input
    may take (its row is ``timeout`` and its worker replaced). ``strategy="cot"``
    runs ``require("cot").run(ctx)`` instead of ``code``. ``score(row, result)``
    (row = the input's ctx) adds a ``score`` column for completed rows.
    ``resume=previous`` runs only the rows of ``previous`` that did not complete.

    If the task is cancelled (the kernel's stop button), the pool is shut down
    and the frame is returned with the rows not done marked ``cancelled``.
    """
    if strategy is not None:
        if code and code.strip():
            raise InvalidArgument("give either code or strategy=, not both")
        code = strategy_code(strategy)
    if not code or not code.strip():
        raise InvalidArgument("code is empty: pass Lua code or strategy='PKG'")
    if timeout is not None and not timeout > 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout}")
    frame, ctxs = _inputs(inputs)
    responder = resolve_responder(respond)
    done = _resumed(resume, frame)
    todo = [(i, ctx) for i, ctx in enumerate(ctxs) if i not in done]
    bar = _Progress(len(ctxs), progress, "pool_map", already=len(done))
    rows: dict[int, Row] = dict(done)

    def finished(row: Row) -> None:
        rows[row.position] = row
        bar.finished(row)

    try:
        if cluster is not None:
            from .mapping_dask import dask_rows

            rows.update(await dask_rows(cluster, code, todo, respond=responder,
                                        lib_paths=lib_paths, timeout=timeout,
                                        workers=workers, on_row=finished,
                                        on_start=bar.started))
        else:
            rows.update(await _local_rows(code, todo, workers, responder, lib_paths,
                                          timeout, finished, bar.started))
    except asyncio.CancelledError:
        # the partial frame is the answer to a stop: rows not finished are "cancelled"
        task = asyncio.current_task()
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()
    finally:
        bar.close()
    return _frame(frame, [rows.get(i) or Row(i) for i in range(len(ctxs))], ctxs, score)


async def _local_rows(code: str, todo: list[tuple[int, dict[str, Any]]],
                      workers: int | WorkerPool | Sequence[Connection],
                      respond: Responder | PauseResponder | None, lib_paths: Sequence[str],
                      timeout: float | None, on_row: Callable[[Row], None],
                      on_start: Callable[[int], None]) -> dict[int, Row]:
    if not todo:
        return {}
    if isinstance(workers, WorkerPool):
        pool, close = workers, False
    elif isinstance(workers, int):
        pool, close = await WorkerPool.spawn(min(workers, len(todo))), True
    else:
        pool, close = WorkerPool(list(workers)), False
    try:
        return await run_rows(pool, code, todo, respond=respond, lib_paths=lib_paths,
                              timeout=timeout, on_row=on_row, on_start=on_start)
    finally:
        if close:
            pool.close()


def _resumed(resume: pd.DataFrame | None, frame: pd.DataFrame) -> dict[int, Row]:
    """The completed rows of a previous map of the same inputs, by position."""
    if resume is None:
        return {}
    if not isinstance(resume, pd.DataFrame) or "state" not in resume.columns:
        raise InvalidArgument("resume= takes the DataFrame a previous map returned")
    if len(resume) != len(frame) or not resume.index.equals(frame.index):
        raise InvalidArgument(f"resume= has {len(resume)} rows with another index than these "
                              f"{len(frame)} inputs: pass the same inputs as before")
    rows: dict[int, Row] = {}
    for i, record in enumerate(resume[list(RESULT_COLUMNS)].to_dict("records")):
        if record["state"] == "completed":
            values = {str(k): None if _missing(v) else v for k, v in record.items()}
            rows[i] = Row(i, **values)  # type: ignore[arg-type]
    return rows


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        value is pd.NA


def _frame(inputs: pd.DataFrame, rows: list[Row], ctxs: list[dict[str, Any]],
           score: Callable[[dict[str, Any], Any], float] | None) -> pd.DataFrame:
    """The output: the input's columns, then the result columns (and score)."""
    scores = None if score is None else [_score(score, ctxs[r.position], r) for r in rows]
    out = inputs.copy()
    for name in RESULT_COLUMNS:
        out[name] = pd.Series([getattr(r, name) for r in rows], index=inputs.index,
                              dtype=object)
    for name in _COUNT_COLUMNS:
        out[name] = out[name].astype("Int64")
    out["latency_ms"] = out["latency_ms"].astype(float)
    out["state"] = pd.Categorical(out["state"], categories=list(STATES))
    if scores is not None:
        out["score"] = scores
    result: pd.DataFrame = out
    return result


def _score(score: Callable[[dict[str, Any], Any], float], ctx: dict[str, Any],
           row: Row) -> float:
    """The row's score; NaN if it did not complete, or (said in ``error``) if score raised."""
    if row.state != "completed":
        return math.nan
    try:
        return float(score(ctx, row.result))
    except Exception as exc:  # the user's function: its failure must not lose the map
        row.error = f"score(row, result) raised {type(exc).__name__}: {exc}"
        return math.nan


#: ``pool_notebook.map``: the name users call (shadows the builtin only in this module).
map = pool_map


# ------------------------------------------------------------------ summary

def map_summary(df: pd.DataFrame) -> pd.Series:
    """One map's numbers: rows by state, latency percentiles, tokens, score mean ± 95% CI."""
    states = df["state"].astype(str).value_counts()
    latency = df.loc[df["state"] == "completed", "latency_ms"].astype(float)
    out: dict[str, Any] = {"rows": len(df)}
    out.update({state: int(states.get(state, 0)) for state in STATES})
    for q in (50, 90, 99):
        out[f"p{q}_ms"] = round(float(latency.quantile(q / 100)), 3) if len(latency) \
            else math.nan
    for name in _COUNT_COLUMNS:
        out[name] = int(df[name].sum()) if name in df else 0
    if "score" in df:
        scores = df["score"].astype(float).dropna()
        mean, low, high = _mean_ci(scores.tolist())
        out.update(score_mean=mean, score_ci_low=low, score_ci_high=high, scored=len(scores))
    summary: pd.Series = pd.Series(out, name="map", dtype=object)  # counts stay ints
    return summary


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% interval (Student's t; the mean itself for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    from scipy import stats

    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = float(stats.t.ppf(0.975, n - 1)) * sd / n ** 0.5
    return mean, mean - half, mean + half


def compare_maps(maps: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Several maps side by side (one column each), e.g. two strategies on the same inputs."""
    if not maps:
        raise InvalidArgument("compare_maps needs at least one map: {'name': frame, ...}")
    table: pd.DataFrame = pd.DataFrame({name: map_summary(df) for name, df in maps.items()})
    return table
