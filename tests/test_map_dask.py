"""pool_notebook.map(cluster=...): the same map as Dask tasks on a LocalCluster."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from pool_notebook import protocol as proto
from pool_notebook.errors import InvalidArgument
from pool_notebook.mapping import RESULT_COLUMNS, pool_map

distributed = pytest.importorskip("distributed")

TWO_ROUNDS = ('local a = alc.llm("first " .. tostring(ctx.input))\n'
              'return alc.llm("second " .. a)')


async def slow_echo(query: proto.Query) -> str:
    """A simulated model (shipped to the Dask workers by cloudpickle): 50 ms per answer."""
    await asyncio.sleep(0.05)
    return f"<{query.prompt}>"


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    """Two Dask worker processes (one thread each), started with a private pool home."""
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"pn-dask-{os.getpid()}"
    home.mkdir(mode=0o700, exist_ok=True)
    old = {k: os.environ.get(k) for k in ("POOL_NOTEBOOK_HOME", "POOL_NOTEBOOK_HISTORY")}
    os.environ["POOL_NOTEBOOK_HOME"] = str(home)  # inherited by the worker processes
    os.environ["POOL_NOTEBOOK_HISTORY"] = str(home / "history.sqlite")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
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


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").read_text().count("State:\tZ") == 1


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
    assert pids and not any(_gone(p) for p in pids)
    client.unregister_worker_plugin("pool_notebook.map")  # teardown, as on worker close
    for pid in pids:
        for _ in range(200):
            if _gone(pid):
                break
            asyncio.run(asyncio.sleep(0.05))
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"bundled worker {pid} outlived its Dask worker's pool")
