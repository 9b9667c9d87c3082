"""The Lua sandbox of the bundled worker: a capability allowlist, on by default.

:func:`install_sandbox` runs ``sandbox.lua`` once per Lua runtime, before any
user code. The global table is emptied and refilled with fresh tables holding
only granted functions (see ``docs/sandbox.md``): the base library without
C loading or binary chunks, ``string``/``table``/``math``/``utf8``/``coroutine``,
``os.time/clock/date/difftime``, an ``os.getenv`` that answers ``ALC_*`` names
and the names in :attr:`SandboxPolicy.allow_env`, read-only ``io`` for files
under the readable roots, and ``print``/``io.write``/``io.stderr`` into the
session log. This module holds the host side of those grants: the path check
every file read goes through, the compile cache of Lua files, the environment
filter and the log sink.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import InvalidArgument
from ..registry import algocline_home

__all__ = ["LogSink", "Sandbox", "SandboxPolicy", "install_sandbox", "module_path",
           "package_dirs"]

log = logging.getLogger("pool_notebook.worker.lua")

#: ``(level, source, message)``: where ``print``, ``io.write`` and ``warn`` output goes.
LogSink = Callable[[str, str, str], None]

#: Files readable wherever they are (flow/util.lua seeds its RNG from here).
_DEVICES = frozenset({"/dev/urandom"})

_OUTSIDE = ("is outside the directories the sandbox may read (lib_paths, the package "
            "directories, the scenarios directory; run the worker with --no-sandbox or "
            "put the file under lib_paths)")
_NOT_FILE = "is not a regular file (the sandbox reads regular files only)"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_O_PATH: int | None = getattr(os, "O_PATH", None) if os.path.isdir("/proc/self/fd") else None


def _env_key() -> tuple[str | None, ...]:
    return tuple(os.environ.get(name) for name in ("ALC_PACKAGES_PATH", "ALC_HOME", "HOME"))


@functools.lru_cache(maxsize=8)
def _algocline_dirs(env: tuple[str | None, ...]) -> tuple[tuple[str, ...], str]:
    """(package directory candidates, scenarios directory) for these environment
    values (parsed once: a VM is built per session)."""
    listed = [p for p in (env[0] or "").split(os.pathsep) if p]
    listed.append(str(algocline_home() / "packages"))
    return tuple(dict.fromkeys(listed)), str(algocline_home() / "scenarios")


def package_dirs() -> tuple[str, ...]:
    """Where algocline packages live, in its order: ``$ALC_PACKAGES_PATH``, then
    ``<ALC_HOME or ~/.algocline>/packages`` (existing directories only)."""
    return tuple(p for p in _algocline_dirs(_env_key())[0] if os.path.isdir(p))


def _scenarios_dir() -> str:
    return _algocline_dirs(_env_key())[1]


def _templates(dirs: Iterable[str]) -> str:
    return ";".join(f"{d}/?.lua;{d}/?/init.lua" for d in dirs)


def module_path(lib_paths: Sequence[str] = ()) -> str:
    """The ``package.path`` part ``require`` searches first: ``lib_paths``, then
    :func:`package_dirs` (for ``--no-sandbox`` runtimes; the sandbox sets its own)."""
    return _templates([*lib_paths, *package_dirs()])


def _default_log(level: str, source: str, message: str) -> None:
    number = logging.WARNING if level == "warn" else logging.INFO
    log.log(number, "[%s] %s", source, message)


@dataclass(frozen=True)
class SandboxPolicy:
    """What sandboxed Lua may use beyond the pure libraries (worker-wide).

    ``allow_env``: environment names ``os.getenv`` answers besides ``ALC_*``
    (the worker's ``--allow-env NAME``). ``log``: receives ``print``/``io.write``
    (level ``info``) and ``io.stderr:write``/``warn`` (level ``warn``) output.
    ``package_dirs`` and ``scenarios_dir`` are readable (and the former
    searched by ``require``) besides each session's ``lib_paths``.
    """

    allow_env: frozenset[str] = frozenset()
    log: LogSink = _default_log
    package_dirs: tuple[str, ...] = field(default_factory=package_dirs)
    scenarios_dir: str = field(default_factory=_scenarios_dir)

    def __post_init__(self) -> None:
        bad = sorted(n for n in self.allow_env if not _ENV_NAME.fullmatch(n))
        if bad:
            raise InvalidArgument("--allow-env: not an environment variable name (letters, "
                                  f"digits and _, not starting with a digit): {', '.join(bad)}")

    def getenv(self, name: str) -> str | None:
        """The value ``os.getenv(name)`` gives sandboxed code (``None``: not granted)."""
        if name.startswith("ALC_") or name in self.allow_env:
            return os.environ.get(name)
        return None


class Sandbox:
    """The sandbox installed in one Lua runtime (see :func:`install_sandbox`)."""

    def __init__(self, lua: Any, policy: SandboxPolicy) -> None:
        self.policy = policy
        self._roots = _roots((*policy.package_dirs, policy.scenarios_dir))
        self._compiler = _compiler(lua.__class__)
        chunk = lua.eval("load")(_bytecode(lua.__class__), "=<sandbox>", "b")
        host = lua.table_from({"resolve": self.resolve, "compiled": self.compiled,
                               "getenv": policy.getenv, "log": policy.log,
                               "devices": lua.table_from(dict.fromkeys(_DEVICES, True))})
        self._prepend_path: Callable[[str], None] = chunk(host)
        self._prepend_path(_templates(policy.package_dirs))

    def add_lib_paths(self, lib_paths: Sequence[str]) -> None:
        """Make ``lib_paths`` readable and search them first in ``require``."""
        if lib_paths:
            self._roots[:0] = _roots(lib_paths)
            self._prepend_path(_templates(lib_paths))

    def resolve(self, path: str) -> str:
        """The real path if sandboxed code may read ``path``, else why not
        (``"missing"``: a missing file inside the roots). Symlinks are resolved
        first, so a link under a root that points outside is outside."""
        try:
            real, mode = _inspect(path)
        except (FileNotFoundError, NotADirectoryError):
            return "missing" if self._inside(os.path.abspath(path)) else _OUTSIDE
        except PermissionError:
            return _OUTSIDE if not self._inside(os.path.abspath(path)) else "is not readable"
        except (ValueError, OSError):  # NUL byte, symlink loop
            return "is not a usable path"
        if real in _DEVICES:
            return real
        if not self._inside(real):
            return _OUTSIDE
        return real if stat.S_ISREG(mode) else _NOT_FILE

    def _inside(self, path: str) -> bool:
        return any(_under(path, root) for root in self._roots)

    def compiled(self, real: str, chunkname: str) -> bytes | str:
        """Bytecode of the Lua text file ``real`` (a path :meth:`resolve` gave),
        compiled here as text and cached per process by path, mtime, size and
        inode; or the error text. Loading bytecode costs a fifth of parsing,
        and ``require`` of a package parses the same files in every session."""
        try:
            st = os.stat(real)
        except OSError as exc:
            return f"cannot read {real}: {exc.strerror}"
        if st.st_size > _MAX_SOURCE:
            return f"{real} is larger than the {_MAX_SOURCE >> 20} MiB a Lua file may have here"
        key = (chunkname, real, st.st_mtime_ns, st.st_size, st.st_ino)
        with _COMPILING:  # VMs may be built and run on different threads
            code = _COMPILED.get(key)
            if code is None:
                code = _compile(self._compiler, real, chunkname)
                _COMPILED.put(key, code)
        return code


def _roots(dirs: Iterable[str]) -> list[str]:
    """Each directory as given (absolute) and as its real path (for misses and hits)."""
    return list(dict.fromkeys(f(d) for d in dirs for f in (os.path.abspath, os.path.realpath)))


def _inspect(path: str) -> tuple[str, int]:
    """The real path of ``path`` and its mode, without opening the file itself
    (``O_PATH``: no blocking on FIFOs, no device side effects; 4 syscalls where
    ``realpath`` takes one ``lstat`` per component)."""
    if _O_PATH is None:
        real = os.path.realpath(path, strict=True)
        return real, os.stat(real).st_mode
    fd = os.open(path, _O_PATH | os.O_CLOEXEC)
    try:
        return os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_mode
    finally:
        os.close(fd)


class _ByteCache:
    """A least-recently-used map whose values' total length stays within a budget."""

    def __init__(self, budget: int) -> None:
        self._items: OrderedDict[tuple[Any, ...], bytes | str] = OrderedDict()
        self._size = 0
        self._budget = budget

    def get(self, key: tuple[Any, ...]) -> bytes | str | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple[Any, ...], value: bytes | str) -> None:
        old = self._items.pop(key, None)
        self._size += len(value) - (len(old) if old is not None else 0)
        self._items[key] = value
        while self._size > self._budget and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self._size -= len(dropped)


_MAX_SOURCE = 16 << 20
_COMPILED = _ByteCache(64 << 20)
_COMPILING = threading.Lock()
_COMPILE = """function(text, name)
  local fn, err = load(text, name, 't')
  if not fn then return err end
  return string.dump(fn)
end"""


@functools.cache
def _compiler(runtime_class: type) -> Any:
    """A Lua function (in a private runtime) turning source text into bytecode,
    or into the error text; it only compiles, as text, and never runs anything."""
    return runtime_class(encoding=None).eval(_COMPILE)


def _compile(compiler: Any, path: str, chunkname: str) -> bytes | str:
    try:  # non-blocking and re-checked: the file may have been swapped since resolve()
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return f"{path} {_NOT_FILE}"
            text = f.read()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if text.startswith(b"#"):  # a #! line, skipped as lua.c and loadfile do
        text = b"--" + text
    code: bytes = compiler(text, chunkname.encode("utf-8"))
    return code if code.startswith(b"\x1bLua") else code.decode("utf-8", "replace")


@functools.cache
def _bytecode(runtime_class: type) -> bytes:
    """``sandbox.lua`` itself, compiled once per process (see :meth:`Sandbox.compiled`)."""
    source = resources.files(__package__).joinpath("sandbox.lua").read_bytes()
    code = _compiler(runtime_class)(source, b"=<sandbox>")
    assert isinstance(code, bytes) and code.startswith(b"\x1bLua"), code
    return code


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def install_sandbox(lua: Any, policy: SandboxPolicy | None = None, *,
                    lib_paths: Sequence[str] = ()) -> Sandbox:
    """Replace the globals of ``lua`` (a fresh ``lupa`` runtime) by the sandbox.

    Call before running any code that is not the host's own. Returns the
    :class:`Sandbox`; ``lib_paths`` (here or later through
    :meth:`~Sandbox.add_lib_paths`) are readable and searched first.
    """
    sandbox = Sandbox(lua, policy or SandboxPolicy())
    sandbox.add_lib_paths(lib_paths)
    return sandbox
