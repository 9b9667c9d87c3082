"""Model responders (issue 10): the real openai SDK against a loopback chat server,
answering real Lua sessions on real worker subprocesses; the answers store."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pool_notebook import llm
from pool_notebook import protocol as proto
from pool_notebook.connections import Connection, ConnectionManager
from pool_notebook.errors import (
    AnswerStoreError,
    InvalidArgument,
    LLMError,
    LLMProviderError,
    ReplayMiss,
    ResponderError,
)
from pool_notebook.history import History, counts_from_metrics
from pool_notebook.session import Answer, Session, SessionState, resolve_responder

from .fakes import FakeChatServer, run

pytestmark = pytest.mark.usefixtures("pool_home")

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
BATCH_SAME = ("local qs = {} for i = 1, 8 do qs[i] = {prompt = 'Flip a coin.'} end "
              "return alc.llm_batch(qs)")
BATCH_DISTINCT = ("local qs = {} for i = 1, 8 do qs[i] = {prompt = 'item ' .. i} end "
                  "return alc.llm_batch(qs)")


@pytest.fixture
def chat() -> Iterator[FakeChatServer]:
    with FakeChatServer() as server:
        yield server


@pytest.fixture(autouse=True)
def no_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name their endpoint; a developer's own key or URL must not leak in."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "POOL_NOTEBOOK_ANSWERS",
                 "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION"):
        monkeypatch.delenv(name, raising=False)


@asynccontextmanager
async def worker() -> AsyncIterator[Connection]:
    """A real bundled worker subprocess, connected over its socket."""
    manager = ConnectionManager(History(None))
    conn = await manager.connect()
    try:
        yield conn
    finally:
        manager.close_all()


async def start(conn: Connection, code: str) -> Session:
    """Run ``code`` on the worker: the Session waits at its first pause."""
    session = await conn.run(code)
    assert session.state is SessionState.PAUSED, session.error
    return session


async def run_answered(code: str, respond: Any) -> Session:
    """One Lua run on a fresh worker, answered to the end by ``respond``."""
    async with worker() as conn:
        session = await start(conn, code)
        await session.answer_all(respond)
        return session


class Run:
    """Stands for one Lua run where a test calls ``responder.answer`` itself."""


def usages(session: Session) -> list[Any]:
    """The usage sent with each continue, in order."""
    return [step.request.usage for step in session.steps
            if isinstance(step.request, proto.Continue)]


# ------------------------------------------------------------------ answering real runs


def test_a_real_lua_run_answered_by_the_model(chat: FakeChatServer) -> None:
    chat.answer = lambda body, n: "4" if "2 + 2" in body["messages"][-1]["content"] else "?"
    code = ('local a = alc.llm("What is 2 + 2?", {system = "Answer with a number", '
            'max_tokens = 5}) return {answer = a}')
    responder = llm.openai("test-model", base_url=chat.base_url)
    session = run(run_answered(code, responder))
    assert session.state is SessionState.COMPLETED
    assert session.result == {"answer": "4"}
    [body] = chat.requests
    assert body["model"] == "test-model" and body["max_tokens"] == 5
    assert "temperature" not in body  # the provider's default unless one is given
    assert chat.keys == ["not-needed"]  # a local endpoint without a key still gets a request
    assert body["messages"] == [{"role": "system", "content": "Answer with a number"},
                                {"role": "user", "content": "What is 2 + 2?"}]
    # the provider's usage went out with the continue and reached the worker's metrics
    assert usages(session) == [{"prompt_tokens": 9, "completion_tokens": 1}]
    totals = counts_from_metrics(session.metrics)
    assert totals is not None and (totals.prompt_tokens, totals.completion_tokens) == (9, 1)
    history = session.connection.history.frame()
    [row] = history[history["op"] == "continue"].to_dict("records")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (9, 1)
    assert row["replayed"] is False  # asked the provider (the history marks replays)


def test_responder_string_uses_the_sdk_environment(chat: FakeChatServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", chat.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    responder = resolve_responder("openai:llama3.1:8b")
    assert isinstance(responder, llm.ModelResponder)
    assert responder.model == "llama3.1:8b" and responder.spec == "openai:llama3.1:8b"
    assert llm.from_spec("openai:llama3.1:8b") is responder  # one semaphore per kernel
    session = run(run_answered("return alc.llm('hi?')", "openai:llama3.1:8b"))
    assert session.result == "sample 1: hi?"
    assert chat.requests[0]["model"] == "llama3.1:8b" and chat.keys == ["sk-test"]
    with pytest.raises(LLMError, match="unknown responder 'claude:x'"):
        llm.from_spec("claude:x")
    with pytest.raises(LLMError, match="OPENAI_API_VERSION"):
        llm.from_spec("azure:my-deployment")


def test_the_magic_runs_a_cell_answered_by_the_model(chat: FakeChatServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The notebook path: ``%%pool_run --respond openai:MODEL``, then the configured default."""
    from IPython.core.interactiveshell import InteractiveShell

    from pool_notebook.connections import manager

    monkeypatch.setenv("OPENAI_BASE_URL", chat.base_url)
    shell = InteractiveShell.instance()
    manager.history = History(None)
    shell.run_line_magic("load_ext", "pool_notebook")
    try:
        shell.run_line_magic("pool_connect", "--name llm")
        shell.run_cell_magic("pool_run", "--respond openai:m --out s",
                             "return alc.llm_batch({{prompt = 'a?'}, {prompt = 'b?'}})")
        assert [text.split(": ")[1] for text in shell.user_ns["s"].result] == ["a?", "b?"]
        shell.run_line_magic("config", "PoolMagics.respond = 'openai:m'")
        shell.run_cell_magic("pool_run", "--out t", "return alc.llm('c?')")
        assert shell.user_ns["t"].result == "sample 3: c?"
    finally:
        shell.run_line_magic("config", "PoolMagics.respond = ''")
        shell.run_line_magic("pool_disconnect", "llm --shutdown")
        shell.run_line_magic("unload_ext", "pool_notebook")


def test_azure_deployments_go_through_the_sdks_azure_client(
        chat: FakeChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", chat.base_url.removesuffix("/v1"))
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key")
    monkeypatch.setenv("OPENAI_API_VERSION", "2024-06-01")
    session = run(run_answered("return alc.llm('hi?')", "azure:my-deployment"))
    assert session.result == "sample 1: hi?"
    assert chat.paths == ["/openai/deployments/my-deployment/chat/completions"
                          "?api-version=2024-06-01"]
    assert chat.keys == ["azure-key"]
    assert llm.from_spec("azure:my-deployment").spec == "azure:my-deployment"


def test_a_batch_is_answered_concurrently_in_order(chat: FakeChatServer) -> None:
    chat.delay = 1.0  # long enough that all 8 are in flight even on a loaded machine
    session = run(run_answered(BATCH_DISTINCT, llm.openai("m", base_url=chat.base_url)))
    assert chat.max_in_flight == 8  # all 8 slow answers were in flight together
    # each answer went to its own query, whatever order they came back in
    assert session.result == [f"sample {_arrival(chat, f'item {i}')}: item {i}"
                              for i in range(1, 9)]
    assert len(usages(session)) == 8 and all(u["completion_tokens"] == 4
                                             for u in usages(session))


def _arrival(chat: FakeChatServer, prompt: str) -> int:
    """1-based arrival number of the request for ``prompt``."""
    return next(n for n, body in enumerate(chat.requests, 1)
                if body["messages"][-1]["content"] == prompt)


def test_max_concurrency_bounds_across_sessions(chat: FakeChatServer) -> None:
    chat.delay = 0.3
    # cache="off": each run asks for itself (recorded runs would share identical requests)
    responder = llm.openai("m", base_url=chat.base_url, max_concurrency=3, cache="off")

    async def two_runs() -> list[Session]:
        return list(await asyncio.gather(run_answered(BATCH_DISTINCT, responder),
                                         run_answered(BATCH_DISTINCT, responder)))

    sessions = run(two_runs())
    assert all(s.state is SessionState.COMPLETED for s in sessions)
    assert chat.calls == 16 and chat.max_in_flight == 3


def test_same_prompt_in_a_batch_gives_distinct_recorded_samples(chat: FakeChatServer) -> None:
    responder = llm.openai("m", base_url=chat.base_url, temperature=1.0)
    session = run(run_answered(BATCH_SAME, responder))
    assert len(set(session.result)) == 8
    assert all(body["temperature"] == 1.0 for body in chat.requests)
    recorded = responder.store.frame()
    assert sorted(recorded["occurrence"]) == list(range(8))
    assert set(recorded["text"]) == set(session.result)
    assert set(recorded["prompt"]) == {"Flip a coin."} and set(recorded["model"]) == {"m"}


def test_a_rerun_replays_the_same_answers_in_order_with_no_provider_call(
        chat: FakeChatServer, tmp_path: Path) -> None:
    store = tmp_path / "answers.sqlite"
    code = ("local first = alc.llm('Flip a coin.') "
            "local qs = {} for i = 1, 8 do qs[i] = {prompt = 'Flip a coin.'} end "
            "return {first = first, rest = alc.llm_batch(qs)}")
    chat.delay = 0.05  # answers come back out of order
    first = run(run_answered(code, llm.openai("m", base_url=chat.base_url, store=store)))
    assert chat.calls == 9 and len(set(first.result["rest"])) == 8
    # another kernel: a new responder on the same store, no key, cache="record"
    again = run(run_answered(code, llm.openai("m", base_url=chat.base_url, store=store)))
    assert chat.calls == 9
    assert again.result == first.result
    assert usages(again) == usages(first)
    assert [a.replayed for a in first.answers.values()] == [False] * 9
    assert [a.replayed for a in again.answers.values()] == [True] * 9
    history = again.connection.history.frame()
    assert history[history["op"] == "continue"]["replayed"].tolist() == [True] * 9
    replay = run(run_answered(code, llm.openai("m", cache="replay", store=store)))
    assert replay.result == first.result and chat.calls == 9
    # cache="off" neither reads nor records
    off = llm.openai("m", base_url=chat.base_url, cache="off", store=store)
    fresh = run(run_answered(code, off))
    assert chat.calls == 18 and fresh.result != first.result
    assert len(llm.AnswerStore(store)) == 9


def test_concurrent_runs_share_one_call_per_recorded_answer(chat: FakeChatServer) -> None:
    """Two runs of one strategy at once: each identical request is asked once, and both
    runs get the answer the store will replay."""
    chat.delay = 0.2
    responder = llm.openai("m", base_url=chat.base_url)

    async def two_runs() -> list[Session]:
        return list(await asyncio.gather(run_answered(BATCH_SAME, responder),
                                         run_answered(BATCH_SAME, responder)))

    first, second = run(two_runs())
    assert chat.calls == 8 and first.result == second.result and len(set(first.result)) == 8
    flags = [a.replayed for s in (first, second) for a in s.answers.values()]
    assert flags.count(False) == 8 and flags.count(True) == 8  # 8 calls, 8 shared
    replay = llm.openai("m", cache="replay", store=responder.store)
    assert run(run_answered(BATCH_SAME, replay)).result == first.result


def test_answers_say_whether_they_were_replayed(chat: FakeChatServer) -> None:
    responder = llm.openai("m", base_url=chat.base_url)
    query = proto.Query("q-0", "Name a colour.")

    async def ask_twice(session: object) -> list[Answer]:
        return [await responder.answer(query, session=session, pause=0, queries=(query,)),
                await responder.answer(query, session=session, pause=1, queries=(query,))]

    recorded = run(ask_twice(Run()))
    replayed = run(ask_twice(Run()))
    assert [a.replayed for a in recorded] == [False, False]
    assert [a.replayed for a in replayed] == [True, True]
    assert [a.text for a in replayed] == [a.text for a in recorded] == [
        "sample 1: Name a colour.", "sample 2: Name a colour."]
    assert replayed[0].usage == {"prompt_tokens": 3, "completion_tokens": 5}
    # plain calls number identical requests in call order: a second responder replays them
    again = llm.openai("m", base_url=chat.base_url, store=responder.store)
    assert [run(again(query)).text for _ in range(3)] == [
        "sample 1: Name a colour.", "sample 2: Name a colour.", "sample 3: Name a colour."]
    assert chat.calls == 3


def test_one_query_asked_before_the_others_keeps_its_place(chat: FakeChatServer) -> None:
    """Occurrences are numbered over the whole pause, whichever query is asked first."""
    code = ("local qs = {} for i = 1, 3 do qs[i] = {prompt = 'Flip a coin.'} end "
            "return alc.llm_batch(qs)")
    responder = llm.openai("m", base_url=chat.base_url)

    async def ask_the_last_first() -> Session:
        async with worker() as conn:
            session = await start(conn, code)
            await session.ask(responder, "q-2")  # the widget's "ask" on one query
            await session.answer_all(responder)
            return session

    recorded = run(ask_the_last_first())
    assert recorded.result[2] == "sample 1: Flip a coin."
    replay = llm.openai("m", cache="replay", store=responder.store)
    assert run(run_answered(code, replay)).result == recorded.result
    assert chat.calls == 3
    with pytest.raises(InvalidArgument, match="pass the Session object"):
        run(responder.answer(proto.Query("q-0", "x"), session="s-1", pause=0))


def test_replay_miss_fails_clearly_and_leaves_the_session_paused(
        chat: FakeChatServer) -> None:
    responder = llm.openai("m", cache="replay")  # no key, no URL: never calls anyone

    async def scenario() -> Session:
        async with worker() as conn:
            session = await start(conn, "return alc.llm('What is the capital of France?')")
            with pytest.raises(ResponderError) as caught:
                await session.answer_all(responder)
            miss = caught.value.__cause__
            assert isinstance(miss, ReplayMiss)
            assert "What is the capital of France?" in str(miss)
            assert "occurrence 1" in str(miss) and str(responder.store.path) in str(miss)
            assert session.state is SessionState.PAUSED and len(session.pending) == 1
            await session.answer("Paris")  # still answerable, by hand
            return session

    assert run(scenario()).result == "Paris"
    assert chat.calls == 0


def test_provider_outage_leaves_the_session_paused_and_answerable(
        chat: FakeChatServer) -> None:
    chat.outage = 500
    responder = llm.openai("m", base_url=chat.base_url, max_retries=1)

    async def scenario() -> Session:
        async with worker() as conn:
            session = await start(conn, "return alc.llm_batch({{prompt = 'a?'}, {prompt = 'b?'}})")
            with pytest.raises(ResponderError) as caught:
                await session.answer_all(responder)
            error = caught.value.__cause__
            assert isinstance(error, LLMProviderError) and error.status == 500
            assert "scripted failure 500" in str(error) and chat.base_url in str(error)
            assert "stays paused" in str(error)
            assert session.state is SessionState.PAUSED
            assert [q.id for q in session.pending] == ["q-0", "q-1"]
            chat.outage = None
            await session.answer_all(responder)
            return session

    session = run(scenario())
    assert session.state is SessionState.COMPLETED
    assert [answer.split(": ")[1] for answer in session.result] == ["a?", "b?"]
    # the SDK retried once; the answers came only after the outage
    assert chat.statuses[-2:] == [200, 200] and set(chat.statuses[:-2]) == {500}
    assert len(chat.statuses) >= 5


def test_rate_limit_is_retried_with_retry_after(chat: FakeChatServer) -> None:
    chat.fail(429, count=2, retry_after="0.05")
    responder = llm.openai("m", base_url=chat.base_url)
    answer = run(responder(proto.Query("q-0", "hello")))
    assert answer.text == "sample 3: hello" and not answer.replayed
    assert chat.statuses == [429, 429, 200]


def test_a_provider_slower_than_the_timeout_fails_instead_of_hanging(
        chat: FakeChatServer) -> None:
    chat.delay = 2.0
    slow = llm.openai("m", base_url=chat.base_url, timeout=0.2, max_retries=1)
    with pytest.raises(LLMProviderError, match="APITimeoutError") as caught:
        run(slow(proto.Query("q-0", "hello")))
    assert caught.value.status is None and chat.calls == 2  # the SDK retried once
    assert len(slow.store) == 0  # nothing half-recorded


def test_unreachable_or_unconfigured_provider_errors(chat: FakeChatServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    query = proto.Query("q-0", "hello")
    down = llm.openai("m", base_url="http://127.0.0.1:9/v1", max_retries=0, cache="off")
    with pytest.raises(LLMProviderError, match=r"model 'm' at http://127.0.0.1:9/v1 failed: "
                                               r"APIConnectionError") as caught:
        run(down(query))
    assert caught.value.status is None
    nokey = llm.openai("m", cache="off")
    with pytest.raises(LLMError, match="Set OPENAI_API_KEY"):
        run(nokey(query))
    with pytest.raises(InvalidArgument, match="cache='always'"):
        llm.openai("m", cache="always")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="max_concurrency=0"):
        llm.openai("m", max_concurrency=0)
    monkeypatch.setitem(sys.modules, "openai", None)  # the [llm] extra is not installed
    with pytest.raises(LLMError, match=r"pip install 'pool-notebook\[llm\]'"):
        run(llm.openai("m", base_url=chat.base_url, cache="off")(query))


def test_flags_and_token_limit_reach_the_request(chat: FakeChatServer) -> None:
    responder = llm.openai("m", base_url=chat.base_url, token_limit_field="max_completion_tokens")
    code = ("return {alc.ground('The moon is made of rock.', {system = 'Be brief.'}), "
            "alc.specify('Make it better.', {max_tokens = 7})}")
    run(run_answered(code, responder))
    grounded, specify = (body["messages"] for body in chat.requests)
    assert grounded[0]["content"].startswith("Be brief.\n\n")
    assert llm.FLAG_NOTES["grounded"] in grounded[0]["content"]
    assert specify[0] == {"role": "system", "content": llm.FLAG_NOTES["underspecified"]}
    assert chat.requests[1]["max_completion_tokens"] == 7
    assert "max_tokens" not in chat.requests[1]
    plain = llm.openai("m", base_url=chat.base_url, flag_notes=None, cache="off")
    run(plain(proto.Query("q-0", "x", grounded=True)))
    assert chat.requests[-1]["messages"] == [{"role": "user", "content": "x"}]


@pytest.mark.skipif(not (CORPUS / "algocline-bundled-packages" / "sc").is_dir(),
                    reason=f"the pinned corpus is absent ({CORPUS}): see shared/corpus/PIN.md")
def test_a_real_strategy_package_records_then_replays_without_a_provider(
        chat: FakeChatServer) -> None:
    """algocline's self-consistency package (`sc`), its votes answered by the model."""
    chat.answer = lambda body, n: f"Path {n}: 2 + 2 = 4. The answer is 4."
    lib_paths = [str((CORPUS / name).resolve())
                 for name in ("algocline-bundled-packages", "evalframe")]
    ctx = {"task": "What is 2 + 2?", "n": 5}

    async def strategy(respond: llm.ModelResponder) -> Session:
        async with worker() as conn:
            session = await conn.run("return require('sc').run(ctx)", ctx=ctx,
                                     lib_paths=lib_paths, respond=respond)
            assert session.state is SessionState.COMPLETED, session.error
            return session

    recorded = run(strategy(llm.openai("m", base_url=chat.base_url)))
    calls = chat.calls
    assert calls == recorded.result["result"]["total_llm_calls"] == 11
    assert len(set(recorded.result["result"]["votes"])) == 5  # 5 distinct sampled paths
    replayed = run(strategy(llm.openai("m", cache="replay")))
    assert replayed.result == recorded.result and chat.calls == calls


# ------------------------------------------------------------------ the answers store


def test_store_file_is_private_and_exports_for_a_keyless_replay(
        chat: FakeChatServer, tmp_path: Path) -> None:
    responder = llm.openai("m", base_url=chat.base_url, temperature=0)
    session = run(run_answered(BATCH_SAME, responder))
    path = responder.store.path
    assert path.parent == Path(os.environ["POOL_NOTEBOOK_HOME"])  # the default location
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    shipped = tmp_path / "answers.jsonl"
    assert responder.store.export_jsonl(shipped) == 8
    lines = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert {line["temperature"] for line in lines} == {0.0}
    # a Binder demo: an empty store, the shipped file imported, no key, replay only
    binder = llm.AnswerStore(tmp_path / "binder.sqlite")
    assert binder.import_jsonl(shipped) == 8
    assert binder.import_jsonl(shipped) == 0  # importing twice adds nothing
    demo = llm.openai("m", cache="replay", store=binder, temperature=0.0)
    assert run(run_answered(BATCH_SAME, demo)).result == session.result
    assert chat.calls == 8


def test_store_location_and_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_NOTEBOOK_ANSWERS", str(tmp_path / "elsewhere.sqlite"))
    assert llm.openai("m").store.path == tmp_path / "elsewhere.sqlite"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"provider": "openai"}\n')
    with pytest.raises(AnswerStoreError, match="line 1 is not an exported answer"):
        llm.AnswerStore(tmp_path / "a.sqlite").import_jsonl(bad)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(AnswerStoreError, match="schema version 7"):
        len(llm.AnswerStore(other))
    not_sqlite = tmp_path / "text.sqlite"
    not_sqlite.write_text("hello, this is not a database" * 100)
    with pytest.raises(AnswerStoreError, match=r"text\.sqlite"):
        len(llm.AnswerStore(not_sqlite))
