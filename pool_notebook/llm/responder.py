"""Model responders: answer paused queries with a model, recording and replaying answers.

A :class:`ModelResponder` turns a query into a chat request, numbers identical
requests within a run (their *occurrence*), looks the answer up in the answers
store and asks the provider only for what is not recorded (``cache="record"``),
never (``"replay"``) or always (``"off"``). A semaphore per event loop bounds
the requests in flight across every session using the responder.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from ..errors import InvalidArgument, ReplayMiss
from ..protocol import Query
from ..session import Answer
from .providers import OpenAIChat
from .store import AnswerStore, ChatRequest, Recorded

__all__ = ["FLAG_NOTES", "CacheMode", "ModelResponder"]

CacheMode = Literal["record", "replay", "off"]
_CACHE_MODES = ("record", "replay", "off")

#: How a query's algocline flags reach a chat model: a note added to the system
#: message (the host decides the means; a plain chat model can only be told).
FLAG_NOTES: Mapping[str, str] = {
    "grounded": "Ground your answer in evidence you can point to (sources, code, "
                "documentation) rather than memory alone, and say where you are unsure.",
    "underspecified": "The request may depend on goals or definitions that are not stated "
                      "here: state the assumptions you make before answering.",
}


class _Run:
    """Occurrence numbers of one run: identical requests counted in query order."""

    def __init__(self) -> None:
        self.seen: Counter[ChatRequest] = Counter()
        self.numbered: dict[tuple[int, str], int] = {}

    def occurrence(self, pause: int, queries: Sequence[Query], query: Query,
                   request: Callable[[Query], ChatRequest]) -> int:
        """The occurrence of ``query``, numbering its whole pause the first time it is seen."""
        if (pause, query.id) not in self.numbered:
            for q in (*queries, query):
                if (pause, q.id) not in self.numbered:
                    key = request(q)
                    self.numbered[pause, q.id] = self.seen[key]
                    self.seen[key] += 1
        return self.numbered[pause, query.id]


class ModelResponder:
    """Answers queries with one model; ``await r(query)`` or, from a Session, ``r.answer``."""

    def __init__(self, chat: OpenAIChat, *, temperature: float | None = None,
                 max_concurrency: int = 8, cache: CacheMode = "record",
                 store: AnswerStore | None = None,
                 flag_notes: Mapping[str, str] | None = FLAG_NOTES) -> None:
        if cache not in _CACHE_MODES:
            raise InvalidArgument(f"cache={cache!r}: use one of {', '.join(_CACHE_MODES)}")
        if max_concurrency < 1:
            raise InvalidArgument(f"max_concurrency={max_concurrency}: must be at least 1")
        self.chat = chat
        self.temperature = temperature
        self.max_concurrency = max_concurrency
        self.cache: CacheMode = cache
        self.store = store if store is not None else AnswerStore()
        self.flag_notes = dict(flag_notes or {})
        self._runs: weakref.WeakKeyDictionary[object, _Run] = weakref.WeakKeyDictionary()
        self._calls = itertools.count()
        self._in_flight: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Task[Recorded]] = {}
        self._limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary())

    @property
    def model(self) -> str:
        return self.chat.model

    @property
    def spec(self) -> str:
        """``provider:model``, as ``from_spec`` takes it."""
        return f"{self.chat.provider}:{self.chat.model}"

    def __repr__(self) -> str:
        return (f"<ModelResponder {self.spec} at {self.chat.endpoint} cache={self.cache} "
                f"max_concurrency={self.max_concurrency} store={self.store.path}>")

    def request(self, query: Query) -> ChatRequest:
        """The chat request for ``query`` (its flags become notes in the system message)."""
        notes = [note for flag, note in self.flag_notes.items() if getattr(query, flag, False)]
        system = "\n\n".join(part for part in (query.system, *notes) if part) or None
        return ChatRequest(self.chat.provider, self.chat.model, system, query.prompt,
                           query.max_tokens, self.temperature)

    def _run(self, session: object) -> _Run:
        """The occurrence counts of ``session`` (kept as long as the session object lives)."""
        try:
            run = self._runs.get(session)
            if run is None:
                run = self._runs[session] = _Run()
        except TypeError:
            raise InvalidArgument(f"session={session!r}: pass the Session object (or any "
                                  "object that can be weakly referenced), not a "
                                  f"{type(session).__name__}") from None
        return run

    def _limit(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        limit = self._limits.get(loop)
        if limit is None:
            limit = self._limits[loop] = asyncio.Semaphore(self.max_concurrency)
        return limit

    async def answer(self, query: Query, *, session: object, pause: int,
                     queries: Sequence[Query] = ()) -> Answer:
        """Answer ``query``, the member of pause number ``pause`` of run ``session``.

        ``queries`` are all queries of that pause in order: identical requests are
        numbered over the pause in that order, whichever is answered first, so a
        re-run (a new ``session``) replays the same answers in the same places.
        """
        request = self.request(query)
        occurrence = self._run(session).occurrence(pause, queries, query, self.request)
        if self.cache != "off":
            recorded = self.store.get(request, occurrence)
            if recorded is not None:
                return Answer(recorded.text, recorded.usage, replayed=True)
            if self.cache == "replay":
                raise ReplayMiss(self.model, query.prompt, occurrence, str(self.store.path))
        if self.cache == "off":
            async with self._limit():
                reply = await self.chat.complete(request)
            return Answer(reply.text, reply.usage)
        return await self._record(request, occurrence)

    async def _record(self, request: ChatRequest, occurrence: int) -> Answer:
        """Ask the provider and record the answer, once per store key at a time.

        Concurrent runs asking the same occurrence of the same request (two
        sessions of one strategy, a double click) share one provider call, so
        what each of them got is what the store will replay. The others' answers
        say ``replayed``: no call of their own. A cancelled caller does not stop
        the shared call: its answer is recorded for the next attempt.
        """
        loop = asyncio.get_running_loop()
        key = (loop, request.key(occurrence))
        shared = self._in_flight.get(key)
        if shared is not None:
            reply = await asyncio.shield(shared)
            return Answer(reply.text, reply.usage, replayed=True)
        task = self._in_flight[key] = loop.create_task(self._ask(request, occurrence))

        def forget(done: asyncio.Task[Recorded]) -> None:
            self._in_flight.pop(key, None)
            if not done.cancelled():
                done.exception()  # retrieved: a caller that gave up is not told later

        task.add_done_callback(forget)
        reply = await asyncio.shield(task)
        return Answer(reply.text, reply.usage)

    async def _ask(self, request: ChatRequest, occurrence: int) -> Recorded:
        async with self._limit():
            reply = await self.chat.complete(request)
        self.store.put(request, occurrence, reply)
        return reply

    async def __call__(self, query: Query) -> Answer:
        """Answer one query on its own: identical requests are numbered in call order."""
        return await self.answer(query, session=self, pause=next(self._calls))
