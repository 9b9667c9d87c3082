"""The worker registry: which workers are alive, and where their sockets are.

Same format and rules as algocline's ``registry.json``, so a restarted kernel
can find live workers (ours under ``POOL_NOTEBOOK_HOME``, algocline's under
``ALC_HOME``) and reconnect to a paused session. Every read-modify-write holds
an exclusive ``flock`` on ``registry.lock``; writes go to a temp file in the
same directory, are fsynced and atomically renamed; files are 0600 in 0700
directories. A registry that exists but does not parse is an error, never an
empty list: treating it as empty would orphan live workers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RegistryCorrupted, RegistryError
from .security import ensure_private_dir

__all__ = ["LOG_FILE_ENV", "MAX_PID", "Registry", "WorkerEntry", "algocline_home", "home", "new_id",
           "pid_alive", "pool_dir", "valid_pid"]

_KNOWN = ("sid", "pid", "sock", "version", "created_at")
#: Set by the spawner for every worker: its ``<sid>.log`` in the pool directory. The
#: bundled worker removes that file when it exits cleanly (other workers ignore the
#: variable; :meth:`Registry.gc` removes the logs of workers that died).
LOG_FILE_ENV = "POOL_WORKER_LOG_FILE"
#: The largest pid a ``pid_t`` holds (algocline treats larger ones as dead, too).
MAX_PID = 2**31 - 1


def new_id(prefix: str) -> str:
    """An algocline-style id: ``<prefix>-<hex nanoseconds>-<16 hex>``.

    Worker sids use ``p`` (algocline's spawner), session ids ``s``
    (``algocline-engine``'s ``gen_session_id``).
    """
    return f"{prefix}-{time.time_ns():x}-{secrets.token_hex(8)}"


def valid_pid(value: object) -> bool:
    """True for an integer pid in 1..MAX_PID (booleans are not pids)."""
    return type(value) is int and 0 < value <= MAX_PID


def home() -> Path:
    """This package's state home: ``$POOL_NOTEBOOK_HOME`` or ``~/.pool_notebook``."""
    return Path(os.environ.get("POOL_NOTEBOOK_HOME") or Path.home() / ".pool_notebook")


def algocline_home() -> Path:
    """algocline's home: ``$ALC_HOME`` or ``~/.algocline``."""
    return Path(os.environ.get("ALC_HOME") or Path.home() / ".algocline")


def pool_dir(base: Path | None = None) -> Path:
    """Where sockets, logs and ``registry.json`` live: ``<home>/state/pool``."""
    return (base or home()) / "state" / "pool"


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (zombies count as dead: they will never answer).

    An invalid pid (see :func:`valid_pid`) is never alive.
    """
    if not valid_pid(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class WorkerEntry:
    """One registered worker; unknown keys from newer writers are kept in ``extra``."""

    sid: str
    pid: int
    sock: str
    version: str
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, sid: str, pid: int, sock: str, version: str) -> WorkerEntry:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        return cls(sid, pid, sock, version, now.replace("+00:00", "Z"))

    @classmethod
    def from_json(cls, obj: Any) -> WorkerEntry:
        if not isinstance(obj, dict):
            raise ValueError("an entry must be an object")
        sid, pid, sock = obj.get("sid"), obj.get("pid"), obj.get("sock")
        if not isinstance(sid, str) or not isinstance(sock, str):
            raise ValueError(f"entry needs string sid and sock: {obj!r}")
        extra = {k: v for k, v in obj.items() if k not in _KNOWN}
        if isinstance(pid, int) and valid_pid(pid):
            checked = pid
        else:  # kept as written (extra's "pid" wins in to_json); never alive: gc() drops it
            extra["pid"] = pid
            checked = 0
        return cls(sid, checked, sock, str(obj.get("version", "")), str(obj.get("created_at", "")),
                   extra)

    def to_json(self) -> dict[str, Any]:
        return {"sid": self.sid, "pid": self.pid, "sock": self.sock, "version": self.version,
                "created_at": self.created_at, **self.extra}

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)

    @property
    def age_seconds(self) -> float | None:
        try:
            created = dt.datetime.fromisoformat(self.created_at.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (dt.datetime.now(dt.timezone.utc) - created).total_seconds()


class Registry:
    """``registry.json`` plus its lock file, in one directory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name("registry.lock")

    @classmethod
    def default(cls) -> Registry:
        """This package's registry (``<POOL_NOTEBOOK_HOME>/state/pool/registry.json``)."""
        return cls(pool_dir() / "registry.json")

    @classmethod
    def algocline(cls) -> Registry:
        """algocline's own registry (read it to discover ``alc pool-worker`` processes)."""
        return cls(pool_dir(algocline_home()) / "registry.json")

    def entries(self) -> list[WorkerEntry]:
        """Every entry, dead or alive (readers need no lock: writes are atomic renames)."""
        return self._read()

    def find(self, sid: str) -> WorkerEntry | None:
        return next((e for e in self._read() if e.sid == sid), None)

    def add(self, entry: WorkerEntry) -> None:
        """Add ``entry`` (replacing one with the same sid)."""
        self._update(lambda es: [*(e for e in es if e.sid != entry.sid), entry])

    def remove(self, sid: str, *, pid: int | None = None) -> bool:
        """Drop ``sid`` (only if it has ``pid``, when given); True if it was there."""
        removed: list[WorkerEntry] = []

        def drop(es: list[WorkerEntry]) -> list[WorkerEntry]:
            keep = [e for e in es if not (e.sid == sid and (pid is None or e.pid == pid))]
            removed.extend(e for e in es if e not in keep)
            return keep

        self._update(drop)
        return bool(removed)

    def gc(self) -> list[WorkerEntry]:
        """Prune entries whose process is gone (or whose pid is invalid); returns them.

        A pruned worker's ``<sid>.log`` beside the registry goes too: only a
        worker that crashed leaves one behind (a clean exit removes its own).
        """
        pruned: list[WorkerEntry] = []

        def prune(es: list[WorkerEntry]) -> list[WorkerEntry]:
            live = [e for e in es if e.alive]
            pruned.extend(e for e in es if e not in live)
            return live

        self._update(prune)
        for entry in pruned:
            if os.path.basename(entry.sid) == entry.sid and not entry.sid.startswith("."):
                with contextlib.suppress(OSError):
                    (self.path.parent / f"{entry.sid}.log").unlink()
        return pruned

    # ------------------------------------------------------------- internals

    def _read(self) -> list[WorkerEntry]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RegistryError(f"cannot read worker registry {self.path}: {exc}") from exc
        try:
            obj = json.loads(raw)
            sessions = obj["sessions"] if isinstance(obj, dict) else None
            if not isinstance(sessions, list):
                raise ValueError("no 'sessions' list")
            return [WorkerEntry.from_json(e) for e in sessions]
        except (ValueError, KeyError, UnicodeDecodeError, RecursionError) as exc:
            raise RegistryCorrupted(str(self.path), str(exc)) from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            ensure_private_dir(self.path.parent)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RegistryError(f"cannot open registry lock {self.lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _update(self, change: Callable[[list[WorkerEntry]], list[WorkerEntry]]) -> None:
        with self._locked():
            entries = change(self._read())
            data = json.dumps({"sessions": [e.to_json() for e in entries]}, indent=2).encode()
            try:
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-",
                                           suffix=".tmp")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.chmod(tmp, 0o600)
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            except OSError as exc:
                raise RegistryError(f"cannot write worker registry {self.path}: {exc}") from exc
