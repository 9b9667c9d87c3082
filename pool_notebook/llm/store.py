"""The answers store: every model answer, recorded locally in SQLite for replay.

A recorded answer is found again by its request (provider, model, system, prompt,
max_tokens, temperature) and its *occurrence*: the n-th identical request of one
run. So a re-run replays the same answers in the same order, and the 8 samples of
a self-consistency batch stay 8 distinct entries. The file holds prompts and
answers in clear text: it is created 0600 and never leaves the machine unless
exported (:meth:`AnswerStore.export_jsonl`, e.g. to ship with a notebook).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AnswerStoreError
from ..registry import home

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SCHEMA_VERSION", "AnswerStore", "ChatRequest", "Recorded", "default_path"]

#: Bumped when the table changes; a store of another version is refused, not guessed at.
SCHEMA_VERSION = 1

#: The columns of the ``answers`` table, in order (also the fields of an exported line).
COLUMNS = ("key", "provider", "model", "system", "prompt", "max_tokens", "temperature",
           "occurrence", "text", "prompt_tokens", "completion_tokens", "finish_reason",
           "response_model", "latency_ms", "recorded_at")

_CREATE = """CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY, provider TEXT NOT NULL, model TEXT NOT NULL, system TEXT,
    prompt TEXT NOT NULL, max_tokens INTEGER, temperature REAL, occurrence INTEGER NOT NULL,
    text TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, finish_reason TEXT,
    response_model TEXT, latency_ms REAL, recorded_at TEXT NOT NULL)"""
_INSERT = (f"INSERT OR IGNORE INTO answers ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(COLUMNS))})")


def default_path() -> Path:
    """``$POOL_NOTEBOOK_ANSWERS``, else ``<home>/answers.sqlite``."""
    value = os.environ.get("POOL_NOTEBOOK_ANSWERS")
    return Path(value) if value else home() / "answers.sqlite"


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What is sent to the model for one query: the request half of the store's key."""

    provider: str
    model: str
    system: str | None
    prompt: str
    max_tokens: int | None
    temperature: float | None

    def key(self, occurrence: int) -> str:
        """The store key of the ``occurrence``-th (0-based) identical request of a run."""
        temperature = None if self.temperature is None else float(self.temperature)
        max_tokens = None if self.max_tokens is None else int(self.max_tokens)
        fields = [self.provider, self.model, self.system, self.prompt, max_tokens, temperature,
                  occurrence]
        return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Recorded:
    """One model answer as the provider gave it (or as the store kept it)."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    response_model: str | None = None
    latency_ms: float | None = None

    @property
    def usage(self) -> dict[str, int] | None:
        """algocline's ``usage`` for a continue, or None when the provider gave none."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        return {k: v for k, v in usage.items() if v is not None}


class AnswerStore:
    """Recorded answers in one SQLite file (0600), shared by every responder using it."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()  # one connection, used from the loop and the user's thread

    def __repr__(self) -> str:
        return f"<AnswerStore {self.path}>"

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # create it 0600 before SQLite opens it: prompts and answers are private
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(self.path, 0o600)
            db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if version != SCHEMA_VERSION and (version or tables):
                db.close()
                raise AnswerStoreError(
                    self.path, f"it has schema version {version}, this pool_notebook "
                    f"reads version {SCHEMA_VERSION}; use another path (store=...)")
            with db:
                db.execute(_CREATE)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise AnswerStoreError(self.path, str(exc)) from exc
        self._db = db
        return db

    @contextlib.contextmanager
    def _sql(self) -> Iterator[sqlite3.Connection]:
        """The open database inside a transaction; SQLite errors become AnswerStoreError."""
        with self._lock:
            db = self._connect()
            try:
                with db:
                    yield db
            except sqlite3.Error as exc:
                raise AnswerStoreError(self.path, str(exc)) from exc

    def get(self, request: ChatRequest, occurrence: int) -> Recorded | None:
        """The answer recorded for this occurrence of ``request``, if any."""
        with self._sql() as db:
            row = db.execute(
                "SELECT text, prompt_tokens, completion_tokens, finish_reason, response_model, "
                "latency_ms FROM answers WHERE key = ?", (request.key(occurrence),)).fetchone()
        return Recorded(*row) if row else None

    def put(self, request: ChatRequest, occurrence: int, answer: Recorded) -> None:
        """Record an answer (an answer already recorded under that key is kept)."""
        row = _row(request, occurrence, answer)
        with self._sql() as db:
            db.execute(_INSERT, row)

    def __len__(self) -> int:
        with self._sql() as db:
            count: int = db.execute("SELECT count(*) FROM answers").fetchone()[0]
        return count

    def _rows(self) -> list[tuple[Any, ...]]:
        with self._sql() as db:
            return db.execute(f"SELECT {', '.join(COLUMNS)} FROM answers "
                              "ORDER BY recorded_at, rowid").fetchall()

    def frame(self) -> pd.DataFrame:
        """Every recorded answer as a DataFrame, oldest first (to inspect or evaluate)."""
        import pandas as pd

        frame: pd.DataFrame = pd.DataFrame(self._rows(), columns=list(COLUMNS))
        return frame

    def export_jsonl(self, path: str | os.PathLike[str]) -> int:
        """Write every answer to ``path`` as JSON lines (to ship with a notebook); returns count."""
        rows = self._rows()
        with Path(path).open("w", encoding="utf-8") as out:
            for row in rows:
                record = dict(zip(COLUMNS, row, strict=True))
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return len(rows)

    def import_jsonl(self, path: str | os.PathLike[str]) -> int:
        """Add the answers of an exported file; returns how many were new.

        Answers already in this store are kept. Each line's key is recomputed from
        its request, so an edited or foreign line cannot shadow another request.
        """
        rows = []
        with Path(path).open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    rows.append(_parse_line(line, path, number))
        with self._sql() as db:
            before = db.total_changes
            db.executemany(_INSERT, rows)
            return db.total_changes - before

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _row(request: ChatRequest, occurrence: int, answer: Recorded,
         recorded_at: str | None = None) -> tuple[Any, ...]:
    return (request.key(occurrence), request.provider, request.model, request.system,
            request.prompt, request.max_tokens, request.temperature, occurrence, answer.text,
            answer.prompt_tokens, answer.completion_tokens, answer.finish_reason,
            answer.response_model, answer.latency_ms,
            recorded_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"))


def _parse_line(line: str, path: str | os.PathLike[str], number: int) -> tuple[Any, ...]:
    """One exported line back into a row, or AnswerStoreError naming the line."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, Mapping):
            raise TypeError("not a JSON object")
        request = ChatRequest(obj["provider"], obj["model"], obj["system"], obj["prompt"],
                              obj["max_tokens"], obj["temperature"])
        answer = Recorded(obj["text"], obj.get("prompt_tokens"), obj.get("completion_tokens"),
                          obj.get("finish_reason"), obj.get("response_model"),
                          obj.get("latency_ms"))
        if not isinstance(request.prompt, str) or not isinstance(answer.text, str):
            raise TypeError("prompt and text must be strings")
        return _row(request, int(obj["occurrence"]), answer, obj.get("recorded_at"))
    except (ValueError, KeyError, TypeError) as exc:
        raise AnswerStoreError(Path(path), f"line {number} is not an exported answer "
                               f"({type(exc).__name__}: {exc})") from exc
