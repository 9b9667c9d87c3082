"""Fixtures: a private POOL_NOTEBOOK_HOME per test, and worker cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pool_notebook import spawn
from pool_notebook.registry import Registry


@pytest.fixture
def pool_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated package home; every worker registered in it is stopped afterwards."""
    home = Path(tempfile.mkdtemp(prefix="pn-", dir="/tmp"))  # short: sun_path is 108 bytes
    monkeypatch.setenv("POOL_NOTEBOOK_HOME", str(home))
    monkeypatch.setenv("ALC_HOME", str(tmp_path / "alc"))
    monkeypatch.setenv("POOL_NOTEBOOK_HISTORY", str(tmp_path / "history.sqlite"))
    monkeypatch.setenv("POOL_NOTEBOOK_WIDGETS", "0")
    yield home
    try:
        entries = Registry.default().entries()
    except Exception:
        entries = []
    for entry in entries:
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry.pid, signal.SIGKILL)
    for child in spawn._children:  # a worker whose entry is gone must not outlive its test
        if child.poll() is None:
            child.kill()
            child.wait()
    shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------- event loops: asyncio and uvloop


def _run_on(new_loop: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> Any:
    """``asyncio.run`` on a loop made by ``new_loop`` (3.10 has no ``asyncio.Runner``)."""
    loop = new_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        leftover = asyncio.all_tasks(loop)
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    """Run a coroutine on a fresh loop of each kind: the test runs once per loop."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return lambda coro: _run_on(uvloop.new_event_loop, coro)
    return lambda coro: _run_on(asyncio.new_event_loop, coro)
