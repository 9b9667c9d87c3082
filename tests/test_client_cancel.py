"""Cancel safety: no reply is ever delivered to the wrong caller.

The redis-py asyncio bug (CVE-2023-28858/28859) handed one request's reply to
the next caller after a cancellation. These tests cancel and time out requests
at every point of an exchange (a seeded sweep of event-loop turns, with slow,
dribbled and oversized messages) and inject KeyboardInterrupt into each I/O
step, then account for every request the worker saw.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from pool_notebook import ConnectionBroken, PoolClient, RawRequest, RequestTimeout
from pool_notebook.client import LateReply
from tests.fakes import Dribble, FakeWorker, ok

Runner = Callable[[Any], Any]  # the conftest ``run`` fixture: asyncio, then uvloop


def _behaviour(req: dict[str, Any]) -> list[Any] | None:
    if req.get("op") != "echo":
        return None
    line = ok({"kind": "echo", "token": req["token"]})
    mode = req["token"] % 4
    if mode == 0:
        return [line]
    if mode == 1:
        return [0.001 * (req["token"] % 3), line]
    if mode == 2:
        return [Dribble(line)]
    return [line[:7], 0.0005, line[7:]]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomized_cancellations_and_timeouts_never_misdeliver(seed: int, run: Runner) -> None:
    rng = random.Random(seed)

    async def main() -> None:
        late: list[LateReply] = []
        answered: dict[int, int] = {}
        misdelivered = 0
        async with FakeWorker(_behaviour) as w, await PoolClient.connect(
            w.sock_path, on_late_reply=late.append, spin_seconds=rng.choice([0.0, 50e-6])
        ) as c:
            for token in range(700):
                big = rng.random() < 0.03
                req = RawRequest({"op": "echo", "token": token,
                                  "pad": "x" * (400_000 if big else rng.randrange(50))})
                timeout = rng.choice([None, None, 0.0005, 0.002, 0.01])
                task = asyncio.create_task(c.send_request(req, timeout=timeout))
                if rng.random() < 0.6:
                    for _ in range(rng.randrange(40)):
                        await asyncio.sleep(0)
                    task.cancel()
                try:
                    response = await task
                except (asyncio.CancelledError, RequestTimeout):
                    continue
                got = response.raw["data"]["token"]
                answered[token] = got
                misdelivered += got != token
            await c.settle(timeout=10)
            assert c.broken is None
            seen = [r["token"] for r in w.requests if r.get("op") == "echo"]
        late_tokens = [lr.response.raw["data"]["token"] for lr in late if lr.response]
        assert misdelivered == 0
        assert all(lr.op == "echo" and lr.error is None for lr in late)
        assert all(lr.request.obj["token"] == t for lr, t in zip(late, late_tokens, strict=False))
        # every request the worker saw was answered to its caller or reported late, once
        assert sorted([*answered, *late_tokens]) == sorted(seen)
        assert len(answered) > 50 and len(late_tokens) > 50
    run(main())


def test_interleaved_concurrent_callers_with_cancellation(run: Runner) -> None:
    rng = random.Random(7)

    async def main() -> None:
        late: list[LateReply] = []
        async with FakeWorker(_behaviour) as w, await PoolClient.connect(
            w.sock_path, on_late_reply=late.append
        ) as c:
            tasks = {t: asyncio.create_task(c.send_request(RawRequest({"op": "echo", "token": t})))
                     for t in range(400)}
            for _ in range(300):
                await asyncio.sleep(0)
                victim = tasks[rng.randrange(400)]
                victim.cancel()
            done = await asyncio.gather(*tasks.values(), return_exceptions=True)
            await c.settle(timeout=10)
            for token, result in zip(tasks, done, strict=False):
                if not isinstance(result, BaseException):
                    assert result.raw["data"]["token"] == token
            answered = [t for t, r in zip(tasks, done, strict=True)
                        if not isinstance(r, BaseException)]
            late_tokens = [lr.response.raw["data"]["token"] for lr in late]
            seen = [r["token"] for r in w.requests if r.get("op") == "echo"]
            assert sorted(answered + late_tokens) == sorted(seen)
    run(main())


class _Interrupting:
    """A socket proxy that raises KeyboardInterrupt on its n-th recv/send call."""

    def __init__(self, sock: Any, at: int) -> None:
        self._sock = sock
        self.calls = 0
        self.at = at

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt

    def recv(self, n: int) -> bytes:
        self._tick()
        return self._sock.recv(n)

    def send(self, data: bytes) -> int:
        self._tick()
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize("point", range(1, 16))
def test_keyboard_interrupt_at_each_io_step_never_misdelivers(point: int, run: Runner) -> None:
    async def main() -> None:
        async with FakeWorker(_behaviour) as w:
            c = await PoolClient.connect(w.sock_path, spin_seconds=0)
            proxy = _Interrupting(c._sock, point)
            c._sock = proxy  # type: ignore[assignment]
            interrupted = False
            for token in range(1, 6):
                try:
                    r = await c.send_request(RawRequest({"op": "echo", "token": token}))
                except KeyboardInterrupt:
                    interrupted = True
                    continue
                except ConnectionBroken:
                    assert interrupted  # only after the interrupt
                    continue
                assert r.raw["data"]["token"] == token
            assert interrupted == (proxy.calls >= point)
            if interrupted:
                assert c.broken is not None and "KeyboardInterrupt" in c.broken.reason
            c.close()
    run(main())
