"""The Lua session (worker/runtime.py): every way a session ends, never a wedged worker.

In process: each trigger that used to wedge the worker, interrupts from another
thread, the memory cap at every copy point, algocline's metrics and transcript,
the session log, warm VMs that share nothing. Over the wire: the same triggers
and caps against a real worker subprocess, each followed by a request that works.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pool_notebook import PoolClient
from pool_notebook.errors import ContinueRejected, InvalidArgument
from pool_notebook.protocol import Completed, Failed, Finished, Paused
from pool_notebook.spawn import DEFAULT_COMMAND, spawn_and_connect
from pool_notebook.worker.runtime import (
    HISTORY_ENTRIES,
    LOG_ENTRIES,
    TEXT_LIMIT,
    LuaSession,
    SessionFactory,
    Step,
    estimate_tokens,
)

MiB = 2**20
CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"


pytestmark = pytest.mark.usefixtures("pool_home")  # stores (alc.state, cards): a temp home


def run(code: str, *answers: str, **kw: Any) -> tuple[LuaSession, Step]:
    """A session of ``code`` answered with ``answers`` in order (q-0 of each pause)."""
    session = LuaSession("s-test", code, **kw)
    step = session.start()
    for answer in answers:
        assert step.kind == "paused", step
        step = session.answer(step.queries[0]["id"], answer)
    return session, step


def failed(code: str, *answers: str, **kw: Any) -> str:
    session, step = run(code, *answers, **kw)
    assert step.kind == "error" and session.state == "failed", step
    assert step.error
    return step.error


# ------------------------------------------------------------------ outcomes


def test_results_convert_as_json_with_null_and_empty_tables() -> None:
    _, step = run("return {n = alc.null, obj = {}, arr = alc.json_decode('[]'),"
                  " list = {1, 'two', {x = 1.5}}, t = true}")
    assert step.kind == "done"
    assert step.result == {"n": None, "obj": {}, "arr": [], "list": [1, "two", {"x": 1.5}],
                           "t": True}


def test_ctx_reaches_lua_with_json_null_as_alc_null() -> None:
    _, step = run("return {ctx.a == alc.null, ctx.list[2] == alc.null, #ctx.list, ctx.s}",
                  ctx={"a": None, "list": [1, None, 3], "s": "é"})
    assert step.result == [True, True, 3, "é"]


@pytest.mark.parametrize(("code", "needle"), [
    ("return ('h\\xc3\\xa9llo'):sub(1, 2)", "not valid UTF-8"),
    ("return {k = '\\xff'}", "not valid UTF-8"),
    ("return print", "a Lua function is not representable"),
    ("local t = {} t.t = t return t", "nesting deeper than"),
    ("return 0/0", "not representable in JSON"),
    ("coroutine.yield(1)", "only alc.llm may pause a session"),
    ("coroutine.yield()", "only alc.llm may pause a session"),
    ("return alc.llm('x\\xff')", "prompt is not valid UTF-8"),
    ("return alc.llm('x', {system = 'ok\\xc3'})", "system is not valid UTF-8"),
    ("return alc.llm_batch({})", "empty"),
    ("error(setmetatable({}, {__tostring = function() error('no text') end}))", "no text"),
    ("return (", "syntax error"),
])
def test_each_trigger_ends_failed_and_the_next_session_works(code: str, needle: str) -> None:
    assert needle in failed(code)
    _, step = run("return alc.llm('next') .. '!'", "ok")
    assert step.kind == "done" and step.result == "ok!"


def test_text_python_cannot_encode_fails_the_session_not_the_caller() -> None:
    assert "could not set up this session" in failed("return ctx", ctx={"a": "\ud800"})
    session, step = run("return alc.llm('q')")
    step = session.answer("q-0", "\udfff")
    assert step.kind == "error" and "UnicodeEncodeError" in (step.error or "")
    _, step = run("return 2")
    assert step.result == 2


def test_invalid_utf8_in_an_error_message_is_replaced() -> None:
    error = failed("error('bad \\xff byte', 0)")
    assert error.startswith("bad \ufffd byte")


@pytest.mark.parametrize("opts", ["{system = print}", "{max_tokens = 0/0}", "{system = {}}"])
def test_odd_llm_options_pause_with_clean_values_or_fail(opts: str) -> None:
    session, step = run(f"return alc.llm('x', {opts})")
    if step.kind == "paused":
        (query,) = step.queries
        assert query["system"] is None or isinstance(query["system"], str)
        assert isinstance(query["max_tokens"], int)
        assert session.answer("q-0", "a").result == "a"
    else:
        assert step.kind == "error" and step.error


def test_user_coroutines_yield_to_their_own_resumer() -> None:
    _, step = run("""
        local gen = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i) end end)
        local co = coroutine.create(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
        local _, x = coroutine.resume(co, 1)
        local _, y = coroutine.resume(co, 5)
        return {gen(), gen(), gen(), x, y, alc.llm('q')}""", "answer")
    assert step.result == [1, 2, 3, 2, 10, "answer"]


def test_llm_inside_a_user_coroutine_pauses_the_session() -> None:
    _, step = run("""
        local gen = coroutine.wrap(function()
          coroutine.yield(alc.llm('first'))
          local inner = coroutine.create(function() return alc.llm('second') end)
          local ok, v = coroutine.resume(inner)
          coroutine.yield(ok and v)
        end)
        return {gen(), gen()}""", "A", "B")
    assert step.kind == "done" and step.result == ["A", "B"]


# ------------------------------------------------------------------ continue


def test_continue_errors_are_algoclines_and_leave_the_session_paused() -> None:
    session, step = run("return alc.llm_batch({{prompt = 'a'}, {prompt = 'b'}})")
    assert [q["id"] for q in step.queries] == ["q-0", "q-1"]
    with pytest.raises(ContinueRejected, match=r"^unknown query_id: q-7$"):
        session.answer("q-7", "x")
    assert session.answer("q-0", "A").kind == "accepted"
    with pytest.raises(ContinueRejected, match=r"^already responded to query_id: q-0$"):
        session.answer("q-0", "again")
    for bad in ({"prompt_tokens": -1}, {"completion_tokens": 2**53 + 1},
                {"prompt_tokens": True}, {"completion_tokens": 1.5}):
        with pytest.raises(ContinueRejected, match=r"must be an integer in 0\.\.2\^53"):
            session.answer("q-1", "B", bad)
    with pytest.raises(ContinueRejected, match="response must be a string"):
        session.answer("q-1", 42)  # type: ignore[arg-type]
    assert session.state == "paused"
    done = session.answer("q-1", "B", {"prompt_tokens": 2**53, "completion_tokens": 0})
    assert done.result == ["A", "B"]
    with pytest.raises(ContinueRejected, match="no paused session"):
        session.answer("q-0", "late")


def test_max_memory_must_be_positive() -> None:
    for bad in (0, -1, True):
        with pytest.raises(InvalidArgument, match="max_memory"):
            LuaSession(max_memory=bad)


def test_a_factory_refuses_bad_environment_names_when_it_is_made() -> None:
    with pytest.raises(InvalidArgument, match="--allow-env"):
        SessionFactory(allow_env={"BAD=NAME"})


# ------------------------------------------------------------------ interrupt


def _interrupt_while_running(session: LuaSession, reason: str) -> Step:
    """Start ``session`` here; another thread interrupts it once it logged 'looping'."""
    def stop() -> None:
        deadline = time.monotonic() + 30  # a broken print must not hang the suite
        while not any(e["message"] == "looping" for e in session.logs()) and \
                time.monotonic() < deadline:
            time.sleep(0.001)
        session.interrupt(reason)

    killer = threading.Thread(target=stop)
    killer.start()
    step = session.start()
    killer.join()
    return step


@pytest.mark.parametrize("loop", [
    "while true do end",
    "while true do pcall(function() while true do end end) end",
    "local co = coroutine.wrap(function() while true do end end) co()",
    "while true do pcall(coroutine.wrap(function() while true do pcall(error) end end)) end",
    "local s = 0 for i = 1, math.maxinteger do s = s + i % 7 end",
    "pcall(debug.sethook) while true do end",  # the sandbox keeps the hook in place
])
def test_interrupt_stops_running_lua_from_another_thread(loop: str) -> None:
    session = LuaSession("s-loop", f"print('looping') {loop}")
    step = _interrupt_while_running(session, "shutdown requested")
    assert step.kind == "error" and step.error == "interrupted: shutdown requested"
    assert session.state == "failed"


def test_interrupt_of_a_paused_session_fails_its_next_continue() -> None:
    session, step = run("return alc.llm('q')")
    session.interrupt("client disconnected")
    step = session.answer("q-0", "late")
    assert (step.kind, step.error) == ("error", "interrupted: client disconnected")


def test_fail_ends_a_paused_session_from_outside() -> None:
    session, _ = run("return alc.llm('q')")
    step = session.fail("result too large")
    assert (step.kind, step.error, session.state) == ("error", "result too large", "failed")
    with pytest.raises(ContinueRejected, match="no paused session"):
        session.answer("q-0", "late")


def test_interrupt_before_start() -> None:
    session = LuaSession("s-x", "return 1")
    session.interrupt("worker stopping")
    assert session.start().error == "interrupted: worker stopping"


# ------------------------------------------------------------------ memory


def test_lua_heap_at_the_cap_is_a_failed_session_not_an_abort() -> None:
    error = failed("local t = {} for i = 1, 1e9 do t[i] = ('x'):rep(100) .. i end",
                   max_memory=8 * MiB)
    assert "not enough memory" in error and "memory cap of 8 MiB" in error


def test_ctx_bigger_than_the_cap_is_refused_before_copying() -> None:
    error = failed("return #ctx.x", ctx={"x": "x" * (10 * MiB)}, max_memory=8 * MiB)
    assert error.startswith("ctx: ") and "memory cap of 8 MiB" in error


def test_code_bigger_than_the_cap_is_refused_before_copying() -> None:
    error = failed("return #'" + "x" * (10 * MiB) + "'", max_memory=8 * MiB)
    assert error.startswith("the code: ") and "memory cap of 8 MiB" in error


def test_answer_that_does_not_fit_is_a_lua_error_at_the_llm_call() -> None:
    code = """local keep = {} for i = 1, 22 do keep[i] = ('x'):rep(2^20 - 64) .. i end
              local ok, err = pcall(alc.llm, 'q')
              keep = nil collectgarbage()
              return {ok, err, alc.llm('small')}"""
    _, step = run(code, "y" * (8 * MiB), "fits", max_memory=32 * MiB)
    assert step.kind == "done"
    ok, err, small = step.result
    assert ok is False and "the answers" in err and "memory cap of 32 MiB" in err
    assert small == "fits"


def test_json_decode_and_state_are_sized_against_the_cap() -> None:
    big = '"' + "x" * (6 * MiB) + '"'
    _, step = run("local keep = {} for i = 1, 5 do keep[i] = ('x'):rep(2^20 - 64) .. i end"
                  " local ok, e = pcall(alc.json_decode, ctx.s) return {ok, e}",
                  ctx={"s": big}, max_memory=16 * MiB)
    ok, err = step.result
    assert ok is False and "alc.json_decode" in err and "memory cap of 16 MiB" in err
    error = failed("for i = 1, 600 do alc.state.set('k' .. i, ('x'):rep(2^20)) end",
                   max_memory=32 * MiB)
    assert "memory cap of 32 MiB" in error


def test_state_get_is_sized_before_copying() -> None:
    _, step = run("alc.state.set('big', ('x'):rep(6 * 2^20)) return 1", max_memory=64 * MiB)
    assert step.result == 1
    _, step = run("local ok, e = pcall(alc.state.get, 'big') return {ok, e}", max_memory=4 * MiB)
    ok, err = step.result
    assert ok is False and "alc.state.get" in err and "memory cap of 4 MiB" in err
    _, step = run("return #alc.state.get('big')", max_memory=64 * MiB)
    assert step.result == 6 * MiB


def test_transcript_is_bounded_and_charged_within_the_cap() -> None:
    prompt = "p" * (2 * MiB)
    code = "local n = 0 for i = 1, 15 do n = n + #alc.llm(ctx.p) end return n"
    session = LuaSession("s-t", code, ctx={"p": prompt}, max_memory=24 * MiB)
    step = session.start()
    for _ in range(15):
        step = session.answer("q-0", "r" * MiB)
    assert step.kind == "done" and step.result == 15 * MiB
    history = session.history()
    assert len(history) == HISTORY_ENTRIES
    assert all(len(e["prompt"]) < TEXT_LIMIT + 100 for e in history)
    assert all(e["prompt"].endswith("characters not kept]") for e in history)


# ------------------------------------------------------------------ metrics


def test_metrics_are_algoclines_with_estimates_replaced_by_usage() -> None:
    session, step = run("""
        local a = alc.llm('What is 2+2?', {system = 'Expert'})
        local b = alc.llm_batch({{prompt = 'hello'}, {prompt = 'あいう'}})
        alc.stats.record('score', 7)
        return a""")
    assert step.queries[0]["system"] == "Expert"
    step = session.answer("q-0", "4")
    assert [q["prompt"] for q in step.queries] == ["hello", "あいう"]
    assert session.answer("q-0", "reply here", {"completion_tokens": 40}).kind == "accepted"
    step = session.answer("q-1", "x", {"prompt_tokens": 9, "completion_tokens": 1})
    assert step.kind == "done"
    metrics = session.metrics()
    auto = metrics["auto"]
    assert {k: auto[k] for k in ("llm_calls", "pauses", "rounds")} == \
        {"llm_calls": 3, "pauses": 2, "rounds": 2}
    # prompt chars are UTF-8 bytes (Rust len()): 12 + 6 + 5 + 9
    assert auto["total_prompt_chars"] == 32 and auto["total_response_chars"] == 1 + 10 + 1
    # prompt: 3 + 2 (estimated) + 2 (estimated 'hello') + 9 (provided) = 16, weakest: estimated
    assert auto["prompt_tokens"] == {"tokens": 16, "source": "estimated"}
    # response: 1 (estimated '4') + 40 + 1 (provided)
    assert auto["response_tokens"] == {"tokens": 42, "source": "estimated"}
    assert auto["total_tokens"] == {"tokens": 58, "source": "estimated"}
    assert isinstance(auto["elapsed_ms"], int)
    assert metrics["custom"] == {"score": 7}


def test_token_sources_provided_and_definite() -> None:
    session, _ = run("return alc.llm('abcd')")
    session.answer("q-0", "x", {"prompt_tokens": 3, "completion_tokens": 2})
    auto = session.metrics()["auto"]
    assert auto["prompt_tokens"] == {"tokens": 3, "source": "provided"}
    assert auto["total_tokens"] == {"tokens": 5, "source": "provided"}
    fresh = LuaSession("s-0", "return 1")
    fresh.start()
    assert fresh.metrics()["auto"]["prompt_tokens"] == {"tokens": 0, "source": "definite"}


def test_estimate_tokens_matches_algocline() -> None:
    assert [estimate_tokens(t) for t in ("", "hello world", "あいう", "hello あ")] == [0, 3, 2, 3]


def test_history_keeps_the_last_ten_with_the_pending_query() -> None:
    session = LuaSession("s-h", "for i = 1, 12 do alc.llm('q' .. i) end")
    step = session.start()
    for i in range(11):
        step = session.answer("q-0", f"a{i + 1}")
    assert step.kind == "paused"
    history = session.history()
    assert [e["prompt"] for e in history] == [f"q{i}" for i in range(3, 13)]
    assert history[-1]["response"] is None and history[-1]["completed_at"] is None
    assert history[-2]["response"] == "a11"
    assert history[-2]["completed_at"] >= history[-2]["started_at"] > 1_600_000_000_000
    assert set(history[0]) == {"query_id", "prompt", "response", "prompt_tokens",
                               "response_tokens", "started_at", "completed_at"}
    assert [e["prompt"] for e in session.history(2)] == ["q11", "q12"]


def test_session_log_and_progress() -> None:
    session, step = run("""
        print('a', 1) alc.log('warn', 'careful') io.write('w')
        alc.progress(2, 5, 'half')
        for i = 1, 30 do print('line ' .. i) end
        return 1""")
    assert step.kind == "done"
    logs = session.metrics()["recent_logs"]
    assert len(logs) == LOG_ENTRIES and logs[-1]["message"] == "line 30"
    assert {"ts", "level", "source", "message"} == set(logs[0])
    assert session.metrics()["progress"] == {"step": 2, "total": 5, "message": "half"}
    early, _ = run("print('a', 1) alc.log('warn', 'careful') return 1")
    assert [(e["level"], e["message"]) for e in early.logs()] == \
        [("info", "a\t1"), ("warn", "careful")]


# ------------------------------------------------------------------ warm VMs


def test_warm_sessions_share_nothing() -> None:
    factory = SessionFactory()
    factory.prewarm()
    first = factory.new("s-1", "leak = 1 package.loaded.leaky = {} string.leak = 1"
                        " return alc.llm('x')", ctx={"n": 1})
    assert first.start().kind == "paused"
    factory.prewarm()
    second = factory.new("s-2", "return {leak == nil, package.loaded.leaky == nil,"
                         " string.leak == nil, ctx.n}", ctx={"n": 2})
    assert second is not first
    assert second.start().result == [True, True, True, 2]
    assert first.answer("q-0", "still mine").result == "still mine"


def test_fork_children_share_the_cap_and_the_interrupt() -> None:
    parent = LuaSession("s-p", "return 1", max_memory=16 * MiB, lib_paths=["/nonexistent"])
    child = parent.child()
    assert child.state == "idle" and child.max_memory == parent.max_memory
    child.bind("s-p/fork-1", "local keep = {} for i = 1, 9 do keep[i] = ('x'):rep(2^20 - 64)"
               " .. i end return alc.llm('q')", lib_paths=parent.lib_paths)
    assert child.lib_paths == ("/nonexistent",)
    assert child.start().kind == "paused"  # the child now holds ~9 MiB of the family's 16
    big = parent.child()
    big.bind("s-p/fork-2", "local t = {} for i = 1, 9 do t[i] = ('x'):rep(2^20 - 64) .. i end")
    step = big.start()
    assert step.kind == "error" and "not enough memory" in (step.error or "")
    parent.interrupt("parent stopped")
    assert child.answer("q-0", "a").error == "interrupted: parent stopped"


def test_factory_builds_ahead_in_the_background_and_without() -> None:
    factory = SessionFactory(max_memory=16 * MiB)
    factory.prewarm(wait=False)  # returns at once; new() waits for that build
    sessions = [factory.new(f"s-{i}", f"return {i}") for i in range(3)]  # 2nd, 3rd built here
    assert len({id(s) for s in sessions}) == 3
    assert [s.start().result for s in sessions] == [0, 1, 2]
    assert all(s.max_memory == 16 * MiB for s in sessions)


@pytest.mark.skipif(not (CORPUS / "algocline-bundled-packages").is_dir(),
                    reason="the pinned corpus ../shared/corpus is absent")
def test_a_real_package_runs_on_a_warm_vm() -> None:
    factory = SessionFactory()
    factory.prewarm()
    session = factory.new("s-cot", 'return require("cot").run({task = "sky?", depth = 2})',
                          lib_paths=[str(CORPUS / "algocline-bundled-packages")])
    step = session.start()
    while step.kind == "paused":
        step = session.answer("q-0", "An insight.")
    assert step.kind == "done", step.error
    assert step.result["result"]["chain"] == ["An insight.", "An insight."]
    assert session.metrics()["auto"]["llm_calls"] == 3


# ------------------------------------------------------------------ over the wire


async def _feed_outcome(client: PoolClient, code: str, **kw: Any) -> Any:
    feed = await client.run(code, **kw)
    result = feed.feed_result
    assert isinstance(result, Finished), result
    return result.outcome


async def _next_works(client: PoolClient) -> None:
    feed = await client.run("return alc.llm('again?')")
    assert isinstance(feed.feed_result, Paused)
    done = await client.continue_(feed.session_id, "yes")
    assert isinstance(done.feed_result, Finished)
    assert done.feed_result.outcome == Completed("yes")


def test_wire_triggers_fail_and_the_worker_goes_on(pool_home: Path) -> None:
    async def main() -> None:
        client, _worker = await spawn_and_connect()
        async with client:
            for code, needle in [
                ("return ('h\\xc3\\xa9llo'):sub(1, 2)", "not valid UTF-8"),
                ("error('bad \\xff')", "bad \ufffd"),
                ("return alc.llm('x\\xff')", "not valid UTF-8"),
                ("coroutine.yield(1)", "only alc.llm may pause"),
                ("coroutine.yield()", "only alc.llm may pause"),
            ]:
                outcome = await _feed_outcome(client, code)
                assert isinstance(outcome, Failed) and needle in outcome.error, (code, outcome)
                await _next_works(client)
            for opts in ("{system = print}", "{max_tokens = 0/0}"):
                feed = await client.run(f"return alc.llm('x', {opts})")
                if isinstance(feed.feed_result, Paused):
                    await client.continue_(feed.session_id, "a")
                await _next_works(client)
            await client.shutdown()
    asyncio.run(main())


def test_wire_memory_cap_at_every_copy_point(pool_home: Path) -> None:
    command = DEFAULT_COMMAND + " --max-memory-mb 8"

    async def main() -> None:
        client, _worker = await spawn_and_connect(command)
        async with client:
            outcome = await _feed_outcome(client, "return #ctx.x", ctx={"x": "x" * (10 * MiB)})
            assert isinstance(outcome, Failed) and outcome.error.startswith("ctx: ")
            await _next_works(client)
            outcome = await _feed_outcome(client, "return #'" + "x" * (10 * MiB) + "'")
            assert isinstance(outcome, Failed) and outcome.error.startswith("the code: ")
            await _next_works(client)
            feed = await client.run("local k = {} for i = 1, 4 do k[i] = ('x'):rep(2^20 - 64)"
                                    " .. i end local a = alc.llm('q') return #a")
            assert isinstance(feed.feed_result, Paused)
            done = await client.continue_(feed.session_id, "y" * (6 * MiB))
            assert isinstance(done.feed_result, Finished)
            outcome = done.feed_result.outcome
            assert isinstance(outcome, Failed) and "the answers" in outcome.error
            await _next_works(client)
            outcome = await _feed_outcome(
                client, "for i = 1, 600 do alc.state.set('k' .. i, ('x'):rep(2^20)) end")
            assert isinstance(outcome, Failed) and "memory cap of 8 MiB" in outcome.error
            await _next_works(client)
            outcome = await _feed_outcome(
                client, "local t = {} for i = 1, 1e9 do t[i] = ('x'):rep(100) .. i end")
            assert isinstance(outcome, Failed) and "not enough memory" in outcome.error
            await _next_works(client)
            feed = await client.run("local n = 0 for i = 1, 12 do n = n + #alc.llm(ctx.p) end"
                                    " return n", ctx={"p": "p" * MiB})
            for _ in range(12):
                assert isinstance(feed.feed_result, Paused)
                feed = await client.continue_(feed.session_id, "r" * MiB)
            assert isinstance(feed.feed_result, Finished)
            assert feed.feed_result.outcome == Completed(12 * MiB)
            await _next_works(client)
            await client.shutdown()
    asyncio.run(main())
