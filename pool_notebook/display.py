"""What notebook users see: replies, connections, sessions, Lua errors and the history plot.

Pure rendering, no I/O: every function here takes library objects and returns
HTML, text or a matplotlib figure. The one interactive piece, :class:`SessionView`,
renders a :class:`~pool_notebook.session.Session` as ipywidgets and acts only by
calling the session (a Send click schedules ``session.answer(...)``); the
session's observer callback re-renders it on the kernel thread. The library
never imports this module: the magics register these renderings as IPython
formatters (:func:`register_formatters`).
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import protocol as proto

if TYPE_CHECKING:
    import asyncio

    import pandas as pd
    from matplotlib.figure import Figure

    from .connections import Connection, Reply
    from .session import Session

__all__ = [
    "LuaError",
    "SessionView",
    "connection_html",
    "history_figure",
    "parse_lua_error",
    "register_formatters",
    "reply_html",
    "reply_text",
    "responder_label",
    "session_html",
    "session_log",
    "session_progress",
    "session_text",
    "widgets_enabled",
]

_FOLD = 300
_RED, _GREEN, _AMBER, _GREY = "#cf222e", "#1a7f37", "#9a6700", "#6e7781"
#: Colour of each state word a reply or session can lead with.
_COLORS = {"ok": _GREEN, "completed": _GREEN, "paused": _AMBER, "accepted": _AMBER,
           "running": _GREY, "worker_error": _RED, "client_error": _RED, "timeout": _RED,
           "failed": _RED, "cancelled": _GREY, "late_reply": _GREY}


def widgets_enabled() -> bool:
    """Widgets unless ``POOL_NOTEBOOK_WIDGETS`` is 0/false/off (the magics' config can too)."""
    return os.environ.get("POOL_NOTEBOOK_WIDGETS", "1").lower() not in ("0", "false", "off")


def _badge(word: str) -> str:
    color = _COLORS.get(word, _GREY)
    return (f"<span class='pool-feed pool-state-{html.escape(word)}' "
            f"style='color:{color};font-weight:bold'>{html.escape(word)}</span>")


def _tree(value: Any, depth: int = 0) -> str:
    """A JSON value as nested collapsible <details> (long strings folded)."""
    if isinstance(value, Mapping):
        if not value:
            return "<code>{}</code>"
        items = "".join(f"<li><b>{html.escape(str(k))}</b>: {_tree(v, depth + 1)}</li>"
                        for k, v in value.items())
        return (f"<details{' open' if depth < 2 else ''}><summary>{{{len(value)}}}</summary>"
                f"<ul style='margin:0;padding-left:1.2em;list-style:none'>{items}</ul></details>")
    if isinstance(value, (list, tuple)):
        if not value:
            return "<code>[]</code>"
        items = "".join(f"<li>{_tree(v, depth + 1)}</li>" for v in value)
        return (f"<details{' open' if depth < 2 else ''}><summary>[{len(value)}]</summary>"
                f"<ol start='0' style='margin:0;padding-left:1.6em'>{items}</ol></details>")
    if isinstance(value, str) and len(value) > _FOLD:
        return (f"<details><summary><code>{html.escape(json.dumps(value[:80]))}…</code> "
                f"({len(value)} chars)</summary><pre style='white-space:pre-wrap'>"
                f"{html.escape(value)}</pre></details>")
    return f"<code>{html.escape(json.dumps(value, ensure_ascii=False, default=str))}</code>"


# ------------------------------------------------------------------ Lua errors

_TRACEBACK = "\nstack traceback:\n"
#: ``chunk:line:`` at the start of a message or frame; chunk is a name or ``[string "..."]``.
_LOCATION = re.compile(r'(?P<chunk>\[string "[^"\n]*"\]|[^\s:\[\]]+):(?P<line>\d+):\s?')
#: ``<chunk:line>`` inside a frame (``in function <run:1>``).
_FUNC_AT = re.compile(r'<(?P<chunk>\[string "[^"\n]*"\]|[^\s:<>]+):(?P<line>\d+)>')


def _internal(chunk: str) -> bool:
    """The runtime's own chunks: C functions and glue named ``<...>`` (``[string "<python>"]``,
    the sandbox's ``<sandbox>``)."""
    return chunk in ("[C]", "?") or chunk.startswith(('[string "<', "<", "=", '[string "='))


@dataclass(frozen=True)
class LuaFrame:
    """One frame of a Lua traceback the user can act on."""

    text: str  # "in main chunk", "in local 'f'", ... (locations already mapped)
    line: int | None  # line in the user's code (cell numbering), if the frame is there
    source: str | None  # that line of the code, if known


@dataclass(frozen=True)
class LuaError:
    """A Lua error as a person reads it: message, where, the line, the user's frames."""

    message: str
    line: int | None
    source: str | None
    frames: tuple[LuaFrame, ...]
    raw: str

    def text(self) -> str:
        """Plain lines: message, ``line N: code``, then the user's frames."""
        out = [self.message]
        if self.line is not None:
            out.append(f"  line {self.line}: {self.source.strip()}" if self.source
                       else f"  at line {self.line}")
        if self.frames:
            out.append("traceback (most recent call first):")
            for f in self.frames:
                out.append(f"  {'line ' + str(f.line) + ': ' if f.line is not None else ''}"
                           f"{f.text}")
                if f.source:
                    out.append(f"      {f.source.strip()}")
        return "\n".join(out)

    def html(self) -> str:
        """The same as :meth:`text`, as a red-led block (the raw error kept folded)."""
        where = ""
        if self.line is not None:
            code = (f" <code class='pool-error-source'>{html.escape(self.source.strip())}</code>"
                    if self.source else "")
            where = f"<div class='pool-error-line'>line {self.line}:{code}</div>"
        frames = ""
        if self.frames:
            rows = "".join(
                f"<li>{'line ' + str(f.line) + ': ' if f.line is not None else ''}"
                f"{html.escape(f.text)}"
                + (f"<br><code>{html.escape(f.source.strip())}</code>" if f.source else "")
                + "</li>" for f in self.frames)
            frames = (f"<div style='color:{_GREY}'>traceback (most recent call first):</div>"
                      f"<ul class='pool-traceback' style='margin:0'>{rows}</ul>")
        raw = (f"<details><summary>raw error</summary><pre style='white-space:pre-wrap'>"
               f"{html.escape(self.raw)}</pre></details>")
        return (f"<div class='pool-lua-error'><div class='pool-error-message' "
                f"style='color:{_RED};font-weight:bold;white-space:pre-wrap'>"
                f"{html.escape(self.message)}</div>{where}{frames}{raw}</div>")


def _user_chunk(message: str, frames: Sequence[str]) -> str | None:
    """The name the worker gave the user's code: the main chunk's, else the first non-internal."""
    for frame in frames:
        m = _LOCATION.match(frame)
        if m and frame[m.end():].startswith("in main chunk") and not _internal(m["chunk"]):
            return m["chunk"]
    for text in (message, *frames):
        m = _LOCATION.search(text)
        if m and not _internal(m["chunk"]):
            return m["chunk"]
    return None


def parse_lua_error(error: str, code: str | None = None, *, first_line: int = 1) -> LuaError:
    """Split a worker's Lua error into message, offending line and the user's frames.

    ``first_line`` is the number the code's first line has where the user reads
    it (2 in a ``%%pool_run`` cell: line 1 is the magic). The runtime's own
    frames (``[C]``, ``[string "<...>"]`` glue, tail calls) are dropped.
    """
    message, _, tb = error.partition(_TRACEBACK)
    raw_frames = [f.strip() for f in tb.splitlines() if f.strip()]
    chunk = _user_chunk(message, raw_frames)
    lines = code.splitlines() if code is not None else []

    def mapped(n: int) -> tuple[int, str | None]:
        source = lines[n - 1] if 0 < n <= len(lines) else None
        return n + first_line - 1, source

    line = source = None
    m = next((m for m in _LOCATION.finditer(message) if m["chunk"] == chunk), None)
    if m is not None:
        line, source = mapped(int(m["line"]))
        message = message[:m.start()] + message[m.end():]
    frames: list[LuaFrame] = []
    for raw in raw_frames:
        fm = _LOCATION.match(raw)
        if fm is None or fm["chunk"] != chunk:
            continue  # [C], glue chunks, (...tail calls...), other files' frames
        n, src = mapped(int(fm["line"]))
        text = _FUNC_AT.sub(lambda f: f"<line {mapped(int(f['line']))[0]}>"
                            if f["chunk"] == chunk else f[0], raw[fm.end():])
        frames.append(LuaFrame(text, n, src))
    if line is None and frames:  # raised inside a library: the user's innermost call
        line, source = frames[0].line, frames[0].source
    if len(frames) == 1 and frames[0].line == line and frames[0].text == "in main chunk":
        frames = []  # says nothing the error line does not
    return LuaError(message.strip(), line, source, tuple(frames), error)


# --------------------------------------------------------------------- replies

def _state_word(reply: Reply) -> str:
    """What a reply leads with: the Lua outcome when there is one, else the request outcome."""
    feed = reply.feed
    if isinstance(feed, proto.Finished):
        return feed.state
    if isinstance(feed, (proto.Paused, proto.Accepted)) and reply.ok:
        return feed.state
    return str(reply.outcome)


def _code_of(reply: Reply) -> str | None:
    return reply.request.code if isinstance(reply.request, proto.Run) else None


def _history_html(entries: Sequence[Any]) -> str:
    """algocline's ``conversation_history``: prompt and response of each LLM query."""
    def cell(value: Any) -> str:
        return f"<td style='white-space:pre-wrap'>{html.escape(str(value)[:500])}</td>"

    rows = "".join(
        f"<tr><td><code>{html.escape(str(e.get('query_id', '')))}</code></td>"
        f"{cell(e.get('prompt', ''))}"
        f"{cell(e['response'] if e.get('response') is not None else '(pending)')}</tr>"
        for e in entries if isinstance(e, Mapping))
    return (f"<details class='pool-conversation' open><summary>conversation history "
            f"({len(entries)})</summary><table><tr><th>query</th><th>prompt</th>"
            f"<th>response</th></tr>{rows}</table></details>")


def _conversation(source: Any) -> list[Any] | None:
    """algocline's ``conversation_history`` list in a status reply or metrics, if any."""
    found = source.get("conversation_history") if isinstance(source, Mapping) else None
    return found if isinstance(found, list) else None


def _body_html(reply: Reply, *, code: str | None, first_line: int) -> str:
    feed = reply.feed
    if isinstance(feed, proto.Finished):
        outcome = feed.outcome
        if isinstance(outcome, proto.Failed):
            body = parse_lua_error(outcome.error, code, first_line=first_line).html()
        elif isinstance(outcome, proto.Completed):
            body = f"<div class='pool-result'>{_tree(outcome.result)}</div>"
        else:
            body = ""
        return body + f"<details><summary>metrics</summary>{_tree(dict(feed.metrics))}</details>"
    if not reply.ok:
        return (f"<div class='pool-error-message' style='color:{_RED};white-space:pre-wrap'>"
                f"{html.escape(str(reply.payload))}</div>")
    payload = reply.payload
    history = _conversation(payload)
    if history is None:
        return f"<div>{_tree(payload)}</div>"
    rest = {k: v for k, v in payload.items() if k != "conversation_history"}
    return f"<div>{_tree(rest)}</div>{_history_html(history)}"


def reply_html(reply: Reply, *, first_line: int = 1) -> str:
    """One reply: connection, op, state word (red when anything failed), latency, body."""
    head = (f"<div class='pool-reply'><b>{html.escape(reply.connection)}</b> · "
            f"<code>{html.escape(reply.op)}</code> · {_badge(_state_word(reply))} · "
            f"{reply.latency_ms:.3f} ms · #{reply.seq}")
    return head + _body_html(reply, code=_code_of(reply), first_line=first_line) + "</div>"


def reply_text(reply: Reply, *, first_line: int = 1) -> str:
    """The reply as plain text (terminal IPython): state first, then result or error."""
    head = (f"{reply.connection}:{reply.op} {_state_word(reply)} "
            f"({reply.latency_ms:.3f} ms, #{reply.seq})")
    feed = reply.feed
    if isinstance(feed, proto.Finished):
        if isinstance(feed.outcome, proto.Failed):
            return head + "\n" + parse_lua_error(feed.outcome.error, _code_of(reply),
                                                 first_line=first_line).text()
        if isinstance(feed.outcome, proto.Completed):
            return head + "\n" + json.dumps(feed.outcome.result, ensure_ascii=False,
                                            default=str)
        return head
    return head + "\n" + (json.dumps(reply.payload, ensure_ascii=False, default=str)
                          if reply.ok else str(reply.payload))


def connection_html(conn: Connection) -> str:
    """The connection as a small table (name, socket, worker version, pid, sid, state)."""
    rows = (("name", conn.name), ("socket", conn.sock_path),
            ("worker version", conn.version), ("pid", conn.pid),
            ("worker sid", conn.worker_sid), ("status", str(conn.state)))
    body = "".join(f"<tr><th style='text-align:left'>{k}</th>"
                   f"<td class='pool-{k.replace(' ', '-')}'>{html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table class='pool-connection'>{body}</table>"


# -------------------------------------------------------------------- sessions

def _query_html(q: proto.Query) -> str:
    flags = " ".join(f"<span style='color:{_AMBER}'>[{f}]</span>"
                     for f in ("grounded", "underspecified") if getattr(q, f))
    system = f"<div><i>system:</i> {html.escape(q.system)}</div>" if q.system else ""
    return (f"<div class='pool-query'><b>{html.escape(q.id)}</b> {flags} "
            f"<small>max_tokens={q.max_tokens}</small>{system}"
            f"<pre class='pool-prompt' style='white-space:pre-wrap;margin:2px 0'>"
            f"{html.escape(q.prompt)}</pre></div>")


def _transcript(session: Session) -> list[str]:
    """One line per step: what was asked, answered (replayed from the store?), how it ended."""
    lines = []
    for i, r in enumerate(session.steps):
        if isinstance(r.request, proto.Continue):
            answer = session.answers.get(i)
            mark = " (replayed)" if answer is not None and answer.replayed else ""
            lines.append(f"answered {r.request.query_id or 'q-0'}{mark}: "
                         f"{r.request.response[:200]}")
        feed = r.feed
        if isinstance(feed, proto.Paused):
            lines.append("asked: " + "; ".join(q.prompt[:120] for q in feed.queries))
        elif isinstance(feed, proto.Accepted):
            lines.append(f"accepted, {feed.remaining} remaining")
        elif isinstance(feed, proto.Finished):
            lines.append(feed.state)
        elif not r.ok:
            lines.append(f"error: {r.payload}")
    return lines


def _session_head(session: Session, word: str, pending: int = 0) -> str:
    head = (f"<b>{html.escape(session.connection.name)}</b> · session "
            f"<code>{html.escape(str(session.id))}</code> · {_badge(word)}")
    return f"{head} ({pending} pending)" if pending else head


def _errors_html(errors: Sequence[str]) -> str:
    """What went wrong in the view itself (e.g. a responder that failed), in red."""
    return "".join(f"<div class='pool-view-error' style='color:{_RED}'>{html.escape(e)}</div>"
                   for e in errors)


#: Keys the worker adds for a session's progress and log (reply extras and final metrics).
_PROGRESS, _LOGS = "progress", "recent_logs"
_SHOWN_APART = frozenset({"conversation_history", _PROGRESS, _LOGS})


def _extras(reply: Reply) -> Mapping[str, Any]:
    data = reply.response.data if reply.response is not None else None
    extra = getattr(data, "extra", None)
    return extra if isinstance(extra, Mapping) else {}


def session_progress(session: Session) -> tuple[int, int, str] | None:
    """The latest ``alc.progress(step, total, message)`` the worker reported, if any."""
    for found in (session.metrics.get(_PROGRESS), session.progress):
        if isinstance(found, Mapping) and isinstance(found.get("total"), int):
            return (int(found.get("step") or 0), found["total"],
                    str(found.get("message") or ""))
    return None


def session_log(session: Session) -> list[str]:
    """Log lines the worker sent (``alc.log``, ``print``): each reply's new lines, then
    those of the final metrics' recent log not seen yet."""
    entries = [e for r in session.steps for e in _extras(r).get(_LOGS) or ()]
    seen = {json.dumps(e, sort_keys=True, default=str) for e in entries}
    entries += [e for e in session.metrics.get(_LOGS) or ()
                if json.dumps(e, sort_keys=True, default=str) not in seen]
    return [f"[{e.get('level', 'info')}] {e.get('message', '')}" if isinstance(e, Mapping)
            else str(e) for e in entries]


def _activity_html(session: Session) -> str:
    """Progress bar and log of the session, when the worker reports them."""
    parts = []
    progress = session_progress(session)
    if progress is not None:
        step, total, message = progress
        parts.append(f"<div class='pool-progress'><progress value='{step}' max='{total}'>"
                     f"</progress> {step}/{total} {html.escape(message)}</div>")
    log = session_log(session)
    if log:
        opened = " open" if str(session.state) == "failed" else ""
        parts.append(f"<details class='pool-log'{opened}><summary>log ({len(log)})</summary>"
                     f"<pre style='white-space:pre-wrap;margin:0'>"
                     f"{html.escape(chr(10).join(log))}</pre></details>")
    return "".join(parts)


def _lua_failure(session: Session, first_line: int) -> LuaError | None:
    """The Lua error of a session that ran and failed (None: the worker refused a step)."""
    if not isinstance(session.last.feed, proto.Finished):
        return None
    return parse_lua_error(session.error or "", session.code, first_line=first_line)


def _session_outcome_html(session: Session, first_line: int) -> str:
    """Result or error, progress and log, then metrics and conversation history."""
    word = str(session.state)
    parts = []
    if word == "failed":
        lua = _lua_failure(session, first_line)
        parts.append(lua.html() if lua is not None else
                     f"<div class='pool-error-message' style='color:{_RED};"
                     f"white-space:pre-wrap'>{html.escape(session.error or '')}</div>")
    elif word == "completed":
        parts.append(f"<div class='pool-result'>{_tree(session.result)}</div>")
    parts.append(_activity_html(session))
    if session.metrics:
        metrics = {k: v for k, v in session.metrics.items() if k not in _SHOWN_APART}
        parts.append(f"<details><summary>metrics</summary>{_tree(metrics)}</details>")
    history = _conversation(session.metrics)
    if history:
        parts.append(_history_html(history))
    return "".join(parts)


def _transcript_html(session: Session) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in _transcript(session))
    return f"<ol class='pool-transcript' style='margin:0'>{items}</ol>"


def session_html(session: Session, *, first_line: int = 1, errors: Sequence[str] = ()) -> str:
    """A session as static HTML: state first (red when failed), then what matters for it."""
    pending = session.pending
    head = _session_head(session, str(session.state), len(pending))
    parts = [f"<div class='pool-session'>{head}"]
    parts.extend(_query_html(q) for q in pending)
    parts.append(_session_outcome_html(session, first_line))
    parts.append(_transcript_html(session))
    parts.append(_errors_html(errors))
    return "".join(parts) + "</div>"


def session_text(session: Session, *, first_line: int = 1) -> str:
    """A session as plain text (terminal IPython and the text/plain fallback)."""
    word = str(session.state)
    out = [f"{session.connection.name} session {session.id}: {word}"]
    if word == "failed":
        lua = _lua_failure(session, first_line)
        out.append(lua.text() if lua is not None else session.error or "")
    elif word == "completed":
        out.append(json.dumps(session.result, ensure_ascii=False, default=str))
    progress = session_progress(session)
    if progress is not None:
        out.append(f"  progress {progress[0]}/{progress[1]} {progress[2]}".rstrip())
    out.extend(f"  log {line}" for line in session_log(session)[-5:])
    out.extend(f"  pending {q.id}: {q.prompt}" for q in session.pending)
    return "\n".join(out)


def responder_label(responder: Any) -> str:
    """What an "ask ..." button names: a model responder's model, else the function's name."""
    model = getattr(responder, "model", None)
    if isinstance(model, str) and model:
        return model
    name = getattr(responder, "__name__", "")
    return name if name and name != "<lambda>" else "responder"


@dataclass
class _Row:
    """The widgets of one pending query: answer box, Send, and "ask MODEL" if any."""

    text: Any
    send: Any
    ask: Any
    box: Any


class SessionView:
    """A session as it goes: answer boxes for pending queries, then its outcome.

    Renders ``session`` and acts only through it: Send schedules
    ``session.answer(text, query_id)`` on the kernel loop, "ask MODEL" (shown when
    a ``responder`` is given) ``session.ask(responder, query_id)`` or, for all,
    ``session.answer_all(responder)``; the session tells the view of every change
    (``session.observe``) and the view redraws itself.
    """

    def __init__(self, session: Session, *, use_widgets: bool = True, first_line: int = 1,
                 responder: Any = None) -> None:
        self.session = session
        self.first_line = first_line
        self.responder = responder
        self.errors: list[str] = []
        self._box: Any = None
        self._rows: dict[str, _Row] = {}
        self._ask_all: Any = None
        self._unobserve: Callable[[], None] | None = None
        if use_widgets:
            import ipywidgets as widgets

            self._box = widgets.VBox(layout=widgets.Layout(border="1px solid #d0d7de",
                                                           padding="6px"))
            self._box.add_class("pool-session")
            if not session.done:  # an ended session never changes again
                self._unobserve = session.observe(self._changed)
            self._render()

    @property
    def widget(self) -> Any:
        """The ipywidgets box (None with widgets off)."""
        return self._box

    def answer_widgets(self, query_id: str) -> tuple[Any, Any]:
        """The answer ``Textarea`` and **Send** ``Button`` shown for a pending query."""
        row = self._rows[query_id]
        return row.text, row.send

    def ask_button(self, query_id: str | None = None) -> Any:
        """The "ask MODEL" button of a pending query, or (None) the one for all of them."""
        if query_id is None:
            if self._ask_all is None:
                raise KeyError("no responder: no 'ask' buttons")
            return self._ask_all
        ask = self._rows[query_id].ask
        if ask is None:
            raise KeyError("no responder: no 'ask' buttons")
        return ask

    def html(self) -> str:
        return session_html(self.session, first_line=self.first_line, errors=self.errors)

    def _changed(self, _session: Session) -> None:
        self._render()

    def _render(self) -> None:
        import ipywidgets as widgets

        session = self.session
        pending = session.pending
        if not pending:
            self._box.children = [widgets.HTML(self.html())]
            self._rows = {}
            if self._unobserve is not None and session.done:
                self._unobserve()  # nothing will change any more
                self._unobserve = None
            return
        head: list[Any] = [widgets.HTML(_session_head(session, str(session.state), len(pending)))]
        if self.responder is not None:
            if self._ask_all is None:
                self._ask_all = self._button(f"ask {responder_label(self.responder)} for all",
                                             "pool-ask-all", self._ask_everything)
            head.append(self._ask_all)
        self._rows = {q.id: self._rows.get(q.id) or self._row(q) for q in pending}
        self._box.children = [
            widgets.HBox(head), *(row.box for row in self._rows.values()),
            widgets.HTML(_activity_html(session) + _transcript_html(session)
                         + _errors_html(self.errors))]

    def _button(self, label: str, css: str, click: Callable[[Any], None]) -> Any:
        import ipywidgets as widgets

        button = widgets.Button(description=label, button_style="primary",
                                layout=widgets.Layout(width="auto", flex="0 0 auto"))
        button.add_class(css)
        button.on_click(click)
        return button

    def _row(self, query: proto.Query) -> _Row:
        """Widgets for one query; kept across redraws so typed text survives."""
        import ipywidgets as widgets

        text = widgets.Textarea(placeholder=f"answer for {query.id}",
                                layout=widgets.Layout(width="auto", flex="1 1 auto"))
        send = self._button("Send", "pool-send", lambda _b: self._act(
            self.session.answer(text.value, query.id), row))
        send.tooltip = f"continue {query.id}"
        ask = None
        if self.responder is not None:
            ask = self._button(f"ask {responder_label(self.responder)}", "pool-ask",
                               lambda _b: self._act(self.session.ask(self.responder, query.id),
                                                    row))
        controls = [text, send] + ([ask] if ask is not None else [])
        box = widgets.VBox([widgets.HTML(_query_html(query)), widgets.HBox(controls)])
        row = _Row(text, send, ask, box)
        return row

    def _act(self, coro: Coroutine[Any, Any, Any], row: _Row | None) -> None:
        """A click: the session does it, as a task on the kernel loop; buttons wait."""
        from .loop import runner

        buttons = [row.send, row.ask] if row is not None else [self._ask_all]
        for button in buttons:
            if button is not None:
                button.disabled = True
        if row is not None:
            row.send.description = "Sending…"
        task = runner.schedule(coro)
        task.add_done_callback(lambda t: self._done(t, buttons, row))

    def _ask_everything(self, _button: Any) -> None:
        self._act(self.session.answer_all(self.responder), None)

    def _done(self, task: asyncio.Task[Any], buttons: list[Any], row: _Row | None) -> None:
        """Only failures need the view: what succeeded reaches it through observe."""
        if task.cancelled():
            self.errors.append("the answer was cancelled")
        elif task.exception() is not None:
            exc = task.exception()
            self.errors.append(f"{type(exc).__name__}: {exc}")
        else:
            return
        for button in buttons:  # the queries may still be pending: let them be tried again
            if button is not None:
                button.disabled = False
        if row is not None:
            row.send.description = "Send"
        if self._box is not None and not self.session.done:
            self._render()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle: dict[str, Any] = {"text/plain": session_text(self.session,
                                                             first_line=self.first_line),
                                  "text/html": self.html()}
        if self._box is not None:
            bundle.update(self._box._repr_mimebundle_(**kwargs) or {})
        return bundle

    def __repr__(self) -> str:
        return f"<SessionView {self.session.connection.name} {self.session.id} " \
               f"{self.session.state}>"


# ------------------------------------------------------------- history plot

#: Percentiles drawn, HdrHistogram style (x = 1 / (1 - p)).
_PERCENTILES = (0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
_OP_STYLES = ("-", "--", ":", "-.")
_OP_MARKERS = ("o", "s", "^", "D", "v", "P")


def _percentile_curve(latencies: Any) -> tuple[Any, Any]:
    """The percentile curve: x = 1/(1-p), evenly spaced on the log axis up to p = 1 - 1/n."""
    import numpy as np

    values = np.asarray(latencies, dtype=float)
    xs = np.logspace(0.0, np.log10(max(len(values), 1)), 200)
    return xs, np.quantile(values, 1.0 - 1.0 / xs)


def history_figure(df: pd.DataFrame) -> Figure:
    """The history as two panels: latency over time, and latency by percentile.

    Time is seconds since the first request; latency (ms) is on a log axis in
    both panels. One colour per connection, one line style/marker per op, so
    p50 to p99.9 of every series can be read at once. The figure is not
    registered with pyplot: it is drawn exactly once, where it is displayed.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import (
        FixedLocator,
        FuncFormatter,
        LogLocator,
        NullFormatter,
        NullLocator,
    )

    fig = _displayed_figure()(figsize=(11.5, 4.2), layout="constrained")
    ax_time, ax_pct = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    conns = sorted(str(c) for c in df["connection"].dropna().unique())
    ops = sorted(str(o) for o in df["op"].dropna().unique())
    colors = {c: f"C{i % 10}" for i, c in enumerate(conns)}
    styles = {o: _OP_STYLES[i % len(_OP_STYLES)] for i, o in enumerate(ops)}
    markers = {o: _OP_MARKERS[i % len(_OP_MARKERS)] for i, o in enumerate(ops)}
    if len(df):
        sent = df["sent_at"]
        t0 = sent.min()
        seconds = (sent - t0).dt.total_seconds()
        latency = df["latency_ms"].clip(lower=1e-3)
        size = 5.0 if len(df) < 500 else 2.5
        for (conn, op), group in df.groupby(["connection", "op"], observed=True):
            color, op_s = colors[str(conn)], str(op)
            ax_time.plot(seconds[group.index], latency[group.index], markers[op_s],
                         ms=size, alpha=0.5, color=color, mec="none")
            xs, ys = _percentile_curve(latency[group.index])
            ax_pct.plot(xs, ys, styles[op_s], color=color, lw=1.6, marker=markers[op_s],
                        markevery=[-1], ms=5)  # the marker sits on the maximum
    ax_time.set(title="latency over time", xlabel="seconds since the first request",
                ylabel="latency (ms, log)", yscale="log")
    ax_pct.set(title="latency by percentile", xlabel="percentile", ylabel="latency (ms, log)",
               xscale="log", yscale="log")
    ticks = [1.0 / (1.0 - p) for p in _PERCENTILES]
    ax_pct.xaxis.set_major_locator(FixedLocator(ticks))
    ax_pct.xaxis.set_minor_locator(NullLocator())
    ax_pct.xaxis.set_major_formatter(_percentile_formatter(4))
    ax_pct.set_xlim(1, ticks[-1] * 1.3)
    plain = FuncFormatter(lambda y, _pos: f"{y:g}")  # 0.1, 1, 10 ms: no 10^x, no 4x10^0
    for ax in (ax_time, ax_pct):
        ax.grid(True, which="major", alpha=0.3)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
    handles = [Line2D([], [], color=colors[c], lw=3, label=c) for c in conns]
    handles += [Line2D([], [], color="0.3", ls=styles[o], marker=markers[o], ms=4, label=o)
                for o in ops]
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize="small",
                   title="connection / op", title_fontsize="small", frameon=False)
    return fig


def _png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()


@functools.cache
def _displayed_figure() -> type[Figure]:
    """A Figure that IPython shows as a PNG by itself (no pyplot, so never twice).

    Built on first use: matplotlib is imported only when a plot is drawn.
    """
    from matplotlib.figure import Figure

    class DisplayedFigure(Figure):
        def _repr_png_(self) -> bytes:
            return _png(self)

    return DisplayedFigure


# ------------------------------------------------------------------ formatters

def register_formatters(shell: Any) -> None:
    """Show replies, connections and sessions as HTML in this IPython shell (idempotent)."""
    from .connections import Connection, Reply
    from .session import Session

    formatter = shell.display_formatter.formatters["text/html"]
    formatter.for_type(Reply, reply_html)
    formatter.for_type(Connection, connection_html)
    formatter.for_type(Session, session_html)
    plain = shell.display_formatter.formatters["text/plain"]
    plain.for_type(Reply, lambda r, p, cycle: p.text(reply_text(r)))
    plain.for_type(Session, lambda s, p, cycle: p.text(session_text(s)))


# ------------------------------------------------------------------ map results

def map_figure(maps: Mapping[str, pd.DataFrame] | pd.DataFrame) -> Figure:
    """One or more ``pool_notebook.map`` results side by side, in three panels.

    Rows by state (stacked bars), latency by percentile of the completed rows
    (log axes, as :func:`history_figure`), and the score mean with its 95%
    interval when the maps were scored (else LLM calls per row).
    """
    import math

    import pandas as pd

    from .mapping import STATES, map_summary

    frames = {"map": maps} if isinstance(maps, pd.DataFrame) else dict(maps)
    fig = _displayed_figure()(figsize=(11.5, 3.6), layout="constrained")
    ax_state, ax_pct, ax_score = fig.subplots(1, 3)
    names = list(frames)
    summaries = {name: map_summary(df) for name, df in frames.items()}
    bottom = [0.0] * len(names)
    colors = {"completed": "C2", "failed": "C3", "timeout": "C1", "cancelled": "0.6"}
    for state in STATES:
        counts = [float(summaries[n][state]) for n in names]
        ax_state.bar(names, counts, bottom=bottom, color=colors[state], label=state)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax_state.set(title="rows by state", ylabel="rows")
    ax_state.legend(fontsize="small", frameon=False)
    for i, (name, df) in enumerate(frames.items()):
        latency = df.loc[df["state"] == "completed", "latency_ms"].astype(float).clip(lower=1e-3)
        if len(latency):
            xs, ys = _percentile_curve(latency)
            ax_pct.plot(xs, ys, color=f"C{i % 10}", lw=1.6, label=name)
    ax_pct.set(title="latency of completed rows", xlabel="percentile",
               ylabel="latency (ms, log)", xscale="log", yscale="log")
    ax_pct.xaxis.set_major_formatter(_percentile_formatter(3))
    if names and any(not math.isnan(summaries[n].get("score_mean", math.nan)) for n in names):
        means = [float(summaries[n].get("score_mean", math.nan)) for n in names]
        lows = [m - float(summaries[n].get("score_ci_low", math.nan))
                for m, n in zip(means, names, strict=True)]
        highs = [float(summaries[n].get("score_ci_high", math.nan)) - m
                 for m, n in zip(means, names, strict=True)]
        ax_score.bar(names, means, yerr=[lows, highs], capsize=6,
                     color=[f"C{i % 10}" for i in range(len(names))])
        ax_score.set(title="score (mean, 95% interval)", ylabel="score")
    else:
        calls = [float(summaries[n]["llm_calls"]) / max(1, int(summaries[n]["rows"]))
                 for n in names]
        ax_score.bar(names, calls, color=[f"C{i % 10}" for i in range(len(names))])
        ax_score.set(title="LLM calls per row", ylabel="calls")
    for ax in (ax_state, ax_pct, ax_score):
        ax.grid(True, axis="y", alpha=0.3)
    if len(names) > 1:
        ax_pct.legend(fontsize="small", frameon=False)
    return fig


def _percentile_formatter(digits: int) -> Any:
    """Tick labels for a percentile axis placed at 1 / (1 - p): p50, p99.9, ..."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _pos: f"p{100 * (1 - 1 / x):.{digits}g}" if x > 1 else "min")
