"""A Lua session on a worker: its steps, pending queries, answers and outcome.

``Connection.run`` returns a :class:`Session`. It knows which queries of the
latest pause are still unanswered, answers them (one at a time with
:meth:`Session.answer`, or all of them with a responder through
:meth:`Session.answer_all`), and tells observers (views) of every change. It
holds no display code: views render a Session and call its methods.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, cast, runtime_checkable

from . import protocol as proto
from ._enums import StrEnum
from .errors import (
    InvalidArgument,
    ResponderError,
    SessionError,
    SessionNotPaused,
    WorkerError,
)

if TYPE_CHECKING:
    from .connections import Connection, Reply

__all__ = ["Answer", "PauseResponder", "Responder", "Session", "SessionState",
           "resolve_responder"]

log = logging.getLogger(__name__)


class SessionState(StrEnum):
    """Where a session is: a request in flight, waiting for answers, or ended."""

    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"



_ENDED = frozenset({SessionState.COMPLETED, SessionState.FAILED, SessionState.CANCELLED})


@dataclass(frozen=True, slots=True)
class Answer:
    """A responder's answer: the text, the LLM's token usage, whether it was replayed."""

    text: str
    usage: Mapping[str, Any] | None = None
    replayed: bool = False


#: Answers one paused query: ``(query) -> str | Answer`` (sync or async).
Responder = Callable[[proto.Query], "str | Answer | Awaitable[str | Answer]"]


@runtime_checkable
class PauseResponder(Protocol):
    """A responder that wants to know the pause a query belongs to (for replay caches)."""

    async def answer(self, query: proto.Query, *, session: Session, pause: int,
                     queries: tuple[proto.Query, ...]) -> Answer: ...


#: Prefixes of responder strings, and the module whose ``from_spec(spec)`` builds them.
_SPEC_MODULES = {"openai": "pool_notebook.llm", "azure": "pool_notebook.llm"}


def resolve_responder(spec: Responder | PauseResponder | str | None
                      ) -> Responder | PauseResponder | None:
    """A callable as it is; ``"openai:MODEL"``-style strings built by their module."""
    if spec is None or callable(spec) or isinstance(spec, PauseResponder):
        return spec
    if isinstance(spec, str):
        prefix = spec.partition(":")[0]
        module = _SPEC_MODULES.get(prefix)
        if module is None:
            known = ", ".join(f"'{p}:MODEL'" for p in _SPEC_MODULES)
            raise InvalidArgument(f"unknown responder {spec!r}: pass a callable "
                                  f"respond(query) -> str, or a string like {known}")
        built: Responder = importlib.import_module(module).from_spec(spec)
        return built
    raise InvalidArgument(f"respond must be a callable or a string, not {type(spec).__name__}")


class Session:
    """One ``run`` on a worker and everything that followed it.

    ``steps`` holds every reply of the session in order (the ``run`` first);
    ``state``, ``pending``, ``result``, ``error`` and ``metrics`` are read from them.
    """

    def __init__(self, connection: Connection, first: Reply) -> None:
        self.connection = connection
        self.steps: list[Reply] = []
        #: The answer sent by each ok or refused ``continue``, by its index in ``steps``.
        self.answers: dict[int, Answer] = {}
        self._answering: set[str] = set()
        self._in_flight = 0
        self._observers: list[Callable[[Session], None]] = []
        # what the readers below need from ``steps``, kept as replies are added
        # (a session may pause thousands of times: no reader scans them all)
        self._id: str | None = None
        self._feed: proto.FeedResult | None = None
        self._pause_at = -1
        self._pauses = 0
        self._progress: Mapping[str, Any] | None = None
        self._add(first)

    def _add(self, reply: Reply) -> None:
        """Append ``reply`` to ``steps`` and bring the summaries of them up to date."""
        self.steps.append(reply)
        if self._id is None:
            self._id = reply.session_id
        feed = reply.feed
        if feed is not None:
            self._feed = feed
            if isinstance(feed, proto.Paused):
                self._pause_at = len(self.steps) - 1
                self._pauses += 1
        extra = getattr(reply.response.data, "extra", None) if reply.response else None
        progress = extra.get("progress") if isinstance(extra, Mapping) else None
        if isinstance(progress, Mapping) and isinstance(progress.get("total"), int):
            self._progress = progress

    # ------------------------------------------------------------ reading

    @property
    def id(self) -> str | None:
        """The worker's session id (None if the run was refused)."""
        return self._id

    @property
    def code(self) -> str | None:
        """The Lua code this session runs."""
        request = self.steps[0].request
        return request.code if isinstance(request, proto.Run) else None

    @property
    def last(self) -> Reply:
        return self.steps[-1]

    @property
    def state(self) -> SessionState:
        if self._in_flight:
            return SessionState.RUNNING
        feed = self._feed
        if isinstance(feed, proto.Finished):
            return SessionState(feed.state)
        if feed is None:  # the run itself was rejected
            return SessionState.FAILED
        return SessionState.PAUSED

    @property
    def done(self) -> bool:
        """True once the session has ended (completed, failed or cancelled)."""
        return self.state in _ENDED

    def _pause(self) -> tuple[int, list[proto.Query]]:
        """Index of the latest pause and its queries without an ok answer."""
        i = self._pause_at
        if i < 0 or isinstance(self._feed, proto.Finished):
            return -1, []
        feed = self.steps[i].feed
        assert isinstance(feed, proto.Paused)
        answered = set()
        for reply in self.steps[i + 1:]:
            request = reply.request
            if isinstance(request, proto.Continue) and reply.ok:
                answered.add(request.query_id or feed.queries[0].id)
        return i, [q for q in feed.queries if q.id not in answered]

    @property
    def pending(self) -> list[proto.Query]:
        """Queries of the latest pause with no answer yet (answers in flight excluded)."""
        return [q for q in self._pause()[1] if q.id not in self._answering]

    @property
    def progress(self) -> Mapping[str, Any] | None:
        """The latest ``alc.progress`` a pause reported (``{step, total, message}``)."""
        return self._progress

    @property
    def pauses(self) -> int:
        """How many times the session has paused so far."""
        return self._pauses

    def _finished(self) -> proto.Finished | None:
        return self._feed if isinstance(self._feed, proto.Finished) else None

    @property
    def result(self) -> Any:
        """What the Lua code returned (None until it completes)."""
        finished = self._finished()
        if finished is not None and isinstance(finished.outcome, proto.Completed):
            return finished.outcome.result
        return None

    @property
    def error(self) -> str | None:
        """The Lua error of a failed session, or the worker's reason for refusing the run."""
        finished = self._finished()
        if finished is not None:
            return finished.outcome.error if isinstance(finished.outcome, proto.Failed) else None
        first = self.steps[0]
        if first.feed is None and first.response is not None:
            return first.response.error
        return None

    @property
    def metrics(self) -> Mapping[str, Any]:
        """The finished session's metrics as the worker reported them ({} before)."""
        finished = self._finished()
        return finished.metrics if finished is not None else {}

    # ---------------------------------------------------------- observing

    def observe(self, callback: Callable[[Session], None]) -> Callable[[], None]:
        """Call ``callback(session)`` after every change; returns a function that stops it.

        Callbacks run on the event loop's thread; an exception in one is logged.
        """
        self._observers.append(callback)

        def stop() -> None:
            if callback in self._observers:
                self._observers.remove(callback)

        return stop

    def _notify(self) -> None:
        for callback in list(self._observers):
            try:
                callback(self)
            except Exception:
                log.exception("session observer %r failed", callback)

    # ---------------------------------------------------------- answering

    async def answer(self, response: str | Answer, query_id: str | None = None, *,
                     usage: Mapping[str, Any] | None = None,
                     timeout: float | None = None) -> Reply:
        """Answer one pending query (the first if ``query_id`` is None); returns its reply.

        Raises ``SessionNotPaused`` if that query is not waiting, ``WorkerError`` if
        the worker rejects the answer (that reply is still added to ``steps``).
        An ``Answer`` (a responder's) marks its history row replayed or not; a str does not.
        """
        replayed = response.replayed if isinstance(response, Answer) else None
        if isinstance(response, str):
            response = Answer(response)
        elif not isinstance(response, Answer):
            raise InvalidArgument(f"an answer must be a str or an Answer, not "
                                  f"{type(response).__name__}")
        if usage is None:
            usage = response.usage
        query = self._pending_query(query_id)
        sid = self.id
        assert sid is not None  # a pause always carries the session id
        self._answering.add(query.id)
        self._in_flight += 1
        self._notify()
        try:
            reply = await self.connection.continue_(sid, response.text, query_id=query.id,
                                                    usage=usage, timeout=timeout,
                                                    replayed=replayed)
            self.answers[len(self.steps)] = response
            self._add(reply)
        finally:
            self._in_flight -= 1
            self._answering.discard(query.id)
            self._notify()
        if not reply.ok:
            raise WorkerError("continue", str(reply.payload))
        return reply

    def _pending_query(self, query_id: str | None) -> proto.Query:
        pending = self.pending
        if query_id is None and pending:
            return pending[0]
        for query in pending:
            if query.id == query_id:
                return query
        state = str(self.state)
        if not pending:
            raise SessionNotPaused(self.id, state, "no query is waiting for an answer")
        listed = ", ".join(q.id for q in pending)
        raise SessionNotPaused(self.id, state, f"query {query_id!r} is not pending "
                               f"(pending: {listed})")

    async def ask(self, respond: Responder | PauseResponder | str,
                  query_id: str | None = None, *, timeout: float | None = None) -> Reply:
        """Answer one pending query (the first if ``query_id`` is None) with a responder.

        ``ResponderError`` if the responder fails; the session stays paused.
        """
        responder = _required(respond)
        query = self._pending_query(query_id)
        answer = await self._consult(responder, query)
        return await self.answer(answer, query.id, timeout=timeout)

    async def _consult(self, responder: Responder | PauseResponder,
                       query: proto.Query) -> Answer:
        """The responder's answer to ``query`` of the latest pause, errors typed."""
        feed = self.steps[self._pause_at].feed
        assert isinstance(feed, proto.Paused)
        try:
            return await _call(responder, query, self, self.pauses - 1, feed.queries)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ResponderError(query.id, exc) from exc

    async def answer_all(self, respond: Responder | PauseResponder | str, *,
                         max_concurrency: int = 8, timeout: float | None = None) -> Session:
        """Answer every pending query with ``respond`` until the session ends.

        The queries of one pause are answered concurrently (at most
        ``max_concurrency`` responder calls at once; sync responders run in
        threads). If the responder raises, the queries already answered stay
        answered, the session stays paused, and ``ResponderError`` is raised.
        """
        responder = _required(respond)
        if max_concurrency < 1:
            raise InvalidArgument(f"max_concurrency must be at least 1, not {max_concurrency}")
        limit = asyncio.Semaphore(max_concurrency)
        while not self.done:
            pending = self.pending
            if not pending:
                raise SessionError(f"session {self.id} is {self.state} with no query to "
                                   "answer; it cannot go on")
            await self._answer_pause(responder, pending, limit, timeout)
        return self

    async def _answer_pause(self, responder: Responder | PauseResponder,
                            pending: list[proto.Query], limit: asyncio.Semaphore,
                            timeout: float | None) -> None:
        if len(pending) == 1:  # the usual pause: no tasks to spread the answers over
            query = pending[0]
            async with limit:
                answer = await self._consult(responder, query)
            await self.answer(answer, query.id, timeout=timeout)
            return
        sending: set[asyncio.Task[None]] = set()

        async def one(query: proto.Query) -> None:
            async with limit:
                answer = await self._consult(responder, query)
            task = asyncio.current_task()
            assert task is not None
            sending.add(task)
            await self.answer(answer, query.id, timeout=timeout)

        tasks = [asyncio.ensure_future(one(q)) for q in pending]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
            for task in tasks:  # stop asking; answers being sent are let through
                if not task.done() and (task not in sending or not failed):
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception()]
        if errors:
            first = errors[0]
            if isinstance(first, ResponderError):
                first.failed = sum(isinstance(e, ResponderError) for e in errors)
            assert isinstance(first, BaseException)
            raise first

    def __repr__(self) -> str:
        pending = self.pending
        extra = f" ({len(pending)} pending)" if pending else ""
        return (f"<Session {self.id} on {self.connection.name}: {self.state}{extra}, "
                f"{len(self.steps)} steps>")


def _required(respond: Responder | PauseResponder | str) -> Responder | PauseResponder:
    responder = resolve_responder(respond)
    if responder is None:
        raise InvalidArgument("a responder is needed: a callable respond(query) -> str, "
                              "or a string such as 'openai:MODEL'")
    return responder


def _pause_aware(responder: Any) -> TypeGuard[PauseResponder]:
    """``isinstance(responder, PauseResponder)`` without its cost on every answer of a
    map (a runtime protocol check walks the protocol's members): the class is checked
    once, and an ``answer`` set on the instance itself is looked for as isinstance does."""
    kind = type(responder)
    known = _PAUSE_AWARE.get(kind)
    if known is None:
        known = _PAUSE_AWARE[kind] = issubclass(kind, PauseResponder)
    return known or "answer" in getattr(responder, "__dict__", ())


#: ``_pause_aware``'s answers, one per responder class.
_PAUSE_AWARE: dict[type, bool] = {}


async def _call(responder: Responder | PauseResponder, query: proto.Query, session: Session,
                pause: int, queries: tuple[proto.Query, ...]) -> Answer:
    """Ask the responder; sync callables run in a thread so answers overlap."""
    result: Any
    if _pause_aware(responder):
        result = await responder.answer(query, session=session, pause=pause, queries=queries)
    elif inspect.iscoroutinefunction(responder) or inspect.iscoroutinefunction(
            getattr(responder, "__call__", None)):  # noqa: B004 - async __call__ objects
        result = await cast(Responder, responder)(query)  # type: ignore[misc]
    else:
        result = await asyncio.to_thread(cast(Responder, responder), query)
        if inspect.isawaitable(result):
            result = await result
    if isinstance(result, Answer):
        return result
    if isinstance(result, str):
        return Answer(result)
    raise TypeError(f"the responder returned {type(result).__name__}; "
                    "return a str or a pool_notebook.session.Answer")
