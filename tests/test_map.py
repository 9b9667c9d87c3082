"""pool_notebook.map: one Lua strategy over a table of inputs on a pool of real workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import pool_notebook
from pool_notebook import llm, spawn
from pool_notebook import protocol as proto
from pool_notebook.connections import manager
from pool_notebook.display import map_figure
from pool_notebook.errors import InvalidArgument
from pool_notebook.history import History
from pool_notebook.mapping import (
    RESULT_COLUMNS,
    WorkerPool,
    compare_maps,
    map_summary,
    pool_map,
    strategy_code,
)
from tests.fakes import TWO_ROUNDS, FakeChatServer, kernel_outputs, run_cell, slow_echo, wait_dead

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
BUNDLED = CORPUS / "algocline-bundled-packages"

@pytest.fixture
def history(pool_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[History]:
    """The kernel-wide history the map's connections record into (in memory here)."""
    fresh = History(None)
    monkeypatch.setattr(manager, "history", fresh)
    yield fresh


# ------------------------------------------------------------- the main run


def test_256_inputs_two_model_rounds_on_16_workers_in_input_order(history: History) -> None:
    inputs = pd.Series(range(256), index=[f"q{i}" for i in range(256)], name="n")
    df = asyncio.run(pool_map(TWO_ROUNDS, inputs, workers=16, respond=slow_echo,
                              progress=False))
    assert list(df.index) == list(inputs.index)
    assert list(df.columns) == ["n", *RESULT_COLUMNS]
    assert df["n"].tolist() == list(range(256))
    assert df["result"].tolist() == [f"<second <first {i}>>" for i in range(256)]
    assert set(df["state"]) == {"completed"}
    assert df["error"].isna().all()
    assert (df["llm_calls"] == 2).all()
    assert (df["prompt_tokens"] > 0).all() and (df["completion_tokens"] > 0).all()
    assert df["worker"].nunique() == 16  # every worker of the pool ran inputs
    assert set(df["node"]) == {f"{os.uname().nodename}:{os.getpid()}"}
    assert (df["latency_ms"] >= 100).all()  # two 50 ms answers each
    rows = history.frame()
    runs = rows[rows["op"] == "run"]
    assert len(runs) == 256 and set(rows["connection"]).issubset(
        {f"map-{i}" for i in range(16)})
    assert (rows["op"] == "continue").sum() == 512
    assert set(rows["outcome"].astype(str)) == {"ok"}
    for sid in df["worker"]:  # the pool was shut down with the map
        entry = next(e for e in spawn._children if sid in e.args)
        assert entry.wait(30) is not None


def test_list_of_dicts_and_a_dataframe_become_ctx_with_json_values(history: History) -> None:
    frame = pd.DataFrame({"a": np.array([1, 2], dtype=np.int64), "b": [1.5, np.nan],
                          "c": ["x", None], "d": pd.to_datetime(["2024-01-02", None])},
                         index=[10, 20])
    code = "return {a = ctx.a, b = ctx.b == alc.null and 'null' or ctx.b, " \
           "c = ctx.c == alc.null and 'null' or ctx.c, d = ctx.d == alc.null and 'null' or ctx.d}"
    df = asyncio.run(pool_map(code, frame, workers=2, progress=False))
    assert list(df.index) == [10, 20]
    assert df["result"].tolist() == [{"a": 1, "b": 1.5, "c": "x", "d": "2024-01-02T00:00:00"},
                                     {"a": 2, "b": "null", "c": "null", "d": "null"}]
    listed = asyncio.run(pool_map("return ctx.q .. '!'", [{"q": "hi"}, {"q": "yo"}],
                                  workers=1, progress=False))
    assert listed["q"].tolist() == ["hi", "yo"]
    assert listed["result"].tolist() == ["hi!", "yo!"]


def test_bad_arguments_are_typed_errors_before_anything_runs(history: History) -> None:
    with pytest.raises(InvalidArgument, match="clash with the columns map adds"):
        asyncio.run(pool_map("return 1", pd.DataFrame({"result": [1]}), progress=False))
    with pytest.raises(InvalidArgument, match="cannot become a Lua value"):
        asyncio.run(pool_map("return 1", [{"x": object()}], progress=False))
    with pytest.raises(InvalidArgument, match="DataFrame, a Series or a list of dicts"):
        asyncio.run(pool_map("return 1", "abc", progress=False))
    with pytest.raises(InvalidArgument, match="either code or strategy"):
        asyncio.run(pool_map("return 1", [{}], strategy="cot", progress=False))
    with pytest.raises(InvalidArgument, match="not a Lua package name"):
        strategy_code('cot"); os.exit(')
    with pytest.raises(InvalidArgument, match="timeout must be a positive"):
        asyncio.run(pool_map("return 1", [{}], timeout=0, progress=False))
    with pytest.raises(InvalidArgument, match="positive int"):
        asyncio.run(pool_map("return 1", [{}], workers=0, progress=False))
    assert not spawn._children or all(c.poll() is not None for c in spawn._children)


# ------------------------------------------------------------------ failures


def test_failing_inputs_are_failed_rows_and_the_others_complete(history: History) -> None:
    code = ('if ctx.input == 2 then error("no good: " .. ctx.input) end\n'
            'return alc.llm("q " .. ctx.input)')

    def respond(query: proto.Query) -> str:
        if query.prompt == "q 5":
            raise ValueError("the responder gave up on q 5")
        return query.prompt.upper()

    df = asyncio.run(pool_map(code, pd.Series(range(8)), workers=3, respond=respond,
                              progress=False))
    assert df["state"].tolist() == ["completed"] * 2 + ["failed"] + ["completed"] * 2 + \
        ["failed"] + ["completed"] * 2
    assert "no good: 2" in df.loc[2, "error"]
    assert "ResponderError" in df.loc[5, "error"] and "gave up on q 5" in df.loc[5, "error"]
    assert df.loc[[0, 1, 3, 4, 6, 7], "result"].tolist() == [f"Q {i}" for i in (0, 1, 3, 4, 6, 7)]


def test_code_that_asks_a_model_without_a_responder_fails_clearly(history: History) -> None:
    df = asyncio.run(pool_map('return alc.llm("hi")', [{}, {}], workers=1, progress=False))
    assert set(df["state"]) == {"failed"}
    assert df["error"].str.contains("no responder was given").all()


def test_an_input_over_its_timeout_is_a_timeout_row_and_its_worker_replaced(
        history: History) -> None:
    code = "if ctx.input == 1 then while true do end end return ctx.input * 10"
    df = asyncio.run(pool_map(code, pd.Series([0, 1, 2, 3]), workers=1, timeout=3.0,
                              progress=False))
    assert df["state"].tolist() == ["completed", "timeout", "completed", "completed"]
    assert df["result"].tolist()[2:] == [20, 30]
    assert "timeout" in df.loc[1, "error"]
    assert df.loc[0, "worker"] != df.loc[2, "worker"]  # a fresh worker after the timeout


def test_a_killed_worker_is_replaced_and_its_input_retried_once(history: History) -> None:
    async def main() -> tuple[pd.DataFrame, WorkerPool, list[int]]:
        pool = await WorkerPool.spawn(2)
        killed: list[int] = []

        async def respond(query: proto.Query) -> str:
            conn = next(c for c in pool.connections if c.session is not None and
                        any(q.prompt == query.prompt for q in c.session.pending))
            if (query.prompt == "q 3" and not killed) or query.prompt == "q 6":
                killed.append(conn.pid)
                os.kill(conn.pid, signal.SIGKILL)  # the worker dies mid-session
                await asyncio.sleep(1)
            return query.prompt + "!"

        try:
            df = await pool_map('return alc.llm("q " .. ctx.input)', pd.Series(range(8)),
                                workers=pool, respond=respond, progress=False)
        finally:
            pool.close()
        return df, pool, killed

    df, pool, killed = asyncio.run(main())
    assert len(killed) == 3  # q 3 once; q 6 on the first try and on its retry
    for pid in killed:
        assert wait_dead(pid, 30)
    assert df.loc[3, "state"] == "completed" and df.loc[3, "result"] == "q 3!"
    assert df.loc[6, "state"] == "failed"
    assert "died while running this input" in df.loc[6, "error"]
    assert "again on the retry" in df.loc[6, "error"]
    others = df.drop(index=[6])
    assert set(others["state"]) == {"completed"}
    assert others["result"].tolist() == [f"q {i}!" for i in others.index]
    assert pool.replaced == 3
    assert df["worker"].nunique() >= 3  # the original two and replacements


def test_given_connections_are_used_and_left_open(history: History) -> None:
    async def main() -> tuple[pd.DataFrame, bool]:
        conn = await pool_notebook.connect(name="mine")
        try:
            df = await pool_map("return ctx.input + 1", pd.Series([1, 2, 3]),
                                workers=[conn], progress=False)
            still = (await conn.status()).ok
        finally:
            manager.disconnect("mine")
        return df, still

    df, still_open = asyncio.run(main())
    assert df["result"].tolist() == [2, 3, 4] and df["worker"].nunique() == 1
    assert still_open


# ------------------------------------------------------- interrupt and resume


def test_cancel_returns_partial_rows_and_resume_completes_them(history: History) -> None:
    code = 'return alc.llm("q " .. ctx.input)'
    inputs = pd.Series(range(12), index=list("abcdefghijkl"))
    asked: list[str] = []

    async def stuck_after_four(query: proto.Query) -> str:
        asked.append(query.prompt)
        if int(query.prompt.split()[1]) >= 4:
            await asyncio.Event().wait()  # a model that never answers
        return query.prompt.upper()

    async def interrupted() -> pd.DataFrame:
        task = asyncio.ensure_future(pool_map(code, inputs, workers=4, respond=stuck_after_four,
                                              progress=False))
        while len(asked) < 8:  # rows 0-3 done, 4-7 waiting on the model
            await asyncio.sleep(0.01)
        task.cancel()
        return await task

    partial = asyncio.run(interrupted())
    assert partial["state"].tolist() == ["completed"] * 4 + ["cancelled"] * 8
    assert partial["result"].tolist()[:4] == ["Q 0", "Q 1", "Q 2", "Q 3"]
    assert partial["result"].isna().tolist()[4:] == [True] * 8
    assert list(partial.index) == list(inputs.index)
    workers = set(partial["worker"].dropna())
    for child in spawn._children:  # the map's own pool was shut down with it
        if workers & set(child.args):
            assert child.wait(30) is not None
    ops = history.frame()["op"].value_counts()
    assert (ops["run"], ops["continue"]) == (8, 4)  # inputs 8-11 never started

    asked.clear()

    async def answer(query: proto.Query) -> str:
        asked.append(query.prompt)
        return query.prompt.upper()

    done = asyncio.run(pool_map(code, inputs, workers=4, respond=answer, resume=partial,
                                progress=False))
    assert done["state"].tolist() == ["completed"] * 12
    assert done["result"].tolist() == [f"Q {i}" for i in range(12)]
    assert sorted(asked) == sorted(f"q {i}" for i in range(4, 12))  # only the rest ran
    assert done.loc["a", "worker"] == partial.loc["a", "worker"]  # kept from the first run
    with pytest.raises(InvalidArgument, match="same inputs"):
        asyncio.run(pool_map(code, inputs[:3], resume=partial, progress=False))


def test_cancel_while_the_pool_starts_returns_every_row_cancelled(history: History) -> None:
    async def never(query: proto.Query) -> str:
        await asyncio.Event().wait()
        return ""

    async def main() -> pd.DataFrame:
        task = asyncio.ensure_future(pool_map('return alc.llm("x")', pd.Series(range(6)),
                                              workers=3, respond=never, progress=False))
        await asyncio.sleep(0.2)  # spawning, or (on a fast machine) waiting on the model
        task.cancel()
        return await task

    df = asyncio.run(main())
    assert df["state"].tolist() == ["cancelled"] * 6 and df["result"].isna().all()


def test_a_model_responder_records_then_the_map_replays_without_the_provider(
        history: History, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "POOL_NOTEBOOK_ANSWERS"):
        monkeypatch.delenv(name, raising=False)  # the store is <pool_home>/answers.sqlite
    code = 'return alc.llm("say " .. ctx.input)'
    inputs = pd.Series(["a", "b", "c", "d", "e"])
    with FakeChatServer(answer=lambda body, n: body["messages"][-1]["content"].upper()) as chat:
        recorded = asyncio.run(pool_map(code, inputs, workers=2, progress=False,
                                        respond=llm.openai("m", base_url=chat.base_url)))
        assert chat.calls == 5
    assert recorded["result"].tolist() == ["SAY A", "SAY B", "SAY C", "SAY D", "SAY E"]
    assert (recorded["prompt_tokens"] > 0).all() and (recorded["completion_tokens"] > 0).all()
    replayed = asyncio.run(pool_map(code, inputs, workers=2, progress=False,
                                    respond=llm.openai("m", cache="replay")))
    assert replayed["result"].tolist() == recorded["result"].tolist()
    replays = history.frame().query("op == 'continue'")["replayed"].tolist()
    assert replays == [False] * 5 + [True] * 5


# ------------------------------------------------------------ score, summary


def test_score_summary_and_two_maps_side_by_side(history: History) -> None:
    questions = pd.DataFrame({"q": [f"{i} + {i}" for i in range(10)],
                              "expected": [str(2 * i) for i in range(10)]})

    def right(query: proto.Query) -> str:
        a, _, b = query.prompt.partition(" + ")
        return str(int(a) + int(b))

    def wrong_on_odd(query: proto.Query) -> str:
        a = int(query.prompt.partition(" + ")[0])
        return str(2 * a + a % 2)

    def exact(row: dict[str, Any], result: Any) -> float:
        return float(result == row["expected"])

    code = "return alc.llm(ctx.q)"
    a = asyncio.run(pool_map(code, questions, workers=2, respond=right, score=exact,
                             progress=False))
    b = asyncio.run(pool_map(code, questions, workers=2, respond=wrong_on_odd, score=exact,
                             progress=False))
    assert a["score"].tolist() == [1.0] * 10
    picky = asyncio.run(pool_map(code, questions, workers=2, respond=right,
                                 score=lambda row, result: 1 / (int(result) % 4),
                                 progress=False))  # raises on multiples of 4
    zero = picky["result"].astype(int) % 4 == 0
    assert picky.loc[zero, "score"].isna().all() and picky.loc[~zero, "score"].notna().all()
    assert picky.loc[zero, "error"].str.startswith("score(row, result) raised "
                                                   "ZeroDivisionError").all()
    assert set(picky["state"]) == {"completed"}  # the map itself succeeded
    assert b["score"].tolist() == [1.0, 0.0] * 5
    summary = map_summary(b)
    assert summary["completed"] == 10 and summary["failed"] == 0
    assert summary["score_mean"] == 0.5
    assert summary["score_ci_low"] < 0.5 < summary["score_ci_high"] < 1.0
    assert summary["p50_ms"] > 0 and summary["llm_calls"] == 10
    table = compare_maps({"direct": a, "odd": b})
    assert list(table.columns) == ["direct", "odd"]
    assert table.loc["score_mean"].tolist() == [1.0, 0.5]
    assert table.loc["score_ci_low", "direct"] == 1.0  # no spread, no interval
    fig = map_figure({"direct": a, "odd": b})
    ax_state, ax_pct, ax_score = fig.axes
    assert [bar.get_height() for bar in ax_state.containers[0]] == [10, 10]  # completed
    assert [bar.get_height() for bar in ax_score.patches] == [1.0, 0.5]
    assert len(ax_pct.get_lines()) == 2
    assert fig._repr_png_().startswith(b"\x89PNG")


# -------------------------------------------------------------- real packages


@pytest.mark.skipif(not BUNDLED.is_dir(),
                    reason=f"the pinned corpus is absent ({CORPUS}): see shared/corpus/PIN.md")
def test_real_cot_and_sc_packages_mapped_with_strategy(history: History) -> None:
    lib_paths = [str(BUNDLED.resolve())]
    questions = pd.DataFrame({"task": [f"What is {i} + {i}?" for i in range(6)]})

    def model(query: proto.Query) -> str:
        asked = re.search(r"What is (\d+) \+ (\d+)\?", query.prompt)
        assert asked, query.prompt  # every prompt of both strategies carries the task
        return f"The answer is {int(asked[1]) + int(asked[2])}"

    cot = asyncio.run(pool_map(None, questions, strategy="cot", lib_paths=lib_paths,
                               workers=3, respond=model, progress=False))
    assert set(cot["state"]) == {"completed"}, cot["error"].tolist()
    assert [r["result"]["conclusion"] for r in cot["result"]] == \
        [f"The answer is {2 * i}" for i in range(6)]
    assert all(len(r["result"]["chain"]) == 3 for r in cot["result"])
    assert (cot["llm_calls"] == 4).all()  # depth 3 + the conclusion
    sc = asyncio.run(pool_map(None, questions.assign(n=3), strategy="sc",
                              lib_paths=lib_paths, workers=3, respond=model, progress=False))
    assert set(sc["state"]) == {"completed"}, sc["error"].tolist()
    assert [r["result"]["answer"] for r in sc["result"]] == \
        [f"The answer is {2 * i}" for i in range(6)]
    assert all(len(r["result"]["votes"]) == 3 for r in sc["result"])
    assert (sc["llm_calls"] > cot["llm_calls"].min()).all()


# --------------------------------------------------------- the magic in a kernel


@pytest.mark.kernel
def test_pool_map_magic_in_a_real_kernel_stop_then_resume(
        kernel: Any, tmp_path: Path) -> None:
    km, kc = kernel
    blocked = tmp_path / "blocked"
    setup = run_cell(kc, textwrap.dedent(f"""
        import asyncio, pandas as pd, pool_notebook
        %load_ext pool_notebook
        qs = pd.DataFrame({{"q": [f"q{{i}}" for i in range(10)]}})

        async def upper(query):
            return query.prompt.upper()

        async def stuck_after_four(query):
            if int(query.prompt[1:]) >= 4:
                with open({str(blocked)!r}, "a") as f:
                    f.write(query.prompt + "\\n")
                await asyncio.Event().wait()  # a model that never answers
            return query.prompt.upper()
    """))
    assert setup["error"] is None, setup
    done = run_cell(kc, "%%pool_map --in qs --workers 3 --respond upper --out first --plot\n"
                     "return alc.llm(ctx.q)")
    assert done["error"] is None, done
    check = run_cell(kc, "runs = pool_notebook.history().query('op == \"run\"')\n"
                      "print(first.result.tolist() == [q.upper() for q in qs.q], "
                      "first.worker.nunique(), len(runs))")
    assert check["stdout"].split() == ["True", "3", "10"], check
    assert any("score_mean" not in str(d) and "p50_ms" in str(d) for d in done["data"])
    assert sum("image/png" in d for d in done["data"]) == 1  # --plot: the figure, once

    stopped = kc.execute("%%pool_map --in qs --workers 2 --respond stuck_after_four "
                         "--out part\nreturn alc.llm(ctx.q)")
    deadline = time.monotonic() + 60
    while not blocked.exists() or len(blocked.read_text().split()) < 2:
        assert time.monotonic() < deadline, "the map never reached the blocking inputs"
        time.sleep(0.05)
    km.interrupt_kernel()
    result = kernel_outputs(kc, [stopped])[stopped]
    assert result["error"] is not None and "KeyboardInterrupt" in result["error"]
    assert "4 of 10 rows completed (stored in part" in result["stdout"], result
    states = run_cell(kc, "print(part.state.tolist().count('completed'), "
                       "part.state.tolist().count('cancelled'))")
    assert states["stdout"].split() == ["4", "6"], states
    resumed = run_cell(kc, "%%pool_map --in qs --workers 2 --respond upper --out part "
                        "--resume part\nreturn alc.llm(ctx.q)\n")
    assert resumed["error"] is None, resumed
    final = run_cell(kc, "print(part.result.tolist() == [q.upper() for q in qs.q])")
    assert final["stdout"].strip() == "True", final
    usage = run_cell(kc, "%%pool_map --in qs --strategy cot\nreturn 1")
    assert "UsageError" in usage["stdout"] and "not both" in usage["stdout"], usage


@pytest.mark.kernel
def test_pool_map_magic_on_a_dask_cluster_by_name_and_by_address(
        kernel: Any, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    km, kc = kernel
    blocked, stopped = tmp_path / "blocked", tmp_path / "stopped"
    setup = run_cell(kc, textwrap.dedent(f"""
        import asyncio, pandas as pd, pool_notebook
        from distributed import Client, LocalCluster
        %load_ext pool_notebook
        qs = pd.DataFrame({{"q": [f"q{{i}}" for i in range(16)]}})
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=40)
        dc = Client(cluster)
        dc.wait_for_workers(2)

        async def held(query):  # q0 waits for a model that never answers
            if query.prompt != "q0":
                return query.prompt.upper()
            open({str(blocked)!r}, "w").close()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                open({str(stopped)!r}, "w").close()
                raise
    """), timeout=180)
    assert setup["error"] is None, setup
    # the stop button SIGINTs the kernel's whole process group, which kills a LocalCluster
    # started inside the kernel (dask/distributed#1925): the stop runs on one outside it
    outside = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=40)
    try:
        done = run_cell(kc, "%%pool_map --in qs --cluster dc --workers 2 --out d\n"
                         "return ctx.q .. '!'", timeout=180)
        assert done["error"] is None, done
        check = run_cell(kc, "print(d.result.tolist() == [q + '!' for q in qs.q], "
                          "d.node.nunique(), sorted(set(d.state)))")
        assert check["stdout"].split() == ["True", "2", "['completed']"], check

        for bad in ("bad", "qs"):
            usage = run_cell(kc, f"%%pool_map --in qs --cluster {bad}\nreturn 1")
            assert "UsageError" in usage["stdout"], usage
            assert (f"--cluster {bad}: pass the name of a distributed.Client or a scheduler "
                    "address") in usage["stdout"], usage

        address = outside.scheduler_address
        running = kc.execute(f"%%pool_map --in qs --cluster {address} --workers 2 "
                             "--respond held --out part\nreturn alc.llm(ctx.q)")
        deadline = time.monotonic() + 120
        while not blocked.exists():
            assert time.monotonic() < deadline, "the map never reached q0"
            time.sleep(0.05)
        km.interrupt_kernel()
        result = kernel_outputs(kc, [running], timeout=120)[running]
        assert result["error"] is not None and "KeyboardInterrupt" in result["stdout"] + \
            str(result["error"]), result
        assert "rows completed (stored in part" in result["stdout"], result
        while not stopped.exists():  # the stop reached the Dask worker's session
            assert time.monotonic() < deadline, "q0's session went on after the stop"
            time.sleep(0.05)
        partial = run_cell(kc, "print(part.state[0], set(part.result[part.state == 'completed'] "
                            "== part.q[part.state == 'completed'].str.upper()) <= {True})")
        assert partial["stdout"].split() == ["cancelled", "True"], partial

        resumed = run_cell(kc, f"%%pool_map --in qs --cluster {address} --workers 2 --out part "
                            "--resume part\nreturn ctx.q:upper()", timeout=180)
        assert resumed["error"] is None, resumed
        made = run_cell(kc, "from pool_notebook import mapping_dask\n"
                         "made = list(mapping_dask._clients.values())\n"
                         "print(part.result.tolist() == qs.q.str.upper().tolist(), len(made), "
                         "made[0] is not dc, part.node.nunique())")
        assert made["stdout"].split() == ["True", "1", "True", "2"], made

        unloaded = run_cell(kc, "%unload_ext pool_notebook\n"
                             "print(made[0].status, mapping_dask._clients, dc.status)")
        assert unloaded["stdout"].split() == ["closed", "{}", "running"], unloaded
    finally:
        run_cell(kc, "dc.close(); cluster.close()", timeout=60)
        outside.close()
