"""The loop runner: persistent loop in scripts, thread check, terminal IPython background."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import types
import warnings
from typing import Any

import pytest

from pool_notebook.connections import ConnectionManager
from pool_notebook.errors import LoopError
from pool_notebook.history import History
from pool_notebook.loop import LoopRunner


@pytest.mark.usefixtures("pool_home")
def test_connections_survive_between_blocking_calls() -> None:
    runner = LoopRunner()
    manager = ConnectionManager(History(None))
    conn = runner.run(manager.connect())
    assert runner.run(conn.send("status")).ok  # the same private loop, still open
    assert runner.run(conn.shutdown()).ok
    manager.close_all()


def test_blocking_call_from_another_thread_of_a_kernel_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    runner = LoopRunner()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    errors: list[BaseException] = []

    async def never() -> None:
        raise AssertionError("must not run")

    def call() -> None:
        try:
            runner.run(never())
        except BaseException as exc:
            errors.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refused coroutine is closed, not leaked
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], LoopError)
    assert isinstance(errors[0], RuntimeError) and "main thread" in str(errors[0])


def test_loop_patched_by_the_archived_nest_asyncio_is_reported() -> None:
    # nest_asyncio.apply() replaces the loop class's run_until_complete with its own
    # function; that function's __module__ is all a public check can see.
    fake = types.ModuleType("nest_asyncio")
    exec("def run_until_complete(self, future):\n"
         "    return type(self).__mro__[1].run_until_complete(self, future)\n", fake.__dict__)

    class Patched(asyncio.SelectorEventLoop):
        run_until_complete = fake.run_until_complete

    runner = LoopRunner()
    loop = Patched()

    async def inner() -> str:
        return "inner"

    async def outer() -> str:
        return runner.run(inner())  # re-entering the running loop patches it

    try:
        with pytest.warns(RuntimeWarning, match="archived 'nest_asyncio'"):
            assert loop.run_until_complete(outer()) == "inner"
    finally:
        loop.close()


def test_background_is_refused_where_nothing_runs_the_loop() -> None:
    runner = LoopRunner()

    async def work() -> None:
        raise AssertionError("must not run")

    with pytest.raises(LoopError, match="Await it instead"):
        runner.background(work())  # a script: no shell, no running loop
    shell = types.SimpleNamespace(active_eventloop="qt")
    with pytest.raises(LoopError, match="runs the qt event loop"):
        runner.background(work(), shell)


def test_background_task_in_a_kernel_like_running_loop() -> None:
    runner = LoopRunner()

    async def main() -> Any:
        task = runner.background(asyncio.sleep(0, "done"))
        return await task

    assert asyncio.run(main()) == "done"


@pytest.mark.usefixtures("pool_home")
def test_terminal_ipython_background_progresses_between_cells_and_awaits() -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "IPython", "--no-banner", "--colors=nocolor",
                                           "--no-confirm-exit"],
                          env={**os.environ, "TERM": "xterm"}, encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
    cells = iter([
        "%load_ext pool_notebook",
        "from pool_notebook.loop import runner",
        "conn = %pool_connect",  # made by a magic, awaited by the shell: the same loop
        "reply = await conn.send('status'); print('AWAITED', reply.outcome)",
        "task = runner.background(conn.send('status'), get_ipython())",
    ])
    try:
        for number, line in enumerate(cells, 1):
            child.expect(rf"In \[{number}\]:")
            child.sendline(line)
            if line.startswith("reply"):
                child.expect(r"AWAITED (\w+)")
                assert child.match.group(1) == "ok"
        child.expect(r"In \[6\]:")
        time.sleep(1.0)  # no cell runs now: only the shell's prompt can run the loop
        child.sendline("print('DONE', task.done(), get_ipython().active_eventloop)")
        child.expect(r"DONE (\w+) (\w+)")
        assert child.match.group(1) == "True" and child.match.group(2) == "asyncio"
        child.sendline("reply = await task; print('REPLY', reply.op, reply.outcome)")
        child.expect(r"REPLY (\w+) (\w+)")  # awaited on the loop it ran on
        assert child.match.group(1) == "status" and child.match.group(2) == "ok"
        child.expect(r"In \[8\]:")
        child.sendline("await conn.shutdown()")
        child.expect(r"In \[9\]:")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
