"""The Lua sandbox, over the wire: escape attempts against a real worker, and its grants.

One worker, spawned as by default (sandbox on), serves the whole module; every
escape attempt must fail with a clear Lua error, and the same connection must
then run the next request normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lupa import lua54

from pool_notebook import Completed, Failed, Finished, PoolClient
from pool_notebook.errors import InvalidArgument
from pool_notebook.spawn import DEFAULT_COMMAND, WorkerProcess, spawn_and_connect
from pool_notebook.worker.sandbox import SandboxPolicy, install_sandbox, module_path

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
PACKAGES = CORPUS / "algocline-bundled-packages"
SECRET = "s3cr3t-value-must-not-leak"
ALLOWED = "POOL_SBX_ALLOWED"


@dataclass
class Wire:
    """One worker and one client, driven from one event loop for the whole module."""

    runner: asyncio.Runner
    client: PoolClient
    worker: WorkerProcess
    ctx: dict[str, str]
    lib: Path

    def run(self, code: str) -> Finished:
        feed = self.runner.run(self.client.run(code, ctx=self.ctx, lib_paths=[str(self.lib)],
                                               timeout=30))
        assert isinstance(feed.feed_result, Finished), feed.feed_result
        return feed.feed_result

    def error(self, code: str) -> str:
        outcome = self.run(code).outcome
        assert isinstance(outcome, Failed), f"not blocked: {outcome}"
        return outcome.error

    def value(self, code: str) -> Any:
        outcome = self.run(code).outcome
        assert isinstance(outcome, Completed), outcome
        return outcome.result


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


@contextlib.contextmanager
def _home() -> Iterator[Path]:
    """A private worker/algocline home for the module (pool_home is per test)."""
    home = Path(tempfile.mkdtemp(prefix="pn-sbx-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POOL_NOTEBOOK_HOME", str(home))
        mp.setenv("ALC_HOME", str(home / "alc"))
        mp.setenv("ALC_PACKAGES_PATH", str(home / "extra-packages"))
        mp.setenv("ALC_SBX_PROBE", "alc-probe-value")
        mp.setenv(ALLOWED, "allowed-value")
        mp.setenv("POOL_SBX_SECRET", SECRET)
        yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    with _home() as home:
        lib, outside = home / "lib", home / "outside"
        _write_tree(outside, {"secret.txt": SECRET, "secret.lua": f"return '{SECRET}'"})
        _write_tree(lib, {
            "data.txt": "hello from lib\nsecond line\n",
            "mod_ok.lua": "return { answer = 42, args = { ... } }",
            "shebang.lua": "#!/usr/bin/env lua\nreturn 'ran'",
            "forkprobe/init.lua": "return {run = function() return io.popen('id'):read('a') end}",
        })
        (lib / "link_out.txt").symlink_to(outside / "secret.txt")
        (lib / "linked.lua").symlink_to(outside / "secret.lua")
        (lib / "etc_link").symlink_to("/etc")
        os.mkfifo(lib / "fifo")
        binary = lua54.LuaRuntime(encoding=None).eval("string.dump(function() return os end)")
        (lib / "evil_bin.lua").write_bytes(binary)
        _write_tree(home / "alc", {
            "packages/home_pkg/init.lua": "return { where = 'alc home packages' }",
            "scenarios/demo.lua": "return { cases = { 'c1' } }",
        })
        _write_tree(home / "extra-packages", {"env_pkg.lua": "return 'ALC_PACKAGES_PATH'"})
        ctx = {"lib": str(lib), "outside": str(outside), "site": site.getsitepackages()[0],
               "binhex": binary.hex(), "victim": str(outside / "secret.txt")}
        with asyncio.Runner() as runner:
            command = f"{DEFAULT_COMMAND} --allow-env {ALLOWED}"
            client, worker = runner.run(spawn_and_connect(command))
            try:
                yield Wire(runner, client, worker, ctx, lib)
            finally:
                with contextlib.suppress(Exception):
                    runner.run(client.shutdown(timeout=5))
                client.close()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Attempt:
    """Lua that only succeeds if it escapes; ``blocked`` is in the error it must raise."""

    id: str
    code: str
    blocked: str


NA = "is not available in the sandbox"
OUTSIDE = "outside the directories the sandbox may read"
# Finds a Python (lupa) object anywhere under _G, or fails saying there is none.
FIND_HOST_OBJECT = """
local seen = {}
local function find(v, depth)
  if type(v) == 'userdata' then return v end
  if type(v) ~= 'table' or seen[v] or depth > 6 then return nil end
  seen[v] = true
  for _, x in pairs(v) do
    local found = find(x, depth + 1)
    if found then return found end
  end
end
local obj = find(_G, 0)
if obj == nil then error('no host object is reachable from _G') end
"""
BINARY = "local bin = ctx.binhex:gsub('..', function(h) return string.char(tonumber(h, 16)) end)\n"

ATTEMPTS = [
    # issue 12 "Why": originals through package.loaded/require, host upvalues, path leaks
    Attempt("require-io-popen", "return require('io').popen('id'):read('a')", f"io.popen {NA}"),
    Attempt("require-debug", "return require('debug').getupvalue(print, 1)",
            f"debug.getupvalue {NA}"),
    Attempt("require-python", "return require('python').eval('1')", f"module 'python' {NA}"),
    Attempt("require-lupa", "return require('lupa')", f"module 'lupa' {NA}"),
    Attempt("read-etc-shadow", "return io.open('/etc/shadow'):read('a')", OUTSIDE),
    Attempt("read-proc-environ", "return io.open('/proc/self/environ'):read('a')", OUTSIDE),
    Attempt("write-pth-file", "return io.open(ctx.site .. '/pn_escape.pth', 'w')",
            "files are read-only in the sandbox"),
    Attempt("searcher-upvalue-host", "return debug.getupvalue(package.searchers[2], 2)",
            f"debug.getupvalue {NA}"),
    Attempt("package-path-etc", "package.path = '/etc/?'; return require('passwd')",
            f"no file '/etc/passwd' ({OUTSIDE})"),
    Attempt("package-path-proc-environ",
            "package.path = '/proc/self/?'; return require('environ')", OUTSIDE),
    Attempt("package-path-traversal",
            "package.path = ctx.lib .. '/../outside/?.txt'; return require('secret')", OUTSIDE),
    Attempt("package-loaded-io", "return package.loaded.io.popen('id')", f"io.popen {NA}"),
    Attempt("package-loaded-os", "return package.loaded['os'].execute('id')", f"os.execute {NA}"),
    Attempt("package-loaded-debug", "return package.loaded.debug.getregistry()",
            f"debug.getregistry {NA}"),
    Attempt("package-loaded-python", "return package.loaded.python.eval('1')",
            "attempt to index a nil value (field 'python')"),
    Attempt("global-python-eval", "return python.eval('__import__(\"os\").system(\"id\")')",
            "attempt to index a nil value (global 'python')"),
    # every standard-library entry point that reaches outside
    Attempt("os-execute", "return os.execute('id')", f"os.execute {NA}"),
    Attempt("os-exit", "return os.exit(0)", f"os.exit {NA}"),
    Attempt("os-remove", "return os.remove(ctx.victim)", f"os.remove {NA}"),
    Attempt("os-rename", "return os.rename(ctx.victim, ctx.victim .. '.x')", f"os.rename {NA}"),
    Attempt("os-tmpname", "return os.tmpname()", f"os.tmpname {NA}"),
    Attempt("os-setlocale", "return os.setlocale('C')", f"os.setlocale {NA}"),
    Attempt("os-getenv-secret", "return assert(os.getenv('POOL_SBX_SECRET'), 'getenv: nothing')",
            "getenv: nothing"),
    Attempt("io-popen", "return io.popen('id')", f"io.popen {NA}"),
    Attempt("io-tmpfile", "return io.tmpfile()", f"io.tmpfile {NA}"),
    Attempt("io-output-file", "return io.output(ctx.lib .. '/out.txt')",
            f"io.output: writing files {NA}"),
    Attempt("io-open-append", "return io.open(ctx.lib .. '/data.txt', 'a')",
            "files are read-only in the sandbox"),
    Attempt("io-open-update", "return io.open(ctx.lib .. '/data.txt', 'r+')",
            "files are read-only in the sandbox"),
    Attempt("io-write-readonly-handle",
            "return assert(io.open(ctx.lib .. '/data.txt'):write('pwned'))",
            "Bad file descriptor"),
    Attempt("io-lines-outside", "for l in io.lines('/etc/passwd') do return l end", OUTSIDE),
    Attempt("io-input-outside", "io.input('/etc/passwd'); return io.read('a')", OUTSIDE),
    Attempt("io-read-stdin", "return io.read('a')", "io.read: no default input file"),
    Attempt("io-stdin", "return io.stdin:read('a')", f"io.stdin {NA}"),
    Attempt("loadfile-outside", "return loadfile('/etc/passwd')", OUTSIDE),
    Attempt("dofile-outside", "return dofile(ctx.outside .. '/secret.lua')", OUTSIDE),
    Attempt("dofile-stdin", "return dofile()", f"dofile: reading standard input {NA}"),
    Attempt("package-loadlib", "return package.loadlib('libc.so.6', 'system')",
            f"package.loadlib (C modules) {NA}"),
    Attempt("package-cpath-c-module",
            "package.cpath = '/usr/lib/x86_64-linux-gnu/lua/5.4/?.so;/tmp/?.so'; "
            "return require('lpeg')", "C modules are not available in the sandbox"),
    Attempt("searchpath-probe", "return assert(package.searchpath('passwd', '/etc/?'))", OUTSIDE),
    # binary chunks and string.dump
    Attempt("string-dump", "return string.dump(print)", f"string.dump {NA}"),
    Attempt("string-method-dump", "return ('x').dump(print)", f"string.dump {NA}"),
    Attempt("load-binary", BINARY + "return assert(load(bin))()",
            "load: binary chunks are not available in the sandbox"),
    Attempt("load-binary-mode-b", BINARY + "return assert(load(bin, 'x', 'b'))()",
            "binary chunks are not available in the sandbox"),
    Attempt("load-binary-reader", BINARY + "local done = false\n"
            "return assert(load(function() if done then return nil end done = true "
            "return bin end))()", "binary chunks are not available in the sandbox"),
    Attempt("require-binary-module", "return require('evil_bin')",
            "binary chunks are not available in the sandbox"),
    # debug, in full
    Attempt("debug-getregistry", "return debug.getregistry()._LOADED.io.popen('id')",
            f"debug.getregistry {NA}"),
    Attempt("debug-getinfo-func", "return debug.getinfo(1, 'f').func", f"debug.getinfo {NA}"),
    Attempt("debug-sethook", "return debug.sethook(print, 'l')", f"debug.sethook {NA}"),
    Attempt("debug-getlocal", "return debug.getlocal(1, 1)", f"debug.getlocal {NA}"),
    Attempt("debug-setupvalue", "return debug.setupvalue(print, 1, {})",
            f"debug.setupvalue {NA}"),
    Attempt("debug-upvaluejoin", "return debug.upvaluejoin(print, 1, require, 1)",
            f"debug.upvaluejoin {NA}"),
    Attempt("debug-getmetatable-string", "return debug.getmetatable('').__index.dump(print)",
            f"debug.getmetatable {NA}"),
    Attempt("debug-setmetatable-number", "return debug.setmetatable(1, {__index = os})",
            f"debug.setmetatable {NA}"),
    Attempt("alc-function-upvalue", "return debug.getupvalue(alc.llm, 1)",
            f"debug.getupvalue {NA}"),
    # metatables of strings, numbers and host objects
    Attempt("string-metatable-index-dump", "return getmetatable('').__index.dump(print)",
            f"string.dump {NA}"),
    Attempt("string-metatable-rawget", "return rawget(getmetatable(''), '__index').dump(print)",
            f"string.dump {NA}"),
    Attempt("string-metatable-swap",
            "getmetatable('').__index = {len = function() return 'pwned' end}\n"
            "return assert(('x'):len() == 'pwned', 'string metatable is protected')",
            "string metatable is protected"),
    Attempt("string-metatable-setmetatable",
            "local mt = getmetatable(''); setmetatable(mt, {__index = os})\n"
            "return ('x').execute('id')", "attempt to call a nil value (field 'execute')"),
    Attempt("number-metatable",
            "return assert(getmetatable(1), 'numbers have no metatable').__index",
            "numbers have no metatable"),
    Attempt("host-object-attribute", FIND_HOST_OBJECT + "return obj.__class__",
            "no host object is reachable from _G|Python objects are opaque"),
    Attempt("host-object-metatable-gc", FIND_HOST_OBJECT +
            "local mt = getmetatable(obj)\n"
            "assert(type(mt) == 'table', 'metatable: ' .. tostring(mt))\nreturn mt.__gc(obj)",
            "no host object is reachable from _G|metatable: host object"),
    Attempt("find-host-table", """
        local seen = {}
        local function find(t, depth)
          if seen[t] or depth > 8 then return nil end
          seen[t] = true
          if rawget(t, 'resolve') or rawget(t, 'compiled') or rawget(t, 'pause')
             or rawget(t, 'read_source') then return t end
          for k, v in pairs(t) do
            if type(v) == 'table' then local hit = find(v, depth + 1) if hit then return hit end end
            if type(k) == 'table' then local hit = find(k, depth + 1) if hit then return hit end end
          end
          local mt = getmetatable(t)
          if type(mt) == 'table' then return find(mt, depth + 1) end
        end
        local host = find(_G, 0) or find(getmetatable(''), 0)
        if not host then error('no host table is reachable', 0) end
        return (host.resolve or host.read_source)('/etc/passwd')
    """, "no host table is reachable"),
    Attempt("file-metatable", "local f = io.open(ctx.lib .. '/data.txt')\n"
            "local mt = getmetatable(f)\n"
            "assert(type(mt) == 'table', 'file metatable: ' .. tostring(mt))\n"
            "return mt.__index.write(f, 'x')", "file metatable: host object"),
    Attempt("stdout-metatable", "local mt = getmetatable(io.stdout)\n"
            "assert(type(mt) == 'table', 'stdout metatable: ' .. tostring(mt))",
            "stdout metatable: sandbox file"),
    # load with an environment, _G/_ENV swaps, rawget/rawset
    Attempt("load-custom-env-globals",
            "local g = load('return _G', 'x', 't', {})() or load('return _ENV')()\n"
            "return g.io.popen('id')", f"io.popen {NA}"),
    Attempt("load-env-nil", "return load('return io', 'x', 't', nil)()",
            "attempt to index a nil value (upvalue '_ENV')"),
    Attempt("env-swap", "local _ENV = setmetatable({}, {__index = _G})\n"
            "return os.execute('id')", f"os.execute {NA}"),
    Attempt("setmetatable-G-index",
            "setmetatable(_G, {__index = function(_, k) return rawget(package.loaded, k) end})\n"
            "return python.eval('1')", "attempt to index a nil value (global 'python')"),
    Attempt("rawget-G-python", "return assert(rawget(_G, 'python'), 'no python in _G')",
            "no python in _G"),
    Attempt("rawget-loaded-python",
            "return assert(rawget(package.loaded, 'python'), 'no python in package.loaded')",
            "no python in package.loaded"),
    Attempt("rawset-loaded-then-require",
            "rawset(package.loaded, 'io', nil); return require('io').popen('id')",
            "module 'io' not found"),
    Attempt("fork-child-vm", "local r = alc.fork({'forkprobe'}, {})[1]\n"
            "error(tostring(r.error or r.result), 0)", f"io.popen {NA}"),
    # coroutines and error objects
    Attempt("coroutine-wrap-registry",
            "return coroutine.wrap(function() return debug.getregistry() end)()",
            f"debug.getregistry {NA}"),
    Attempt("coroutine-error-object",
            "local co = coroutine.create(function() error({lib = io}) end)\n"
            "local _, e = coroutine.resume(co); return e.lib.popen('id')", f"io.popen {NA}"),
    Attempt("error-object-functions",
            "local _, e = pcall(error, {open = io.open, exec = os.execute})\n"
            "return e.exec('id')", f"os.execute {NA}"),
    Attempt("xpcall-handler",
            "local _, r = xpcall(function() error('x') end,\n"
            "  function() return select(2, pcall(debug.getregistry)) end)\n"
            "error(r, 0)", f"debug.getregistry {NA}"),
    Attempt("collectgarbage-stop", "return collectgarbage('stop')",
            f"collectgarbage('stop') {NA}"),
    Attempt("collectgarbage-generational", "return collectgarbage('generational')",
            f"collectgarbage('generational') {NA}"),
    Attempt("gc-finalizer", "return setmetatable({}, {__gc = function() while true do end end})",
            "__gc finalizers are not available in the sandbox"),
    # the file policy: symlinks, traversal, odd files
    Attempt("symlink-file-outside", "return io.open(ctx.lib .. '/link_out.txt'):read('a')",
            OUTSIDE),
    Attempt("symlink-dir-outside", "return io.open(ctx.lib .. '/etc_link/passwd'):read('a')",
            OUTSIDE),
    Attempt("symlink-module-outside", "return require('linked')", OUTSIDE),
    Attempt("dotdot-traversal", "return io.open(ctx.lib .. '/../outside/secret.txt')", OUTSIDE),
    Attempt("relative-path", "return io.open('../../../../../../etc/passwd')", OUTSIDE),
    Attempt("nul-byte-path", "return io.open(ctx.lib .. '/data.txt\\0/etc/passwd')",
            "is not a usable path"),
    Attempt("non-utf8-path", "return io.open('/etc/\\255passwd')", "the path is not valid UTF-8"),
    Attempt("fifo-under-lib", "return io.open(ctx.lib .. '/fifo'):read('a')",
            "is not a regular file"),
    Attempt("urandom-read-all", "return io.open('/dev/urandom', 'rb'):read('a')",
            "can be read by byte count"),
    Attempt("urandom-read-line", "return io.open('/dev/urandom', 'rb'):read()",
            "needs a byte count"),
    Attempt("urandom-lines", "for l in io.lines('/dev/urandom') do return l end", "is a device"),
    Attempt("proc-fd", "return io.open('/proc/self/fd/0'):read('a')", OUTSIDE),
    Attempt("table-move-endless-c-loop", "return table.move({}, 1, 2^40, 1, {})",
            "table.move: 1099511627776 elements are more than the sandbox moves at once"),
    Attempt("table-insert-len-c-loop",
            "local t = setmetatable({}, {__len = function() return 1 << 60 end})\n"
            "table.insert(t, 1, 'x')", "table.insert: shifting 1152921504606846976 elements"),
    Attempt("table-remove-len-c-loop",
            "local t = setmetatable({}, {__len = function() return 1 << 60 end})\n"
            "return table.remove(t, 1)", "table.remove: shifting 1152921504606846976 elements"),
    Attempt("urandom-as-module", "package.path = '/dev/?'; return require('urandom')",
            "no file '/dev/urandom' (a device)"),
    Attempt("urandom-as-input", "io.input('/dev/urandom'); return io.read('a')", "is a device"),
    Attempt("exhaust-file-descriptors",
            "local held = {}\nfor i = 1, 5000 do held[i] = io.open(ctx.lib .. '/data.txt') end",
            "files are open; close some first"),
]


def test_at_least_fifty_distinct_attempts() -> None:
    assert len({a.id for a in ATTEMPTS}) == len(ATTEMPTS) >= 50


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[a.id for a in ATTEMPTS])
def test_escape_attempt_is_blocked(wire: Wire, attempt: Attempt) -> None:
    error = wire.error(attempt.code)
    assert any(part in error for part in attempt.blocked.split("|")), error
    assert SECRET not in error and "root:x:0:0" not in error
    assert wire.value("return 6 * 7") == 42  # the same connection goes on normally


def test_blocked_attempts_left_files_alone(wire: Wire) -> None:
    for attempt in ("write-pth-file", "os-remove", "os-rename", "io-write-readonly-handle"):
        wire.error(next(a.code for a in ATTEMPTS if a.id == attempt))
    assert not Path(wire.ctx["site"], "pn_escape.pth").exists()
    assert Path(wire.ctx["victim"]).read_text() == SECRET
    assert (wire.lib / "data.txt").read_text().startswith("hello from lib")
    assert not (wire.lib / "out.txt").exists()


def test_every_dangerous_name_anywhere_is_a_stub(wire: Wire) -> None:
    """Walk every table reachable from _G: each function stored under a dangerous
    name of io, os, string, package or debug fails naming the sandbox."""
    found = wire.value("""
        local safe_debug = {traceback = true}
        local danger = {io = {popen = 1, tmpfile = 1}, string = {dump = 1},
          os = {execute = 1, exit = 1, remove = 1, rename = 1, tmpname = 1, setlocale = 1},
          package = {loadlib = 1}, debug = setmetatable({}, {__index = function(_, k)
            return not safe_debug[k] end})}
        local seen, checked = {}, {}
        local function walk(t, path, module)
          if seen[t] then return end
          seen[t] = true
          for k, v in pairs(t) do
            local p = path .. '.' .. tostring(k)
            if type(v) == 'table' then walk(v, p, k)
            elseif type(v) == 'function' and danger[module] and danger[module][k] then
              local ok, err = pcall(v)
              assert(not ok and tostring(err):find('not available in the sandbox', 1, true),
                     p .. ' is callable: ' .. tostring(err))
              checked[#checked + 1] = module .. '.' .. k
            end
          end
        end
        walk(_G, '_G')
        table.sort(checked)
        return checked
    """)
    assert {"io.popen", "io.tmpfile", "os.execute", "os.remove", "string.dump",
            "package.loadlib", "debug.getupvalue", "debug.sethook"} <= set(found)


# ------------------------------------------------------------------ what is granted


def test_getenv_answers_alc_names_and_allowed_names_only(wire: Wire) -> None:
    assert wire.value(f"""return {{os.getenv('ALC_SBX_PROBE'), os.getenv('{ALLOWED}'),
                                   os.getenv('POOL_SBX_SECRET') == nil, os.getenv('PATH') == nil,
                                   os.getenv('ALC_UNSET') == nil}}""") == [
        "alc-probe-value", "allowed-value", True, True, True]


def test_reads_under_lib_paths(wire: Wire) -> None:
    assert wire.value("""
        local f = assert(io.open(ctx.lib .. '/data.txt'))
        local first = f:read('l'); f:close()
        local lines = {}
        for l in io.lines(ctx.lib .. '/data.txt') do lines[#lines + 1] = l end
        io.input(ctx.lib .. '/data.txt')
        local missing, err = io.open(ctx.lib .. '/nope.txt')
        return {first, lines[2], io.read('l'), missing == nil, err}
    """) == ["hello from lib", "second line", "hello from lib", True,
             f"{wire.lib}/nope.txt: No such file or directory"]


def test_require_loadfile_and_dofile_under_the_roots(wire: Wire) -> None:
    assert wire.value("""
        local m = require('mod_ok')
        return {m.answer, m.args[1], require('mod_ok') == m, dofile(ctx.lib .. '/shebang.lua'),
                loadfile(ctx.lib .. '/mod_ok.lua')().answer,
                require('home_pkg').where, require('env_pkg'),
                dofile(os.getenv('ALC_HOME') .. '/scenarios/demo.lua').cases[1]}
    """) == [42, "mod_ok", True, "ran", 42, "alc home packages", "ALC_PACKAGES_PATH", "c1"]


def test_edited_module_is_loaded_anew(wire: Wire) -> None:
    """Modules are compiled once and cached by path, mtime, size and inode: an
    edit (even one keeping the size) is seen by the next session."""
    module = wire.lib / "edited.lua"
    module.write_text("return 'v1'")
    assert wire.value("return require('edited')") == "v1"
    stat = module.stat()
    module.write_text("return 'v2'")
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert wire.value("return require('edited')") == "v2"
    module.write_text("return 'v3' +")
    assert "edited.lua:1: unexpected symbol near <eof>" in wire.error("return require('edited')")


def test_urandom_reads_by_count(wire: Wire) -> None:
    assert wire.value("""
        local f = assert(io.open('/dev/urandom', 'rb'))
        local a, b = f:read(4, 16); f:close()
        return {#a, #b, io.type(f) ~= nil}
    """) == [4, 16, True]


def test_pure_libraries_and_text_load_work(wire: Wire) -> None:
    assert wire.value("""
        local co = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
        local t = {3, 1, 2}; table.sort(t)
        return {('abc'):upper(), string.format('%5.2f', math.pi), utf8.char(233), co(1), co(5),
                t[1], load('return x + 1', 'c', 't', {x = 4})(), type(os.time()),
                type(os.clock()), os.date('!%Y', 0), os.difftime(5, 2),
                collectgarbage('count') > 0, select('#', pcall(error))}
    """) == ["ABC", " 3.14", "é", 2, 10, 1, 5, "number", "number", "1970", 3.0, True, 2]


def test_output_reaches_the_session_log(wire: Wire) -> None:
    """print, io.write, io.stderr and warn land in the session log the client gets
    (the Finished metrics' recent_logs) and in the worker's log file."""
    finished = wire.run("print('pn-print-marker', 7, nil)\n"
                        "io.write('pn-write-marker', 1.5, '\\n')\n"
                        "io.stderr:write('pn-stderr-marker')\n"
                        "warn('pn-warn-', 'marker')")
    logs = [(e["level"], e["source"], e["message"]) for e in finished.metrics["recent_logs"]]
    assert logs == [("info", "alc.lua.print", "pn-print-marker\t7\tnil"),
                    ("info", "alc.lua.io", "pn-write-marker1.5"),
                    ("warn", "alc.lua.stderr", "pn-stderr-marker"),
                    ("warn", "alc.lua.warn", "pn-warn-marker")]
    log = Path(wire.worker.log_path).read_text()
    assert all(message in log for _, _, message in logs)


@pytest.mark.skipif(not PACKAGES.is_dir(), reason=f"the pinned corpus is absent ({PACKAGES})")
def test_real_packages_load_in_the_sandbox(wire: Wire) -> None:
    """Packages that use os.getenv, /dev/urandom and io.stderr load unchanged."""
    feed = wire.runner.run(wire.client.run(
        "return {require('alc_shapes.check').is_dev_mode(), #require('flow.util').random_hex(8),"
        " type(require('cot').run), type(require('conformal_vote').run)}",
        lib_paths=[str(PACKAGES)], timeout=30))
    assert isinstance(feed.feed_result, Finished)
    assert feed.feed_result.outcome == Completed([False, 8, "function", "function"])


def test_no_sandbox_gives_the_full_standard_library(wire: Wire) -> None:
    """(In the module's home: pool_home's cleanup would stop the module's worker.)"""
    async def main() -> Any:
        client, worker = await spawn_and_connect(f"{DEFAULT_COMMAND} --no-sandbox")
        try:
            async with client:
                feed = await client.run(
                    "return {io.open('/etc/passwd'):read('l'):sub(1, 5), os.getenv('PATH') ~= nil,"
                    " type(debug.getregistry()), type(string.dump(function() end)),"
                    " type(os.execute)}")
                await client.shutdown()
                return feed.feed_result
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
    result = asyncio.run(main())
    assert isinstance(result, Finished)
    assert result.outcome == Completed(["root:", True, "table", "string", "function"])


def test_collected_coroutines_cannot_crash_the_worker(wire: Wire) -> None:
    """lupa keeps a coroutine's lua_State in the objects it hands Python; a Python
    error raised there, dropped after Lua collected the coroutine, segfaulted the
    worker (the runtime now keeps coroutines until the session ends)."""
    assert wire.value("""
        for i = 1, 3000 do
          coroutine.resume(coroutine.create(function() return alc.json_encode({f = print}) end))
          pcall(coroutine.wrap(function() return alc.json_encode({f = print}) end))
          if i % 500 == 0 then collectgarbage() end
        end
        return 'alive'
    """) == "alive"
    assert wire.value("return 6 * 7") == 42


# ------------------------------------------------------------------ in process


def test_no_original_is_reachable_after_install() -> None:
    """Every value reachable from the sandboxed globals (tables, metatables the
    sandbox exposes) is compared with the originals captured before install.
    (package.loaded is the registry's table on purpose, emptied and refilled.)"""
    lua = lua54.LuaRuntime(register_eval=False, register_builtins=False)
    originals = lua.eval("""{io, os, debug, package, string, require, load, loadfile, dofile,
        io.open, io.popen, io.lines, io.input, io.output, os.execute, os.getenv, os.remove,
        debug.getupvalue, debug.getregistry, string.dump, package.loadlib, package.searchers,
        package.searchers[2], python, collectgarbage, setmetatable,
        debug.getregistry()['FILE*'], debug.getregistry().POBJECT, print}""")
    install_sandbox(lua, SandboxPolicy(log=lambda *a: None))
    reached = lua.eval("""function(originals)
        local seen, hits = {}, {}
        local function visit(v)
          for i, o in pairs(originals) do
            if rawequal(v, o) then hits[#hits + 1] = i end
          end
          if (type(v) ~= 'table') or seen[v] then return end
          seen[v] = true
          local mt = getmetatable(v)
          if mt ~= nil then visit(mt) end
          for k, x in pairs(v) do visit(k); visit(x) end
        end
        visit(_G); visit(getmetatable('')); visit(getmetatable(io.stdout))
        visit(getmetatable(io.open('/dev/urandom', 'rb')))
        return #hits == 0 and 'none' or table.concat(hits, ',')
    end""")(originals)
    assert reached == "none"


def test_policy_rejects_bad_env_names_and_builds_the_module_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not an environment variable name"):
        SandboxPolicy(allow_env=frozenset({"OK_NAME", "BAD=NAME"}))
    assert module_path([str(tmp_path)]).startswith(f"{tmp_path}/?.lua;{tmp_path}/?/init.lua")


def test_worker_refuses_a_bad_allow_env_name_at_startup(tmp_path: Path) -> None:
    sock_dir = tmp_path / "pool"
    sock_dir.mkdir(mode=0o700)
    done = subprocess.run(
        [sys.executable, "-m", "pool_notebook.worker", "--sid", "p-sbx", "--sock",
         str(sock_dir / "w.sock"), "--allow-env", "BAD=NAME"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--allow-env: not an environment variable name" in done.stderr
    assert "Traceback" not in done.stderr
