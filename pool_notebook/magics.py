"""IPython magics: parse the line, call :mod:`pool_notebook.connections`, display.

Everything a magic does is a plain Python call too (``await pool_notebook.connect()``,
``await conn.send(...)``, ``pool_notebook.history()``). Blocking magics run their
coroutine on the kernel's loop via :data:`pool_notebook.loop.runner`.

Errors: a bad magic line is a ``UsageError`` (IPython's one-liner). A library
error (any :class:`~pool_notebook.errors.PoolError`) keeps its type, so the cell
fails and ``except`` clauses work, but is shown as one line plus a hint naming
the magic that helps (``PoolMagics.show_tracebacks`` shows the full traceback).
Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Bool, Float, Unicode

from . import errors
from . import protocol as proto
from ._version import PROTOCOL_VERSION
from .connections import Connection, Reply, manager, parse_request
from .display import (
    SessionView,
    history_figure,
    map_figure,
    register_formatters,
    session_progress,
    widgets_enabled,
)
from .history import summary
from .loop import runner
from .mapping import map_summary, pool_map
from .registry import Registry
from .session import Session, resolve_responder

__all__ = ["PoolMagics"]


_NAME_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    return value


def _parse(magic: Any, line: str) -> Any:
    """``parse_argstring`` (IPython's ``arg_split``), quotes around values removed.

    A trailing ``;`` (IPython's "silence the output") is not an argument.
    """
    args = parse_argstring(magic, line.rstrip().removesuffix(";"))
    for key, value in vars(args).items():
        setattr(args, key, _unquote(value))
    return args


#: The magic that helps with each library error (most specific first).
_HINTS: tuple[tuple[type[errors.PoolError] | tuple[type[errors.PoolError], ...], str], ...] = (
    (errors.ConnectTimeout, "the worker did not accept in time: %pool_connect ... --timeout "
     "SECONDS, or %config PoolMagics.handshake_timeout = SECONDS"),
    (errors.HandshakeTimeout, "%pool_connect ... --timeout SECONDS waits longer; "
     "%pool_workers shows whether the worker is alive"),
    (errors.VersionMismatch, "%pool_connect ... --protocol-version {server} (or "
     "--protocol-version auto) speaks the worker's version"),
    (errors.InsecureSocketError, "%pool_connect ... --allow-insecure skips the checks "
     "if you trust this socket"),
    (errors.ConnectError, "%pool_workers lists known workers (--gc prunes dead ones); "
     "%pool_connect with no socket spawns a new one"),
    (errors.ConnectionNotFound, "%pool_connections lists open connections; "
     "%pool_connect opens one"),
    (errors.SessionRefused, "this worker runs one session per process: "
     "%pool_connect a new worker for the next run"),
    (errors.SessionNotPaused, "%pool_status shows the worker's session"),
    (errors.ResponderError, "the session is still paused: answer it in the view, or fix "
     "the responder and run `await session.answer_all(respond)`"),
    (errors.RequestTimeout, "the connection stays usable; --timeout SECONDS or "
     "%config PoolMagics.request_timeout = SECONDS allows longer requests"),
    ((errors.ConnectionBroken, errors.TransportError), "%pool_disconnect it, then "
     "%pool_connect --sid SID picks up a paused session (%pool_workers lists sids)"),
    (errors.ClientClosed, "%pool_connect opens a new connection"),
    (errors.MalformedRequest, "a request is a bare op (status, shutdown) or one JSON "
     "object; %pool_send? shows the options"),
    (errors.RegistryCorrupted, "inspect or move the file; %pool_workers reads it again "
     "afterwards"),
    (errors.SpawnError, "%pool_connect --spawn \"CMD --sid {sid} --sock {sock}\" starts "
     "another worker command"),
    (errors.LoopError, "without --background the magic waits for the reply"),
    (errors.LLMError, "--respond takes a Python callable or 'openai:MODEL' (docs/llm.md)"),
)


def _hint(exc: errors.PoolError) -> str | None:
    for kind, hint in _HINTS:
        if isinstance(exc, kind):
            return hint.replace("{server}", str(getattr(exc, "server", "VERSION")))
    return None


def _one_line(exc: errors.PoolError) -> list[str]:
    """How IPython shows ``exc`` (its ``_render_traceback_`` protocol): name, message, hint."""
    lines = [f"\x1b[31m{type(exc).__name__}\x1b[0m: {exc}"]
    hint = _hint(exc)
    if hint:
        lines.append(f"\x1b[2mhint: {hint}\x1b[0m")
    return lines


@magics_class
class PoolMagics(Magics):
    """Magics to drive pool workers: ``%pool_connect``, ``%%pool_send``, ``%%pool_run`` …"""

    handshake_timeout = Float(10.0, help="Seconds to wait for a worker's handshake.").tag(
        config=True)
    request_timeout = Float(0.0, help="Default request timeout in seconds (0: none).").tag(
        config=True)
    protocol_version = Unicode(PROTOCOL_VERSION, help="Protocol version sent on connect.").tag(
        config=True)
    widgets = Bool(True, help="Show ipywidgets (off: static HTML/text only).").tag(config=True)
    show_tracebacks = Bool(False, help="Show full tracebacks for pool errors.").tag(config=True)
    progress_after = Float(2.0, help="Seconds before a --respond run starts showing "
                           "progress.").tag(config=True)
    respond = Unicode("", help="Default responder of %%pool_run: a Python name/expression "
                      "(f(query) -> str) or a spec such as 'openai:MODEL'; empty: none.").tag(
        config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        if shell is not None:
            register_formatters(shell)

    # --------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Library errors keep their type but show as one line plus this layer's hint."""
        try:
            yield
        except errors.PoolError as exc:
            if not self.show_tracebacks:
                lines = _one_line(exc)
                exc._render_traceback_ = lambda: lines  # type: ignore[attr-defined]
            raise

    def _run(self, coro: Any) -> Any:
        with self._errors():
            return runner.run(coro)

    def _timeout(self, value: float | None) -> float | None:
        if value is not None:
            return value if value > 0 else None
        return self.request_timeout or None

    def _conn(self, name: str | None) -> Connection:
        with self._errors():
            return manager.get(name)

    def _widgets(self) -> bool:
        return widgets_enabled() and self.widgets

    def _expand(self, cell: str) -> str:
        """``{name}`` -> the user variable's value, as IPython does for magic lines.

        Only bare names are replaced (JSON's own braces stay as they are); Lua cells
        of ``%%pool_run`` are not expanded at all (Lua tables use braces: use --ctx).
        """
        ns = self.shell.user_ns if self.shell is not None else {}
        return _NAME_FIELD.sub(lambda m: str(ns[m[1]]) if m[1] in ns else m[0], cell)

    def _store(self, name: str | None, value: Any) -> None:
        if name and self.shell is not None:
            self.shell.user_ns[name] = value

    # ---------------------------------------------------------------- magics

    @magic_arguments()
    @argument("sock", nargs="?", help="worker socket path (omit to spawn the bundled worker)")
    @argument("--name", help="connection name (default w0, w1, …)")
    @argument("--sid", help="reconnect to a worker from the registry (ours or algocline's)")
    @argument("--spawn", nargs="?", const="", default=None, metavar="CMD",
              help="spawn a worker from a command template with {sid} and {sock}")
    @argument("--protocol-version", help="protocol version to speak (default: PoolMagics "
              "config); 'auto' speaks the version the worker reports")
    @argument("--timeout", type=float, help="handshake timeout in seconds")
    @argument("--allow-insecure", action="store_true",
              help="skip the socket directory and peer-uid checks")
    @line_magic
    def pool_connect(self, line: str) -> Connection:
        """Connect to a pool worker and make it the current connection.

        With no socket, spawns the bundled Lua worker (the embedded default).
        """
        args = _parse(self.pool_connect, line)
        conn: Connection = self._run(manager.connect(
            args.sock, name=args.name, sid=args.sid, spawn=args.spawn or None,
            version=args.protocol_version or self.protocol_version,
            timeout=args.timeout or self.handshake_timeout, allow_insecure=args.allow_insecure))
        return conn

    @magic_arguments()
    @argument("--to", help="connection name (default: the current one)")
    @argument("--all", action="store_true", help="send to every open connection concurrently")
    @argument("--timeout", type=float, help="request timeout in seconds")
    @argument("--background", action="store_true",
              help="return at once (a task: `await task` in a later cell); the reply is "
              "shown when it arrives")
    @argument("--out", help="store the reply (or task / list of replies) in this variable")
    @argument("request", nargs="*", help="the request, if not given as the cell body")
    @line_cell_magic
    def pool_send(self, line: str, cell: str | None = None) -> Any:
        """Send one request: a JSON object or a bare op name (``status``, ``shutdown``).

        ``{name}`` in the cell is replaced by the Python variable's value.
        """
        args = _parse(self.pool_send, line)
        text = self._expand(cell) if cell is not None else " ".join(args.request)
        if not text.strip():
            raise UsageError("give a request: %pool_send status, or a JSON object in the cell")
        with self._errors():
            request = parse_request(text)
        timeout = self._timeout(args.timeout)
        if args.all:
            conns = list(manager.connections.values())
            if not conns:
                raise UsageError("no open connections; use %pool_connect")
            replies = self._run(_gather(conns, request, timeout))
            self._store(args.out, replies)
            return replies
        conn = self._conn(args.to)
        if args.background:
            with self._errors():
                task = runner.background(conn.send(request, timeout=timeout), self.shell)
            self._store(args.out, task)
            handle = display(f"{conn.name}:{request.op} sent in the background…",
                             display_id=True)
            if handle is not None:
                task.add_done_callback(lambda t: handle.update(
                    t.result() if not t.cancelled() and t.exception() is None else
                    f"{conn.name}:{request.op} failed: "
                    f"{'cancelled' if t.cancelled() else t.exception()}"))
            return task
        reply = self._run(conn.send(request, timeout=timeout))
        self._store(args.out, reply)
        return reply

    @magic_arguments()
    @argument("--to", help="connection name (default: the current one)")
    @argument("--ctx", help="Python expression for the run's ctx (JSON-able)")
    @argument("--lib", action="append", default=[], help="extra Lua library path (repeatable)")
    @argument("--respond", help="answers every paused query until the session ends: a Python "
              "callable f(query) -> str (sync or async), or a spec such as 'openai:MODEL' "
              "(default: %%config PoolMagics.respond)")
    @argument("--manual", action="store_true",
              help="do not answer with the responder; show the paused session, with an "
              "'ask MODEL' button per query when a responder is set")
    @argument("--timeout", type=float, help="timeout per request in seconds")
    @argument("--out", help="store the Session in this variable")
    @line_cell_magic
    def pool_run(self, line: str, cell: str | None = None) -> Any:
        """Run the cell as Lua code on the worker (a ``run`` request).

        Shows the session: a paused one with an answer box and Send button per
        query (and "ask MODEL" when a responder is set and ``--manual`` or the
        responder failed), a failed one with its Lua error mapped to the cell's lines.
        ``--out NAME`` stores the Session (``await NAME.answer("...")``).
        The cell is sent as written (Lua tables use braces); pass Python values
        with ``--ctx`` (the Lua global ``ctx``).
        """
        args = _parse(self.pool_run, line)
        if not cell or not cell.strip():
            raise UsageError("%%pool_run needs Lua code in the cell body")
        conn = self._conn(args.to)
        ctx = self._eval(args.ctx, "--ctx") if args.ctx else None
        respond = self._responder(args.respond)
        timeout = self._timeout(args.timeout)
        session: Session = self._run(conn.run(cell, ctx=ctx, lib_paths=args.lib,
                                              timeout=timeout))
        self._store(args.out, session)
        view = SessionView(session, use_widgets=self._widgets(), first_line=2,
                           responder=respond)
        if respond is not None and session.pending and not args.manual:
            progress = _Progress(conn.name, self.progress_after)
            stop = session.observe(progress.step)
            progress.step(session)
            try:
                self._run(session.answer_all(respond, timeout=timeout))
            except errors.PoolError:
                display(view)  # still paused (or failed): show where it stopped
                raise
            finally:
                stop()
                progress.done(session)
        return view

    def _responder(self, option: str | None) -> Any:
        """``--respond`` (default ``PoolMagics.respond``), resolved before anything runs.

        A Python expression naming a callable, else a spec string: text that is
        not Python (``openai:gpt-4o-mini``) goes to the library unchanged, which
        resolves it or says which specs it knows.
        """
        spec = option or self.respond
        if not spec:
            return None
        assert self.shell is not None
        try:
            value = self.shell.ev(spec)
        except SyntaxError:
            value = spec
        except Exception as exc:
            raise UsageError(f"--respond {spec!r} failed: {type(exc).__name__}: {exc}") from None
        if not callable(value) and not isinstance(value, str):
            raise UsageError(f"--respond {spec} is not callable (or a spec such as "
                             "'openai:MODEL')")
        with self._errors():  # an unknown spec fails here
            return resolve_responder(value)

    def _eval(self, expr: str, option: str) -> Any:
        assert self.shell is not None
        try:
            return self.shell.ev(expr)
        except Exception as exc:
            raise UsageError(f"{option} {expr!r} failed: {type(exc).__name__}: {exc}") from None

    @magic_arguments()
    @argument("--to", help="connection name")
    @argument("--history", action="store_true", help="include the session transcript")
    @line_magic
    def pool_status(self, line: str) -> Reply:
        """Ask the worker for its session state."""
        args = _parse(self.pool_status, line)
        return self._run(self._conn(args.to).status(include_history=args.history))  # type: ignore[no-any-return]

    @line_magic
    def pool_connections(self, line: str) -> Any:
        """Table of open connections (the current one marked)."""
        import pandas as pd

        rows = [{"current": "*" if name == manager.current else "", "name": name,
                 "socket": c.sock_path, "version": c.version, "pid": c.pid, "state": c.state}
                for name, c in manager.connections.items()]
        return pd.DataFrame(rows, columns=["current", "name", "socket", "version", "pid",
                                           "state"])

    @magic_arguments()
    @argument("name", nargs="?", help="connection name (default: the current one)")
    @argument("--all", action="store_true", help="disconnect every connection")
    @argument("--shutdown", action="store_true", help="ask the worker(s) to exit first")
    @line_magic
    def pool_disconnect(self, line: str) -> list[str]:
        """Close connections (``--shutdown``: ask the worker to exit first).

        A worker whose last client disconnects exits, unless it holds a paused
        session: then it waits for a reconnect (``%pool_connect --sid SID``).
        """
        args = _parse(self.pool_disconnect, line)
        names = list(manager.connections) if args.all else [self._conn(args.name).name]
        for name in names:
            conn = manager.get(name)
            if args.shutdown and conn.state == "open":
                with contextlib.suppress(errors.PoolError):  # already gone: disconnect anyway
                    runner.run(conn.shutdown(timeout=self._timeout(None) or 5.0))
            manager.disconnect(name)
        return names

    @magic_arguments()
    @argument("--gc", action="store_true", help="prune entries whose process is gone")
    @argument("--algocline", action="store_true", help="also list algocline's registry")
    @line_magic
    def pool_workers(self, line: str) -> Any:
        """Workers in the registry: sid, pid, live/dead, version, age, socket."""
        import pandas as pd

        args = _parse(self.pool_workers, line)
        registries = [("pool_notebook", Registry.default())]
        if args.algocline:
            registries.append(("algocline", Registry.algocline()))
        rows = []
        with self._errors():
            for source, reg in registries:
                if args.gc:
                    reg.gc()
                rows += [{"source": source, "sid": e.sid, "pid": e.pid,
                          "alive": e.alive, "version": e.version,
                          "age_s": round(e.age_seconds or 0.0, 1), "sock": e.sock}
                         for e in reg.entries()]
        return pd.DataFrame(rows, columns=["source", "sid", "pid", "alive", "version", "age_s",
                                           "sock"])

    @magic_arguments()
    @argument("--to", help="only this connection")
    @argument("--op", help="only this op")
    @argument("--last", type=int, help="only the last N rows")
    @argument("--summary", action="store_true", help="count, error rate, p50/p95/p99 per op")
    @argument("--plot", action="store_true",
              help="latency over time and by percentile (p50…p99.9), per connection and op")
    @argument("--all-sessions", action="store_true", help="include earlier kernels (SQLite)")
    @line_magic
    def pool_history(self, line: str) -> Any:
        """Request history as a pandas DataFrame (``--summary``: percentiles per op).

        ``--plot`` shows the figure (``pool_notebook.display.history_figure(df)``
        returns it) and returns nothing, so it is drawn once with or without ``;``.
        """
        args = _parse(self.pool_history, line)
        df = manager.history.frame(all_sessions=args.all_sessions)
        if args.to:
            df = df[df["connection"] == args.to]
        if args.op:
            df = df[df["op"] == args.op]
        if args.last:
            df = df.tail(args.last)
        if args.plot:  # shown here, once, with or without a trailing ";"
            try:
                figure = history_figure(df)
            except ImportError as exc:
                raise ImportError("%pool_history --plot needs matplotlib: pip install "
                                  "'pool-notebook[plot]'") from exc
            display(figure)
            return None
        return summary(df) if args.summary else df

    @magic_arguments()
    @argument("--in", dest="inputs", required=True,
              help="the inputs: a DataFrame (row -> ctx), a Series (value -> ctx.input) or a "
              "list of dicts (a Python name or expression)")
    @argument("--out", help="store the result DataFrame in this variable (also when stopped)")
    @argument("--workers", type=int, default=8, help="bundled workers to run at once (with "
              "--cluster: bundled workers per Dask worker process)")
    @argument("--respond", help="answers every LLM query: a Python callable f(query) -> str "
              "(sync or async), or a spec such as 'openai:MODEL' (default: "
              "%%config PoolMagics.respond)")
    @argument("--cluster", help="run the rows as Dask tasks: the name of a distributed.Client, "
              "or a scheduler address tcp://HOST:PORT (a Client is made once per address)")
    @argument("--strategy", help="run a strategy package: require(PKG).run(ctx)")
    @argument("--lib", action="append", default=[], help="extra Lua library path (repeatable)")
    @argument("--timeout", type=float, help="seconds one input may take")
    @argument("--score", help="a Python callable score(row, result) -> float")
    @argument("--resume", help="a previous result DataFrame: run only its rows not completed")
    @argument("--plot", action="store_true",
              help="also show the result's figure (states, latency percentiles, score)")
    @cell_magic
    def pool_map(self, line: str, cell: str) -> Any:
        """Run the cell's Lua code (or ``--strategy PKG``) once per input on a worker pool.

        Shows a progress bar, then returns the frame (one row per input, in input
        order) or, with ``--out NAME``, stores it and shows its summary. The stop
        button stops promptly: the rows done so far are stored in ``--out`` (the
        rest ``cancelled``) and ``--resume NAME`` runs only what is missing.
        """
        args = _parse(self.pool_map, line)
        if args.strategy and cell.strip():
            raise UsageError("%%pool_map: give Lua code in the cell or --strategy, not both")
        if not args.strategy and not cell.strip():
            raise UsageError("%%pool_map needs Lua code in the cell body, or --strategy PKG")
        inputs = self._eval(args.inputs, "--in")
        score = self._eval(args.score, "--score") if args.score else None
        resume = self._eval(args.resume, "--resume") if args.resume else None
        cluster = None
        if args.cluster:
            try:
                from .mapping_dask import cluster_client

                assert self.shell is not None
                cluster = cluster_client(args.cluster, self.shell.user_ns)
            except (ImportError, errors.InvalidArgument) as exc:
                raise UsageError(f"--cluster {args.cluster}: {exc}") from None
        respond = self._responder(args.respond)
        task = runner.schedule(pool_map(
            cell if not args.strategy else None, inputs, workers=args.workers, respond=respond,
            lib_paths=args.lib, timeout=self._timeout(args.timeout), score=score,
            resume=resume, strategy=args.strategy, cluster=cluster))
        try:
            df = self._run(task)
        except KeyboardInterrupt:
            if task.done() and not task.cancelled() and task.exception() is None:
                partial = task.result()
                self._store(args.out, partial)
                done = int((partial["state"] == "completed").sum())
                where = f"stored in {args.out}" if args.out else "pass --out NAME to keep it"
                print(f"%%pool_map stopped: {done} of {len(partial)} rows completed ({where}; "
                      "--resume NAME runs the rest)")
            raise
        if args.plot:
            display(map_figure({args.out or "map": df}))
        if not args.out:
            return df
        self._store(args.out, df)
        return map_summary(df).to_frame(args.out)


class _Progress:
    """A one-line progress display for long ``--respond`` runs, shown after a delay."""

    def __init__(self, name: str, after: float) -> None:
        self.name = name
        self.after = after
        self.start = time.monotonic()
        self.handle: Any = None

    def _show(self, text: str) -> None:
        if self.handle is None:
            self.handle = display(text, display_id=True)
        else:
            self.handle.update(text)

    def step(self, session: Session) -> None:
        """Observer of the session: every step, once ``after`` seconds have passed."""
        elapsed = time.monotonic() - self.start
        pending = len(session.pending)
        if elapsed >= self.after and pending:
            worker = session_progress(session)
            said = f"; {worker[0]}/{worker[1]} {worker[2]}".rstrip() if worker else ""
            self._show(f"{self.name}: session {session.id} - pause {session.pauses}, "
                       f"answering {pending} quer{'y' if pending == 1 else 'ies'} "
                       f"({elapsed:.1f} s){said}")

    def done(self, session: Session) -> None:
        if self.handle is not None:
            self._show(f"{self.name}: {session.state}, {session.pauses} pauses "
                       f"answered in {time.monotonic() - self.start:.1f} s")


async def _gather(conns: list[Connection], request: proto.Request,
                  timeout: float | None) -> list[Reply | errors.PoolError]:
    import asyncio

    results = await asyncio.gather(*(c.send(request, timeout=timeout) for c in conns),
                                   return_exceptions=True)
    out: list[Reply | errors.PoolError] = []
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, errors.PoolError):
            raise r
        out.append(r)
    return out


def complete_names(_shell: Any, event: Any) -> list[str]:
    """Tab completion: connection names, plus op names for ``%pool_send``."""
    ops = ["status", "shutdown"] if event.line.lstrip("%").startswith("pool_send") else []
    return [*manager.connections, *ops]
