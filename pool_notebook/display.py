"""How replies, connections and paused sessions look: static HTML/text and ipywidgets.

Static renderings (``*_html``) need nothing but the standard library, so saved
notebooks read well on GitHub/nbviewer and terminal IPython gets text. Widgets
are built lazily (ipywidgets is imported on first use) and only ever touched on
the kernel thread: a Send click schedules ``continue`` as a task on the kernel's
loop, and the task's callback updates the widget there.
"""

from __future__ import annotations

import html
import json
import os
from typing import TYPE_CHECKING, Any

from . import protocol as proto

if TYPE_CHECKING:
    from .connections import Connection, Reply

__all__ = ["PausedSessionView", "connection_html", "reply_html", "widgets_enabled"]

_FOLD = 300
_COLORS = {"ok": "#1a7f37", "worker_error": "#bf8700", "client_error": "#cf222e",
           "timeout": "#cf222e", "cancelled": "#6e7781", "late_reply": "#6e7781"}


def widgets_enabled(setting: bool | None = None) -> bool:
    """Widgets unless turned off (``POOL_NOTEBOOK_WIDGETS=0`` or the magics' config)."""
    if setting is not None:
        return setting
    return os.environ.get("POOL_NOTEBOOK_WIDGETS", "1").lower() not in ("0", "false", "off")


def _tree(value: Any, depth: int = 0) -> str:
    """A JSON value as nested collapsible <details> (long strings folded)."""
    if isinstance(value, dict):
        if not value:
            return "<code>{}</code>"
        items = "".join(f"<li><b>{html.escape(str(k))}</b>: {_tree(v, depth + 1)}</li>"
                        for k, v in value.items())
        return (f"<details{' open' if depth < 2 else ''}><summary>{{{len(value)}}}</summary>"
                f"<ul style='margin:0;padding-left:1.2em;list-style:none'>{items}</ul></details>")
    if isinstance(value, list):
        if not value:
            return "<code>[]</code>"
        items = "".join(f"<li>{_tree(v, depth + 1)}</li>" for v in value)
        return (f"<details{' open' if depth < 2 else ''}><summary>[{len(value)}]</summary>"
                f"<ol start='0' style='margin:0;padding-left:1.6em'>{items}</ol></details>")
    if isinstance(value, str) and len(value) > _FOLD:
        return (f"<details><summary><code>{html.escape(json.dumps(value[:80]))}…</code> "
                f"({len(value)} chars)</summary><pre style='white-space:pre-wrap'>"
                f"{html.escape(value)}</pre></details>")
    return f"<code>{html.escape(json.dumps(value, ensure_ascii=False))}</code>"


def reply_html(reply: Reply) -> str:
    color = _COLORS.get(reply.outcome, "#6e7781")
    head = (f"<div class='pool-reply'><b>{html.escape(reply.connection)}</b> · "
            f"<code>{html.escape(reply.op)}</code> · "
            f"<span class='pool-outcome' style='color:{color};font-weight:bold'>"
            f"{reply.outcome}</span> · {reply.latency_ms:.3f} ms · #{reply.seq}")
    feed = reply.feed
    state = f" · <span class='pool-feed'>{feed.state}</span>" if feed is not None else ""
    if isinstance(feed, proto.Finished):  # what the user wants to see: the result or error
        outcome = feed.outcome
        shown = (outcome.result if isinstance(outcome, proto.Completed) else
                 outcome.error if isinstance(outcome, proto.Failed) else None)
        body = (f"<div class='pool-result'>{_tree(shown)}</div>"
                f"<details><summary>metrics</summary>{_tree(dict(feed.metrics))}</details>")
    else:
        body = f"<div>{_tree(reply.payload)}</div>"
    return f"{head}{state}{body}</div>"


def connection_html(conn: Connection) -> str:
    rows = (("name", conn.name), ("socket", conn.sock_path),
            ("worker version", conn.version), ("pid", conn.pid),
            ("worker sid", conn.worker_sid), ("status", conn.state))
    body = "".join(f"<tr><th style='text-align:left'>{k}</th>"
                   f"<td class='pool-{k.replace(' ', '-')}'>{html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table class='pool-connection'>{body}</table>"


def _query_html(q: proto.Query) -> str:
    flags = " ".join(f"<span style='color:#bf8700'>[{f}]</span>"
                     for f in ("grounded", "underspecified") if getattr(q, f))
    system = (f"<div><i>system:</i> {html.escape(q.system)}</div>" if q.system else "")
    return (f"<div class='pool-query'><b>{html.escape(q.id)}</b> {flags} "
            f"<small>max_tokens={q.max_tokens}</small>{system}"
            f"<pre class='pool-prompt' style='white-space:pre-wrap;margin:2px 0'>"
            f"{html.escape(q.prompt)}</pre></div>")


def transcript_html(steps: list[Reply]) -> str:
    lines = []
    for r in steps:
        if isinstance(r.request, proto.Continue):
            lines.append(f"<li>answered {html.escape(r.request.query_id or 'q-0')}: "
                         f"{html.escape(r.request.response[:200])}</li>")
        feed = r.feed
        if isinstance(feed, proto.Paused):
            lines.append("<li>asked: " + "; ".join(html.escape(q.prompt[:120])
                                                   for q in feed.queries) + "</li>")
        elif isinstance(feed, proto.Accepted):
            lines.append(f"<li>accepted, {feed.remaining} remaining</li>")
        elif isinstance(feed, proto.Finished):
            lines.append(f"<li>{feed.state}</li>")
        elif not r.ok:
            lines.append(f"<li>error: {html.escape(str(r.payload))}</li>")
    return f"<ol class='pool-transcript' style='margin:0'>{''.join(lines)}</ol>"


class PausedSessionView:
    """A Lua session as it goes: pending queries with answer boxes, transcript, result."""

    def __init__(self, conn: Connection, reply: Reply, *, use_widgets: bool = True) -> None:
        self.conn = conn
        self.steps: list[Reply] = list(reply.history or [reply])
        self.use_widgets = use_widgets
        self.errors: list[str] = []
        self._box: Any = None
        if use_widgets:
            import ipywidgets as widgets

            self._box = widgets.VBox(layout=widgets.Layout(border="1px solid #d0d7de",
                                                           padding="6px"))
            self._box.add_class("pool-session")
            self._render()

    @property
    def last(self) -> Reply:
        return self.steps[-1]

    @property
    def pending(self) -> list[proto.Query]:
        """Queries of the latest pause that have no answer yet."""
        for i in range(len(self.steps) - 1, -1, -1):
            feed = self.steps[i].feed
            if isinstance(feed, proto.Paused):
                answered = {r.request.query_id for r in self.steps[i + 1:]
                            if isinstance(r.request, proto.Continue) and r.ok}
                return [q for q in feed.queries if q.id not in answered]
            if isinstance(feed, proto.Finished):
                return []
        return []

    def html(self) -> str:
        last = self.last
        parts = [f"<div class='pool-session'><b>{html.escape(self.conn.name)}</b> · session "
                 f"<code>{html.escape(str(self._session_id()))}</code>"]
        pending = self.pending
        if pending:
            parts.append(f" · <span class='pool-feed'>paused</span> ({len(pending)} pending)")
            parts.extend(_query_html(q) for q in pending)
        else:
            parts.append(reply_html(last))
        parts.append(transcript_html(self.steps))
        parts.extend(f"<div style='color:#cf222e'>{html.escape(e)}</div>" for e in self.errors)
        return "".join(parts) + "</div>"

    def _session_id(self) -> str | None:
        return next((r.session_id for r in self.steps if r.session_id), None)

    def _render(self) -> None:
        import ipywidgets as widgets

        children: list[Any] = []
        head = widgets.HTML(self.html() if not self.pending else
                            f"<b>{html.escape(self.conn.name)}</b> · session "
                            f"<code>{html.escape(str(self._session_id()))}</code> · "
                            f"<span class='pool-feed'>paused</span>")
        children.append(head)
        for q in self.pending:
            text = widgets.Textarea(placeholder=f"answer for {q.id}",
                                    layout=widgets.Layout(width="95%"))
            button = widgets.Button(description="Send", button_style="primary",
                                    tooltip=f"continue {q.id}")
            button.add_class("pool-send")
            button.on_click(lambda _b, q=q, text=text, button=button:
                            self._send(q, text, button))
            children.append(widgets.VBox([widgets.HTML(_query_html(q)),
                                          widgets.HBox([text, button])]))
        if self.pending:
            children.append(widgets.HTML(transcript_html(self.steps)))
        self._box.children = children

    def _send(self, query: proto.Query, text: Any, button: Any) -> None:
        """Send click: continue this query as a task on the kernel loop."""
        from .loop import runner

        sid = self._session_id()
        if sid is None:
            return
        button.disabled = True
        button.description = "Sending…"
        task = runner.schedule(self.conn.continue_(sid, text.value, query_id=query.id))
        task.add_done_callback(self._sent)

    def _sent(self, task: Any) -> None:
        if task.cancelled():
            self.errors.append("continue was cancelled")
        elif task.exception() is not None:
            self.errors.append(f"continue failed: {task.exception()}")
        else:
            self.steps.append(task.result())
        self._render()

    async def answer(self, response: str, query_id: str | None = None) -> Reply:
        """Answer a pending query from code (what Send does), updating the view."""
        sid = self._session_id()
        if sid is None:
            raise ValueError("this session has no id yet")
        reply = await self.conn.continue_(sid, response, query_id=query_id)
        self.steps.append(reply)
        if self._box is not None:
            self._render()
        return reply

    def _repr_html_(self) -> str:
        return self.html()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle: dict[str, Any] = {"text/plain": repr(self), "text/html": self.html()}
        if self._box is not None:
            bundle.update(self._box._repr_mimebundle_(**kwargs) or {})
        return bundle

    def __repr__(self) -> str:
        pending = self.pending
        state = f"paused ({len(pending)} pending)" if pending else (
            self.last.feed.state if self.last.feed else self.last.outcome)
        return f"<PausedSessionView {self.conn.name} session={self._session_id()} {state}>"
