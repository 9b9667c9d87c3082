"""Session: pauses, answers in any order, answer_all concurrency, responder failures.

Everything runs against the bundled worker over its real socket.
"""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pandas as pd
import pytest

from pool_notebook import protocol as proto
from pool_notebook.connections import Connection, ConnectionManager
from pool_notebook.errors import (
    InvalidArgument,
    ResponderError,
    SessionNotPaused,
    WorkerError,
)
from pool_notebook.history import History, Outcome, counts_from_metrics
from pool_notebook.session import (
    Answer,
    PauseResponder,
    Session,
    SessionState,
    resolve_responder,
)
from tests.fakes import FakeChatServer

pytestmark = pytest.mark.usefixtures("pool_home")

THREE = """
local answers = alc.llm_batch({{prompt = "a?"}, {prompt = "b?"}, {prompt = "c?"}})
return table.concat(answers, ",")
"""
TWO_ROUNDS = """
local first = alc.llm("first?")
local second = alc.llm("second " .. first .. "?")
return first .. "+" .. second
"""


def _drive(body: Callable[[Connection], Awaitable[None]],
           run: Callable[[Any], Any] = asyncio.run) -> None:
    """Run ``body`` with a fresh manager (in-memory history) and a spawned worker."""
    async def main() -> None:
        manager = ConnectionManager(History(None))
        conn = await manager.connect()
        try:
            await body(conn)
        finally:
            await conn.shutdown()
            manager.close_all()

    run(asyncio.wait_for(main(), 60))


def test_answers_in_any_order_with_observers(run: Callable[[Any], Any]) -> None:
    async def body(conn: Connection) -> None:
        session = await conn.run(THREE)
        assert isinstance(session, Session) and conn.session is session
        assert session.state is SessionState.PAUSED and session.id is not None
        assert [q.prompt for q in session.pending] == ["a?", "b?", "c?"]
        assert session.code == THREE and session.pauses == 1 and not session.done
        seen: list[tuple[SessionState, int]] = []
        stop = session.observe(lambda s: seen.append((s.state, len(s.pending))))
        ids = [q.id for q in session.pending]
        await session.answer("B", ids[1])
        assert [q.id for q in session.pending] == [ids[0], ids[2]]
        await session.answer(Answer("C", usage={"prompt_tokens": 4, "completion_tokens": 1}),
                             ids[2])
        reply = await session.answer("A")  # no id: the first pending query
        assert reply.ok and reply.request.query_id == ids[0]  # type: ignore[union-attr]
        assert session.state is SessionState.COMPLETED and session.done
        assert session.result == "A,B,C" and session.error is None and session.pending == []
        assert counts_from_metrics(session.metrics).llm_calls == 3  # type: ignore[union-attr]
        assert seen[0] == (SessionState.RUNNING, 2) and seen[1] == (SessionState.PAUSED, 2)
        assert seen[-1] == (SessionState.COMPLETED, 0) and len(seen) == 6
        stop()
        with pytest.raises(SessionNotPaused, match="no query is waiting"):
            await session.answer("late")
        assert len(seen) == 6  # stopped observing
        df = conn.history.frame()
        row = df[df["query_id"] == ids[2]].iloc[0]
        assert row["prompt_tokens"] == 4 and row["completion_tokens"] == 1
        typed = df[df["op"] == "continue"]["replayed"].tolist()
        assert typed == [pd.NA, False, pd.NA]  # strings were typed; an Answer was not replayed
        last = df.iloc[-1]  # the request that finished the session carries its metrics
        assert last["feed_state"] == "completed" and last["llm_calls"] == 3

    _drive(body, run)  # on asyncio and on uvloop


def test_answer_rejects_unknown_queries_and_bad_values() -> None:
    async def body(conn: Connection) -> None:
        session = await conn.run(TWO_ROUNDS)
        with pytest.raises(SessionNotPaused, match="'q-99' is not pending"):
            await session.answer("x", "q-99")
        with pytest.raises(InvalidArgument):
            await session.answer(42)  # type: ignore[arg-type]
        assert len(session.steps) == 1  # nothing was sent
        await session.answer("one")
        assert session.state is SessionState.PAUSED and session.pending[0].prompt == \
            "second one?"
        await session.answer("two")
        assert session.result == "one+two" and session.pauses == 2

    _drive(body)


def test_failed_session_and_worker_errors() -> None:
    async def body(conn: Connection) -> None:
        failed = await conn.run("error('boom from Lua')")
        assert failed.state is SessionState.FAILED and failed.done
        assert "boom from Lua" in (failed.error or "") and failed.result is None
        session = await conn.run(THREE)
        # a query answered behind the session's back: the worker must refuse it again
        await conn.continue_(session.id or "", "direct", query_id=session.pending[0].id)
        with pytest.raises(WorkerError, match="already"):
            await session.answer("again")
        assert session.last.outcome is Outcome.WORKER_ERROR
        assert session.state is SessionState.PAUSED  # a refused answer changes nothing

    _drive(body)


def test_answer_all_answers_one_pause_concurrently(run: Callable[[Any], Any]) -> None:
    async def body(conn: Connection) -> None:
        started: list[str] = []
        all_started = asyncio.Event()

        async def respond(query: proto.Query) -> str:
            started.append(query.prompt)
            if len(started) == 3:
                all_started.set()
            await all_started.wait()  # would never return if answered one by one
            return query.prompt.upper()

        session = await conn.run(THREE, respond=respond)
        assert session.state is SessionState.COMPLETED and session.result == "A?,B?,C?"

    _drive(body, run)  # on asyncio and on uvloop


def test_sync_responders_run_in_threads_bounded_by_max_concurrency(
        run: Callable[[Any], Any]) -> None:
    async def body(conn: Connection) -> None:
        barrier = threading.Barrier(2, timeout=20)
        lock = threading.Lock()
        running = peak = 0

        def respond(query: proto.Query) -> str:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            if query.prompt != "c?":
                barrier.wait()  # a and b must be in flight together
            with lock:
                running -= 1
            return query.prompt[0]

        session = await conn.run(THREE)
        await session.answer_all(respond, max_concurrency=2)
        assert session.result == "a,b,c" and peak == 2
        with pytest.raises(InvalidArgument):
            await session.answer_all(respond, max_concurrency=0)

    _drive(body, run)  # on asyncio and on uvloop


def test_responder_failure_leaves_the_session_paused_and_answerable() -> None:
    async def body(conn: Connection) -> None:
        session = await conn.run(TWO_ROUNDS)

        def broken(query: proto.Query) -> str:
            raise ConnectionResetError("the LLM went away")

        with pytest.raises(ResponderError) as info:
            await session.answer_all(broken)
        assert isinstance(info.value.__cause__, ConnectionResetError)
        assert info.value.query_id == session.pending[0].id
        assert "still paused" in str(info.value)
        assert session.state is SessionState.PAUSED and len(session.steps) == 1

        async def wrong_type(query: proto.Query) -> Any:
            return 7

        with pytest.raises(ResponderError, match="returned int"):
            await session.answer_all(wrong_type)
        await session.answer_all(lambda q: "ok")
        assert session.result == "ok+ok"
        assert await session.answer_all(lambda q: "unused") is session  # ended: no-op

    _drive(body)


def test_answer_all_in_one_pause_keeps_answers_already_sent() -> None:
    async def body(conn: Connection) -> None:
        session = await conn.run(THREE)

        async def one_fails(query: proto.Query) -> str:
            if query.prompt == "b?":
                await asyncio.sleep(0.05)  # a and c are answered first
                raise RuntimeError("no answer for b")
            return query.prompt

        with pytest.raises(ResponderError, match="no answer for b"):
            await session.answer_all(one_fails)
        assert [q.prompt for q in session.pending] == ["b?"]
        await session.answer_all(lambda q: "B")
        assert session.result == "a?,B,c?"

    _drive(body)


class Recorder:
    """A pause-aware responder (like pool_notebook.llm's): records what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, tuple[str, ...]]] = []

    async def answer(self, query: proto.Query, *, session: Session, pause: int,
                     queries: tuple[proto.Query, ...]) -> Answer:
        self.calls.append((query.prompt, pause, tuple(q.id for q in queries)))
        return Answer(query.prompt.rstrip("?"), usage={"prompt_tokens": 2}, replayed=True)


def test_ask_tells_a_pause_aware_responder_its_pause() -> None:
    async def body(conn: Connection) -> None:
        recorder = Recorder()
        session = await conn.run(TWO_ROUNDS)
        first_id = session.pending[0].id
        reply = await session.ask(recorder)
        assert reply.ok and session.answers[1] == Answer("first", {"prompt_tokens": 2}, True)
        await session.ask(recorder, session.pending[0].id)
        assert session.result == "first+second first"
        assert recorder.calls == [("first?", 0, (first_id,)),
                                  ("second first?", 1, (session.steps[1].feed.queries[0].id,))]
        assert [session.answers[i].replayed for i in sorted(session.answers)] == [True, True]
        await (await conn.run(TWO_ROUNDS)).answer_all(lambda q: "typed")  # plain strings
        rows = conn.history.frame()
        continues = rows[rows["op"] == "continue"]["replayed"].tolist()
        assert continues == [True, True, False, False]  # a responder's answers: marked
        with pytest.raises(SessionNotPaused):
            await session.ask(recorder)
        batch = await conn.run(THREE, respond=Recorder())
        assert batch.result == "a,b,c"
        calls = batch.answers  # one answer per query, each told the whole pause
        assert len(calls) == 3 and all(a.replayed for a in calls.values())

    _drive(body)


def test_a_pause_responder_may_be_any_object_with_an_answer_method() -> None:
    """The PauseResponder protocol is structural: an ``answer`` set on an instance
    (a wrapper, a SimpleNamespace) is one too, as ``isinstance`` says."""
    async def body(conn: Connection) -> None:
        recorder = Recorder()
        wrapper = types.SimpleNamespace(answer=recorder.answer)
        assert isinstance(wrapper, PauseResponder) and resolve_responder(wrapper) is wrapper
        session = await conn.run(TWO_ROUNDS, respond=wrapper)
        assert session.result == "first+second first"
        assert [(prompt, pause) for prompt, pause, _ids in recorder.calls] == [
            ("first?", 0), ("second first?", 1)]

    _drive(body)


def test_a_long_session_keeps_its_summaries_right_to_the_end() -> None:
    """pauses, pending, id and the pause index a responder is told stay right over
    300 pauses (they are kept as replies arrive, not rescanned: no quadratic cost)."""
    async def body(conn: Connection) -> None:
        session = await conn.run('local n = 0\n'
                                 'for i = 1, 300 do n = n + #alc.llm("q" .. i) end\n'
                                 'return n')
        first_id = session.id
        recorder = Recorder()
        for i in range(1, 301):
            assert session.pauses == i and [q.prompt for q in session.pending] == [f"q{i}"]
            await session.ask(recorder)
        assert session.state is SessionState.COMPLETED and session.pending == []
        assert session.result == sum(len(f"q{i}") for i in range(1, 301))
        assert session.id == first_id and session.pauses == 300 and len(session.steps) == 301
        assert [pause for _prompt, pause, _ids in recorder.calls] == list(range(300))

    _drive(body)


def test_a_model_spec_string_answers_through_the_llm_layer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeChatServer(delay=0.3, answer=lambda body, n: body["messages"][-1]["content"]
                        .upper()) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")

        async def body(conn: Connection) -> None:
            session = await conn.run(THREE, respond="openai:session-test-model")
            assert session.result == "A?,B?,C?" and server.calls == 3
            assert server.max_in_flight >= 2  # one pause's queries went out together
            rows = conn.history.frame()
            sent = rows[rows["op"] == "continue"]
            assert len(sent) == 3 and sent["prompt_tokens"].notna().all()  # usage went along

        _drive(body)


def test_resolve_responder() -> None:
    def fn(query: proto.Query) -> str:
        return "x"

    assert resolve_responder(fn) is fn and resolve_responder(None) is None
    with pytest.raises(InvalidArgument, match="unknown responder 'gpt-4'"):
        resolve_responder("gpt-4")
    with pytest.raises(ValueError):  # InvalidArgument is a ValueError too
        resolve_responder(3)  # type: ignore[arg-type]
