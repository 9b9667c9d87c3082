"""Running pool coroutines from synchronous code (magics) on the right event loop.

Inside a Jupyter kernel an asyncio loop already runs in the kernel thread, so a
blocking magic re-enters it with ``nest-asyncio2`` (never the archived
``nest_asyncio``, which hangs ipykernel 7 on "Run All"). Everything — client,
tasks, widget updates — stays on that one loop and thread. Outside a kernel
(terminal IPython, scripts, tests) one persistent private loop is used, so
connections survive between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import warnings
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

__all__ = ["LoopRunner", "runner"]

T = TypeVar("T")

_OLD_NEST_ASYNCIO = (
    "the archived 'nest_asyncio' package has already patched asyncio in this process; "
    "it is known to hang ipykernel 7 on 'Run All'. Remove the nest_asyncio.apply() call "
    "(pool_notebook uses the maintained 'nest-asyncio2') and restart the kernel."
)


class LoopRunner:
    """Owns the choice of loop, and runs coroutines to completion on it."""

    def __init__(self) -> None:
        self._private: asyncio.AbstractEventLoop | None = None
        self._patched: set[int] = set()
        self._thread = threading.get_ident()

    def loop(self) -> asyncio.AbstractEventLoop:
        """The kernel's running loop, else the persistent private one."""
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            pass
        if self._private is None or self._private.is_closed():
            self._private = asyncio.new_event_loop()
        return self._private

    def _make_reentrant(self, loop: asyncio.AbstractEventLoop) -> None:
        if id(loop) in self._patched:
            return
        if getattr(asyncio, "_nest_patched", False) and not hasattr(asyncio, "_nest_asyncio2"):
            warnings.warn(_OLD_NEST_ASYNCIO, RuntimeWarning, stacklevel=3)
        import nest_asyncio2

        nest_asyncio2.apply(loop)
        self._patched.add(id(loop))

    def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` (or a task) to completion, blocking; Ctrl-C / interrupt cancels it.

        On interrupt the task is cancelled and given the chance to unwind (so the
        client records what it owes), then ``KeyboardInterrupt`` propagates.
        """
        if threading.get_ident() != self._thread and sys.modules.get("ipykernel"):
            if isinstance(coro, Coroutine):
                coro.close()
            raise RuntimeError("pool_notebook magics must run on the kernel thread")
        loop = self.loop()
        if loop.is_running():
            self._make_reentrant(loop)
        task = asyncio.ensure_future(coro, loop=loop)
        try:
            return loop.run_until_complete(task)
        except KeyboardInterrupt:
            task.cancel()
            with contextlib.suppress(KeyboardInterrupt):  # a second interrupt: stop waiting
                loop.run_until_complete(asyncio.wait([task]))
            raise

    def schedule(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start ``coro`` as a task on the loop and return at once."""
        return self.loop().create_task(coro)


#: The process-wide runner used by the magics and the plain-Python API.
runner = LoopRunner()
