"""pool_notebook.map(cluster=...): the same map as Dask tasks on a LocalCluster."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pool_notebook import mapping
from pool_notebook import protocol as proto
from pool_notebook.errors import InvalidArgument
from pool_notebook.mapping import RESULT_COLUMNS, Row, pool_map
from pool_notebook.registry import pid_alive
from tests.fakes import TWO_ROUNDS, slow_echo, wait_dead

distributed = pytest.importorskip("distributed")
from pool_notebook.mapping_dask import (  # noqa: E402 - needs distributed
    PLUGIN_NAME,
    close_clients,
    cluster_client,
    dask_rows,
)


@dataclasses.dataclass
class Gate:
    """A model (shipped to the Dask workers) that holds the query "q0" until ``opened`` exists.

    If its wait is cancelled it creates ``stopped``; it gives up after two minutes
    (answering "never opened") so a broken build fails instead of hanging.
    """

    opened: str
    stopped: str

    async def __call__(self, query: proto.Query) -> str:
        if query.prompt != "q0":
            return query.prompt.upper()
        deadline = time.monotonic() + 120
        try:
            while not os.path.exists(self.opened):
                if time.monotonic() > deadline:
                    return "never opened"
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            Path(self.stopped).touch()
            raise
        return "opened"


GATED = 'return alc.llm("q" .. ctx.input)'


class RecordingProgress(mapping._Progress):
    """The map's progress bar, kept for the test to read its counts (and act on rows)."""

    made: list[RecordingProgress] = []
    on_finished: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.positions: list[int] = []
        RecordingProgress.made.append(self)

    def finished(self, row: Row) -> None:
        super().finished(row)
        self.positions.append(row.position)
        if RecordingProgress.on_finished is not None:
            RecordingProgress.on_finished(self)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[RecordingProgress]]:
    """pool_map's progress bars, recorded."""
    RecordingProgress.made, RecordingProgress.on_finished = [], None
    monkeypatch.setattr(mapping, "_Progress", RecordingProgress)
    yield RecordingProgress.made
    RecordingProgress.on_finished = None


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    """Two Dask worker processes (one thread each), started with a private pool home."""
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"pn-dask-{os.getpid()}"
    home.mkdir(mode=0o700, exist_ok=True)
    old = {k: os.environ.get(k) for k in ("POOL_NOTEBOOK_HOME", "POOL_NOTEBOOK_HISTORY")}
    os.environ["POOL_NOTEBOOK_HOME"] = str(home)  # inherited by the worker processes
    os.environ["POOL_NOTEBOOK_HISTORY"] = str(home / "history.sqlite")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=40)
    try:
        with distributed.Client(cluster) as dask_client:
            yield dask_client
    finally:
        cluster.close()
        shutil.rmtree(home, ignore_errors=True)
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _bundled_worker_pids(client: distributed.Client) -> dict[str, list[int]]:
    """The bundled workers each Dask worker's plugin spawned, by Dask worker address."""
    def pids(dask_worker: distributed.Worker) -> list[int]:
        plugin = dask_worker.plugins.get("pool_notebook.map")
        pool = getattr(plugin, "_pool", None)
        return [c.pid for c in pool.connections] if pool is not None else []

    result: dict[str, list[int]] = client.run(pids)
    return result


def test_the_same_map_on_two_dask_worker_processes(client: distributed.Client) -> None:
    inputs = pd.Series(range(64), index=[f"q{i}" for i in range(64)], name="n")
    df = asyncio.run(pool_map(TWO_ROUNDS, inputs, workers=4, respond=slow_echo,
                              cluster=client, progress=False))
    assert list(df.index) == list(inputs.index)
    assert list(df.columns) == ["n", *RESULT_COLUMNS]
    assert df["result"].tolist() == [f"<second <first {i}>>" for i in range(64)]
    assert set(df["state"]) == {"completed"} and (df["llm_calls"] == 2).all()
    dask_pids = set(client.run(os.getpid).values())
    nodes = set(df["node"])
    assert len(nodes) == 2  # both Dask worker processes drove sessions
    assert {int(n.rsplit(":", 1)[1]) for n in nodes} == dask_pids
    pools = _bundled_worker_pids(client)
    assert all(len(p) == 4 for p in pools.values()) and len(pools) == 2
    assert df["worker"].nunique() <= 8

    # the pools are reused by the next map (started once per Dask worker process)
    again = asyncio.run(pool_map("return ctx.input * 2", inputs, workers=4, cluster=client,
                                 progress=False))
    assert again["result"].tolist() == [2 * i for i in range(64)]
    assert _bundled_worker_pids(client) == pools
    assert set(again["worker"]).issubset(set(df["worker"]))


def test_failures_and_bad_arguments_on_the_cluster(client: distributed.Client) -> None:
    df = asyncio.run(pool_map('if ctx.input == 3 then error("bad " .. ctx.input) end '
                              "return ctx.input", pd.Series(range(6)), workers=4,
                              cluster=client, progress=False))
    assert df["state"].tolist() == ["completed"] * 3 + ["failed"] + ["completed"] * 2
    assert "bad 3" in df.loc[3, "error"]
    with pytest.raises(InvalidArgument, match=r"distributed\.Client"):
        asyncio.run(pool_map("return 1", [{}], cluster="tcp://nowhere", progress=False))


def test_teardown_of_a_dask_worker_stops_its_bundled_workers(
        client: distributed.Client) -> None:
    asyncio.run(pool_map("return 1", pd.Series(range(8)), workers=4, cluster=client,
                         progress=False))
    pids = [pid for pool in _bundled_worker_pids(client).values() for pid in pool]
    assert pids and all(pid_alive(p) for p in pids)
    client.unregister_worker_plugin("pool_notebook.map")  # teardown, as on worker close
    for pid in pids:
        if not wait_dead(pid):
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"bundled worker {pid} outlived its Dask worker's pool")


# ------------------------------------------------------------ per-row progress


def test_rows_reach_the_driver_while_their_partition_still_runs(
        client: distributed.Client, tmp_path: Path) -> None:
    # 12 inputs on 2 Dask workers -> 4 partitions of 3: [0, 1, 2] is one task, and
    # input 0 is held until rows 1 and 2 of that same task have reached the driver
    gate = Gate(str(tmp_path / "opened"), str(tmp_path / "stopped"))
    todo = [(i, {"input": i}) for i in range(12)]
    started: list[int] = []
    finished: list[int] = []
    running_when_opened: list[set[int]] = []
    ended_before_started: list[int] = []

    def on_row(row: Row) -> None:  # a loop callback: record, assert after the map
        if row.position not in started:
            ended_before_started.append(row.position)
        finished.append(row.position)
        if {1, 2} <= set(finished) and not running_when_opened:
            running_when_opened.append(set(started) - set(finished))
            Path(gate.opened).touch()

    rows = asyncio.run(dask_rows(client, GATED, todo, respond=gate, lib_paths=(),
                                 timeout=None, workers=2, on_row=on_row,
                                 on_start=started.append))
    assert rows[0].result == "opened", "rows 1 and 2 only came with their task's result"
    assert 0 in running_when_opened[0]  # input 0 was shown running meanwhile
    assert finished.index(0) > max(finished.index(1), finished.index(2))
    assert sorted(finished) == list(range(12)) == sorted(started)  # each once
    assert ended_before_started == []
    assert [rows[i].result for i in range(1, 12)] == [f"Q{i}" for i in range(1, 12)]
    assert {rows[i].node for i in range(3)} == {rows[0].node}  # one task drove them


def test_the_bar_counts_every_row_once_and_ends_with_none_running(
        client: distributed.Client, bars: list[RecordingProgress]) -> None:
    df = asyncio.run(pool_map('if ctx.input % 5 == 4 then error("no " .. ctx.input) end '
                              'return {n = ctx.input, seq = {ctx.input, "x", {}}}',
                              pd.Series(range(40)), workers=2, cluster=client))
    (bar,) = bars
    assert (bar.done, bar.failed, bar.running) == (32, 8, 0)
    assert sorted(bar.positions) == list(range(40))  # every row once, none twice
    assert df["state"].tolist() == ["failed" if i % 5 == 4 else "completed"
                                    for i in range(40)]
    ok = df[df["state"] == "completed"]
    assert ok["result"].tolist() == [{"n": i, "seq": [i, "x", {}]} for i in ok.index]
    assert not [t for t in client.get_events() if t.startswith(PLUGIN_NAME + ".")], \
        "the map's events stayed in the scheduler's log"


def test_a_stop_keeps_the_rows_done_inside_a_running_partition(
        client: distributed.Client, bars: list[RecordingProgress], tmp_path: Path) -> None:
    gate = Gate(str(tmp_path / "opened"), str(tmp_path / "stopped"))  # never opened

    async def stop_after_rows_one_and_two() -> pd.DataFrame:
        task = asyncio.ensure_future(pool_map(GATED, pd.Series(range(12)), workers=2,
                                              respond=gate, cluster=client))

        def stop(bar: RecordingProgress) -> None:
            if {1, 2} <= set(bar.positions):
                task.cancel()

        RecordingProgress.on_finished = stop
        return await task

    df = asyncio.run(stop_after_rows_one_and_two())
    assert df.loc[0, "state"] == "cancelled"
    assert df.loc[[1, 2], "state"].tolist() == ["completed", "completed"]
    assert df.loc[[1, 2], "result"].tolist() == ["Q1", "Q2"]
    assert bars[0].done == (df["state"] == "completed").sum()  # reported rows, kept
    # the stop reached the running task: its held session was cancelled on the Dask worker
    deadline = time.monotonic() + 60
    while not os.path.exists(gate.stopped):
        assert time.monotonic() < deadline, "the stopped map's task kept running"
        time.sleep(0.05)

    # the next map gets only its own rows (nothing of the stopped one reaches it)
    RecordingProgress.on_finished = None
    again = asyncio.run(pool_map("return ctx.input", pd.Series(range(12)), workers=2,
                                 cluster=client))
    assert again["result"].tolist() == list(range(12))
    assert (bars[1].done, bars[1].failed, bars[1].running) == (12, 0, 0)


@dataclasses.dataclass
class Asked:
    """A model (shipped to the Dask workers) that writes each prompt it is asked to ``log``."""

    log: str

    async def __call__(self, query: proto.Query) -> str:
        with open(self.log, "a") as f:
            f.write(query.prompt + "\n")
        return query.prompt.upper()


def _map_topics(client: distributed.Client) -> dict[str, int]:
    return {topic: len(events) for topic, events in client.get_events().items()
            if topic.startswith(PLUGIN_NAME + ".")}


def test_a_stop_while_submitting_runs_nothing_more_and_the_scheduler_forgets_the_map(
        client: distributed.Client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The stop comes while the first of four tasks is being submitted: no later task is
    submitted, the first is cancelled (or runs nothing), no input past it is asked, and
    the map's events and stop flag leave the scheduler."""
    asked = tmp_path / "asked"
    release = threading.Event()
    submitted: list[Any] = []
    submit = distributed.Client.submit

    def held_after_the_first(self: distributed.Client, *args: Any, **kwargs: Any) -> Any:
        future = submit(self, *args, **kwargs)
        submitted.append(future)
        release.wait(60)  # the submitting thread waits here until the map was stopped
        return future

    monkeypatch.setattr(distributed.Client, "submit", held_after_the_first)

    async def stop_while_submitting() -> pd.DataFrame:
        task = asyncio.ensure_future(pool_map(GATED, pd.Series(range(16)), workers=2,
                                              respond=Asked(str(asked)), cluster=client))
        while not submitted:
            await asyncio.sleep(0.01)
        task.cancel()
        return await task

    df = asyncio.run(stop_while_submitting())
    release.set()
    monkeypatch.undo()
    assert len(df) == 16 and set(df.loc[4:, "state"]) == {"cancelled"}
    assert len(submitted) == 1  # nothing was submitted after the stop
    deadline = time.monotonic() + 60
    while submitted[0].status == "pending":
        assert time.monotonic() < deadline, "the first task was neither cancelled nor ended"
        time.sleep(0.05)
    assert submitted[0].status in ("cancelled", "finished")
    first = {f"q{i}" for i in range(4)}  # the first task's inputs (4 tasks of 4)
    assert set(asked.read_text().split() if asked.exists() else ()) <= first
    deadline = time.monotonic() + 60  # the scheduler drops the map a moment after a stop
    while _map_topics(client):
        assert time.monotonic() < deadline, _map_topics(client)
        time.sleep(0.1)
    # and the next map runs normally
    again = asyncio.run(pool_map("return ctx.input", pd.Series(range(8)), workers=2,
                                 cluster=client))
    assert again["result"].tolist() == list(range(8))
    assert not _map_topics(client)


# ------------------------------------------------------- --cluster NAME|ADDRESS


def test_cluster_client_by_name_or_address_made_once_and_closed(
        client: distributed.Client) -> None:
    assert cluster_client("dc", {"dc": client}) is client
    for bad, namespace in (("bad", {}), ("qs", {"qs": [1, 2]}), ("tcp://x:1", {"tcp://x:1": 3})):
        with pytest.raises(InvalidArgument, match=r"name of a distributed\.Client or a "
                                                  r"scheduler address"):
            cluster_client(bad, namespace)
    with pytest.raises(InvalidArgument, match=r"unknown address scheme 'foo'.*tcp://"):
        cluster_client("foo://127.0.0.1:8786", {})
    with pytest.raises(InvalidArgument, match=r"no Dask scheduler there \(.*127\.0\.0\.1:1"):
        cluster_client("tcp://127.0.0.1:1", {})  # nothing listens there (Dask tries for 10 s)
    address = client.scheduler.address
    made = cluster_client(address, {})
    try:
        assert made is not client and made.scheduler.address == address
        assert cluster_client(address, {}) is made  # cached per address
        df = asyncio.run(pool_map("return ctx.input + 1", pd.Series(range(4)), workers=2,
                                  cluster=made, progress=False))
        assert df["result"].tolist() == [1, 2, 3, 4]
    finally:
        close_clients()
    assert made.status == "closed"
    assert cluster_client(address, {}) is not made  # a closed one is made again
    close_clients()
