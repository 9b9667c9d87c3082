"""Running pool coroutines from synchronous code (magics) on the right event loop.

Inside a Jupyter kernel an asyncio loop already runs in the kernel thread, so a
blocking magic re-enters it with ``nest-asyncio2`` (never the archived
``nest_asyncio``, which hangs ipykernel 7 on "Run All"). In terminal IPython the
loop is the one IPython's autoawait runs cells on
(``IPython.core.async_helpers.get_asyncio_loop``), so ``await task`` in a later
cell works; background tasks progress between cells once the shell runs that
loop while waiting for input (``%gui asyncio``, which :meth:`LoopRunner.background`
turns on). Elsewhere (scripts, tests) one persistent private loop is used, so
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

from .errors import LoopError

__all__ = ["LoopRunner", "runner"]

T = TypeVar("T")

_OLD_NEST_ASYNCIO = (
    "the archived 'nest_asyncio' package has already patched asyncio in this process; "
    "it is known to hang ipykernel 7 on 'Run All'. Remove the nest_asyncio.apply() call "
    "(pool_notebook uses the maintained 'nest-asyncio2') and restart the kernel."
)


def _patched_by_old_nest_asyncio(loop: asyncio.AbstractEventLoop) -> bool:
    """True if the archived nest_asyncio replaced this loop's ``run_until_complete``."""
    method = getattr(type(loop), "run_until_complete", None)
    return getattr(method, "__module__", None) == "nest_asyncio"


def _ipython_loop() -> asyncio.AbstractEventLoop | None:
    """The loop IPython's autoawait runs cells on, if IPython is in use."""
    if "IPython.core.async_helpers" not in sys.modules:
        return None
    from IPython.core.async_helpers import get_asyncio_loop

    loop: asyncio.AbstractEventLoop = get_asyncio_loop()  # type: ignore[no-untyped-call]
    return loop


class LoopRunner:
    """Owns the choice of loop, and runs coroutines to completion on it."""

    def __init__(self) -> None:
        self._private: asyncio.AbstractEventLoop | None = None
        self._patched: set[int] = set()
        self._thread = threading.get_ident()

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (a kernel's), else IPython's, else the persistent private one."""
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            pass
        shell_loop = _ipython_loop()
        if shell_loop is not None:
            return shell_loop
        if self._private is None or self._private.is_closed():
            self._private = asyncio.new_event_loop()
        return self._private

    def _make_reentrant(self, loop: asyncio.AbstractEventLoop) -> None:
        if id(loop) in self._patched:
            return
        if _patched_by_old_nest_asyncio(loop):
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
            raise LoopError("pool_notebook's blocking calls (and magics) must run on the "
                            "kernel's main thread; from other threads use "
                            "asyncio.run_coroutine_threadsafe(coro, runner.loop())")
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

    def background(self, coro: Coroutine[Any, Any, T], shell: Any = None) -> asyncio.Task[T]:
        """Start ``coro`` as a task that keeps going between cells; ``await`` it later.

        In a kernel the loop always runs. In terminal IPython (``shell``) this
        turns on ``%gui asyncio`` so the shell runs the loop while it waits for
        input. Refused (``LoopError``) where nothing would run the task between cells.
        """
        gui = getattr(shell, "active_eventloop", None)
        if not self.progresses_between_cells(shell) and gui is None:
            with contextlib.suppress(NotImplementedError, AttributeError):
                shell.enable_gui("asyncio")  # only terminal IPython implements it
        if not self.progresses_between_cells(shell):
            coro.close()
            where = (f"the shell runs the {gui} event loop, not asyncio" if gui else
                     "nothing runs the event loop between cells here (a terminal shell "
                     "needs %gui asyncio, which --simple-prompt cannot do)")
            raise LoopError(f"cannot run work in the background: {where}. Await it "
                            "instead (reply = await conn.send(...))")
        return self.schedule(coro)

    def progresses_between_cells(self, shell: Any = None) -> bool:
        """Whether tasks on :meth:`loop` run while no cell is executing."""
        if self.loop().is_running():
            return True
        return getattr(shell, "active_eventloop", None) == "asyncio"


#: The process-wide runner used by the magics and the plain-Python API.
runner = LoopRunner()
