"""A bundled worker shared by a test module (spawned as by default, driven over its socket).

Used by ``test_alc.py`` and ``test_corpus.py``: one worker per module, kept
while its sessions end normally and replaced after a failure, with its own
``POOL_NOTEBOOK_HOME`` (where ``alc.state`` and ``alc.card`` write).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pool_notebook import Completed, Failed, Paused, PoolClient, spawn
from pool_notebook.protocol import Query
from pool_notebook.spawn import spawn_and_connect

Responder = Callable[[Query], str]


class LuaFailed(AssertionError):
    """The session ended ``Failed``; ``error`` is the worker's text."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass
class SharedWorker:
    loop: asyncio.AbstractEventLoop
    home: Path
    client: PoolClient | None = None
    queries: list[Query] = field(default_factory=list)
    metrics: Mapping[str, Any] = field(default_factory=dict)

    async def connect(self) -> PoolClient:
        if self.client is None:
            self.client, _ = await spawn_and_connect()
        return self.client

    def reset(self) -> None:
        """Drop a worker left in an unknown state (killed at module teardown)."""
        if self.client is not None:
            self.client.close()
        self.client = None

    async def session(self, code: str, respond: Responder, *, ctx: Any = None,
                      lib_paths: Sequence[str] = (), max_queries: int = 2000,
                      usage: Mapping[str, int] | None = None) -> Any:
        client = await self.connect()
        feed = await client.run(code, ctx=ctx, lib_paths=lib_paths)
        while isinstance(feed.feed_result, Paused):
            for query in feed.feed_result.queries:
                self.queries.append(query)
                assert len(self.queries) <= max_queries, f"more than {max_queries} queries"
                feed = await client.continue_(feed.session_id, respond(query),
                                              query_id=query.id, usage=usage)
        outcome = feed.feed_result.outcome
        self.metrics = feed.feed_result.metrics
        if isinstance(outcome, Failed):
            raise LuaFailed(outcome.error)
        assert isinstance(outcome, Completed), outcome
        return outcome.result

    def run(self, code: str, respond: Responder | Sequence[str] = (), *,
            timeout: float = 120.0, **options: Any) -> Any:
        """Run ``code`` to its end; answers come from ``respond`` (a callable, or a list
        consumed in order). Raises :class:`LuaFailed` when the session fails."""
        if not callable(respond):
            answers = list(respond)

            def respond(query: Query) -> str:
                assert answers, f"unexpected query: {query.prompt!r}"
                return answers.pop(0)
        self.queries = []
        try:
            return self.loop.run_until_complete(
                asyncio.wait_for(self.session(code, respond, **options), timeout))
        except LuaFailed:
            raise
        except BaseException:
            self.reset()
            raise


def shared_worker() -> Iterator[SharedWorker]:
    """Body of a module-scoped fixture: a private home, one loop, the worker."""
    home = Path(tempfile.mkdtemp(prefix="pn-alc-", dir="/tmp"))  # short: sun_path limit
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POOL_NOTEBOOK_HOME", str(home))
        mp.setenv("ALC_HOME", str(home / "alc"))
        loop = asyncio.new_event_loop()
        worker = SharedWorker(loop, home)
        try:
            yield worker
        finally:
            worker.reset()
            for child in spawn._children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            loop.close()
            shutil.rmtree(home, ignore_errors=True)
