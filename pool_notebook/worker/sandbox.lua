-- The capability sandbox of the bundled worker (installed by sandbox.py).
--
-- Run once per Lua runtime, before any user code. It empties the global table
-- and refills it from an allowlist of fresh tables, so nothing user code can
-- reach (globals, package.loaded, require, metatables) leads back to an
-- original module. The originals live on only as locals of this chunk.
-- Files are read through the host's `resolve` (a realpath check against the
-- readable roots); output goes to the host's `log`; os.getenv asks `getenv`.
-- Code here never calls a global or a string method after the swap: every
-- function it uses is captured below, so user code cannot redirect it.
local host = ...
local host_resolve, host_compiled, host_getenv, host_log, devices = host.resolve,
      host.compiled, host.getenv, host.log, host.devices

local G = _G
local assert, error, getmetatable, ipairs, next, pairs, pcall, rawequal, rawget, rawlen,
      rawset, select, setmetatable, tonumber, tostring, type, xpcall =
      assert, error, getmetatable, ipairs, next, pairs, pcall, rawequal, rawget, rawlen,
      rawset, select, setmetatable, tonumber, tostring, type, xpcall
local raw_load, raw_collectgarbage = load, collectgarbage
local string, table, math, utf8, coroutine, os, io, debug = string, table, math, utf8, coroutine,
      os, io, debug
local sbyte, sfind, sformat, sgsub, sgmatch, ssub = string.byte, string.find, string.format,
      string.gsub, string.gmatch, string.sub
local concat, pack, unpack = table.concat, table.pack, table.unpack
local utf8_len = utf8.len
local math_type, tointeger = math.type, math.tointeger
local io_open, io_type = io.open, io.type
local registry = debug.getregistry()
local config = package.config

local HINT = " (run the worker with --no-sandbox to allow it)"
local NOT_HERE = " is not available in the sandbox" .. HINT

-- A stand-in that fails with a message naming the capability.
local function blocked(name, what)
  local message = name .. (what or NOT_HERE)
  return function() error(message, 2) end
end

local function arg_error(n, fname, expected, got)
  error(sformat("bad argument #%d to '%s' (%s expected, got %s)", n, fname, expected,
                type(got)), 0)
end

-- Text for the Python side: valid UTF-8 (other bytes become \xNN escapes).
local function as_utf8(text)
  if utf8_len(text) then return text end
  return (sgsub(text, "[\128-\255]", function(c) return sformat("\\x%02X", sbyte(c)) end))
end

local function emit(level, source, text)
  if sbyte(text, -1) == 10 then text = ssub(text, 1, -2) end
  if text ~= "" then host_log(level, source, as_utf8(text)) end
end

-- ------------------------------------------------------------------ files

-- The host answers a real path (it starts with "/") or why the path is refused.
local function resolve(path)
  local answer = host_resolve(path)
  if sbyte(answer, 1) ~= 47 then return nil, answer end
  return answer, devices[answer] and "device" or ""
end

-- A path as error messages show it (a NUL byte would cut the message short).
local function shown(path)
  return (sgsub(path, "\0", "\\0"))
end

-- The real path of a readable file; nil, message when it is missing inside
-- the roots; an error when it is outside them or not a regular file. Devices
-- (/dev/urandom) only suit io.open, which bounds their reads.
local function readable(fname, path, device_ok)
  if type(path) ~= "string" then arg_error(1, fname, "string", path) end
  if not utf8_len(path) then error(fname .. ": the path is not valid UTF-8", 0) end
  local real, why = resolve(path)
  if why == "device" and not device_ok then
    error(sformat("%s: %s is a device; read it with io.open(path, 'rb'):read(n)", fname, path), 0)
  end
  if real then return real, why end
  if why == "missing" then return nil, shown(path) .. ": No such file or directory" end
  error(sformat("%s: %s %s", fname, shown(path), why), 0)
end

-- An endless device opened read-only: reads take a byte count (nothing can
-- ask it for "all" or a line), so it cannot exhaust memory.
local function device_file(path, f)
  local device = {}
  function device.read(_, ...)
    local count = select("#", ...)
    if count == 0 then error(sformat("read: %s needs a byte count", path), 2) end
    for i = 1, count do
      local n = select(i, ...)
      if math_type(n) ~= "integer" or n < 0 or n > 65536 then
        error(sformat("read: %s can be read by byte count (0..65536) only", path), 2)
      end
    end
    return f:read(...)
  end
  function device.close() return f:close() end
  device.lines = blocked("reading lines of " .. path, " is not available")
  device.seek = device.lines
  device.write = blocked("writing to " .. path, " is not available")
  return setmetatable(device, {
    __name = "FILE*",
    __tostring = function() return "file (" .. path .. ")" end,
    __metatable = "sandbox file",
  })
end

-- Open handles are bounded: file descriptors belong to the worker, not the session.
local MAX_OPEN = 100
local handles = setmetatable({}, { __mode = "k" })

local function open_count()
  local n = 0
  for f in next, handles do
    if io_type(f) == "file" then n = n + 1 end
  end
  return n
end

local function open_read(fname, path, mode, device_ok)
  if mode == nil then mode = "r" end
  if type(mode) ~= "string" then arg_error(2, fname, "string", mode) end
  if mode ~= "r" and mode ~= "rb" then
    error(sformat("%s: mode '%s' would write to %s; files are read-only in the sandbox%s",
                  fname, mode, tostring(path), HINT), 0)
  end
  local real, why = readable(fname, path, device_ok)
  if not real then return nil, why, 2 end
  if open_count() >= MAX_OPEN then
    raw_collectgarbage("collect")  -- unreachable handles close in their finalizers
    if open_count() >= MAX_OPEN then
      error(sformat("%s: %d files are open; close some first (the sandbox allows %d)",
                    fname, MAX_OPEN, MAX_OPEN), 0)
    end
  end
  local f, err, code = io_open(real, mode)
  if not f then return nil, err, code end
  handles[f] = true
  if why == "device" then return device_file(path, f) end
  return f
end

-- ------------------------------------------------------------------ load

local BINARY = "attempt to load a binary chunk"

local function clarify(err)
  if type(err) == "string" and sfind(err, BINARY, 1, true) then
    return "load: binary chunks are not available in the sandbox" .. HINT
  end
  return err
end

local function text_load(chunk, name, mode, ...)
  if mode ~= nil and type(mode) ~= "string" then arg_error(3, "load", "string", mode) end
  local fn, err
  if select("#", ...) > 0 then
    fn, err = raw_load(chunk, name, "t", (...))
  else
    fn, err = raw_load(chunk, name, "t", G)
  end
  if fn then return fn end
  return nil, clarify(err)
end

-- A readable Lua file as a function (nil, message if it is missing or does not
-- compile). The host compiles it as text and caches the bytecode, which alone
-- is loaded in binary mode; `...` is the environment, if given.
local function load_file(fname, path, real, ...)
  if not real then
    local missing
    real, missing = readable(fname, path)
    if not real then return nil, missing end
  end
  local code = host_compiled(real, "@" .. path)
  if sbyte(code, 1) ~= 27 then return nil, clarify(code) end
  if select("#", ...) > 0 then return raw_load(code, "@" .. path, "b", (...)) end
  return raw_load(code, "@" .. path, "b", G)
end

local function sandbox_loadfile(path, mode, ...)
  if path == nil then error("loadfile: reading standard input" .. NOT_HERE, 2) end
  if mode ~= nil and type(mode) ~= "string" then arg_error(2, "loadfile", "string", mode) end
  return load_file("loadfile", path, nil, ...)
end

local function sandbox_dofile(path)
  if path == nil then error("dofile: reading standard input" .. NOT_HERE, 2) end
  local fn, err = load_file("dofile", path)
  if not fn then error(err, 2) end
  return fn()
end

-- ------------------------------------------------------------------ package / require

local LOADED = registry._LOADED  -- the table C code and lupa know as package.loaded
local package = {
  config = config,
  cpath = "",
  path = "",
  preload = {},
  loaded = LOADED,
  loadlib = blocked("package.loadlib", " (C modules) is not available in the sandbox" .. HINT),
}

-- Plain (non-pattern) replacement of every `what` in `text` by `with`.
local function replace(text, what, with)
  return (sgsub(text, sgsub(what, "%p", "%%%0"), (sgsub(with, "%%", "%%%%"))))
end

-- The first file of `path` for `name` the sandbox may read: file, real path;
-- or nil, the list of files tried.
local function find(name, path, sep, rep)
  sep, rep = sep or ".", rep or "/"
  if sep ~= "" then name = replace(name, sep, rep) end
  local tried = {}
  for template in sgmatch(path, "[^;]+") do
    local file = replace(template, "?", name)
    local real, why = nil, "is not valid UTF-8"
    if utf8_len(file) then real, why = resolve(file) end
    if real and why ~= "device" then return file, real end
    tried[#tried + 1] = "no file '" .. shown(file) .. "'"
      .. ((why == "missing" and "") or (why == "device" and " (a device)")
          or " (outside the directories the sandbox may read)")
  end
  return nil, concat(tried, "\n\t")
end

-- package.searchpath, but only files the sandbox may read count as found.
local function searchpath(name, path, sep, rep)
  if type(name) ~= "string" then arg_error(1, "searchpath", "string", name) end
  if type(path) ~= "string" then arg_error(2, "searchpath", "string", path) end
  local file, tried = find(name, path, sep, rep)
  if file then return file end
  return nil, tried
end

local function preload_searcher(name)
  local preload = package.preload
  if type(preload) ~= "table" then error("'package.preload' must be a table", 2) end
  local loader = preload[name]
  if loader == nil then return "\n\tno field package.preload['" .. name .. "']" end
  return loader, ":preload:"
end

local function lua_searcher(name)
  local path = package.path
  if type(path) ~= "string" then error("'package.path' must be a string", 2) end
  local file, real = find(name, path)
  if not file then return "\n\t" .. real end
  local fn, lerr = load_file("require", file, real)
  if not fn then
    error(sformat("error loading module '%s' from file '%s':\n\t%s", name, file, lerr), 2)
  end
  return fn, file
end

package.searchpath = searchpath
package.searchers = { preload_searcher, lua_searcher }

local NOT_MODULES = { python = true, lupa = true }

local function sandbox_require(name)
  if type(name) == "number" then name = tostring(name) end
  if type(name) ~= "string" then arg_error(1, "require", "string", name) end
  local value = LOADED[name]
  if value then return value end
  if NOT_MODULES[name] then error("module '" .. name .. "'" .. NOT_HERE, 2) end
  local searchers = package.searchers
  if type(searchers) ~= "table" then error("'package.searchers' must be a table", 2) end
  local messages = {}
  local i = 1
  while searchers[i] ~= nil do
    local loader, extra = searchers[i](name)
    if type(loader) == "function" then
      local result = loader(name, extra)
      if result ~= nil then LOADED[name] = result end
      if LOADED[name] == nil then LOADED[name] = true end
      return LOADED[name], extra
    elseif type(loader) == "string" then
      messages[#messages + 1] = loader
    end
    i = i + 1
  end
  error(sformat("module '%s' not found:%s\n\t(C modules are not available in the sandbox)",
                name, concat(messages)), 2)
end

-- ------------------------------------------------------------------ io

-- A write-only file whose text goes to the session log.
local function log_file(name, level, source)
  local file = {}
  function file.write(self, ...)
    local parts = {}
    for i = 1, select("#", ...) do
      local v = select(i, ...)
      if math_type(v) == "float" then v = sformat("%.14g", v)
      elseif type(v) == "number" then v = tostring(v)
      elseif type(v) ~= "string" then arg_error(i, "write", "string", v) end
      parts[i] = v
    end
    emit(level, source, concat(parts))
    return self
  end
  function file.flush(self) return self end
  function file.setvbuf() return true end
  function file.close() return nil, "cannot close standard file" end
  file.read = blocked("reading " .. name, " is not available in the sandbox")
  file.lines = file.read
  file.seek = file.read
  return setmetatable(file, {
    __name = "FILE*",
    __tostring = function() return "file (" .. name .. ", to the session log)" end,
    __metatable = "sandbox file",
  })
end

local stdout = log_file("io.stdout", "info", "alc.lua.io")
local stderr = log_file("io.stderr", "warn", "alc.lua.stderr")
local stdin = setmetatable({}, {
  __index = blocked("io.stdin"),
  __tostring = function() return "file (io.stdin, not available)" end,
  __metatable = "sandbox file",
})
local input -- the default input file: nil until io.input(path)

local sandbox_io = {
  stdout = stdout,
  stderr = stderr,
  stdin = stdin,
  popen = blocked("io.popen"),
  tmpfile = blocked("io.tmpfile"),
}

function sandbox_io.open(path, mode) return open_read("io.open", path, mode, true) end

function sandbox_io.lines(path, ...)
  if path == nil then
    if input == nil then error("io.lines: no default input file; pass a readable path", 2) end
    return input:lines(...)
  end
  local f, err = open_read("io.lines", path, "r", false)
  if not f then error(err, 2) end
  local next_line = f:lines(...)
  local function lines()  -- closes the file at its end, as io.lines does
    local values = pack(next_line())
    if values[1] == nil then f:close() end
    return unpack(values, 1, values.n)
  end
  return lines, nil, nil, f
end

function sandbox_io.input(file)
  if file == nil then
    if input == nil then error("io.input: no default input file; pass a readable path", 2) end
    return input
  end
  if type(file) == "string" then
    local f, err = open_read("io.input", file, "r")
    if not f then error(err, 2) end
    input = f
  elseif io_type(file) then
    input = file
  else
    arg_error(1, "input", "FILE*", file)
  end
  return input
end

function sandbox_io.read(...)
  if input == nil then error("io.read: no default input file; open one with io.input(path)", 2) end
  return input:read(...)
end

function sandbox_io.output(file)
  if file == nil or rawequal(file, stdout) then return stdout end
  error("io.output: writing files is not available in the sandbox" .. HINT, 2)
end

function sandbox_io.write(...) return stdout:write(...) end
function sandbox_io.flush() return stdout end

function sandbox_io.close(file)
  if file == nil or rawequal(file, stdout) or rawequal(file, stderr) then
    return nil, "cannot close standard file"
  end
  return file:close()
end

function sandbox_io.type(obj)
  local mt = getmetatable(obj)
  if type(obj) == "table" and mt == "sandbox file" then return "file" end
  return io_type(obj)
end

-- ------------------------------------------------------------------ os, debug, base

local sandbox_os = {
  time = os.time,
  clock = os.clock,
  date = os.date,
  difftime = os.difftime,
}
function sandbox_os.getenv(name)
  if type(name) ~= "string" then arg_error(1, "getenv", "string", name) end
  if not utf8_len(name) then return nil end
  return host_getenv(name)
end
for _, name in ipairs({ "execute", "exit", "remove", "rename", "tmpname", "setlocale" }) do
  sandbox_os[name] = blocked("os." .. name)
end

local sandbox_debug = { traceback = debug.traceback }
for _, name in ipairs({ "debug", "gethook", "getinfo", "getlocal", "getmetatable", "getregistry",
                        "getupvalue", "getuservalue", "sethook", "setcstacklimit", "setlocal",
                        "setmetatable", "setupvalue", "setuservalue", "upvalueid",
                        "upvaluejoin" }) do
  sandbox_debug[name] = blocked("debug." .. name)
end

local function copy(t)
  local out = {}
  for k, v in pairs(t) do out[k] = v end
  return out
end

-- table.move, insert and remove loop in C, where no interrupt reaches them
-- (and #t can be anything a __len says): bound how many elements they shift.
local MAX_MOVE = 1 << 24
-- (the locals carry the library's names: argument errors name them)
local move, insert, remove = table.move, table.insert, table.remove
local sandbox_table = copy(table)

local function shift_guard(fname, list, pos)
  if type(list) ~= "table" then return end
  local last, first = tointeger(tonumber(#list)), tointeger(tonumber(pos))
  if last and first and last - first >= MAX_MOVE then
    error(sformat("%s: shifting %.0f elements is more than the sandbox allows at once (%d)",
                  fname, last - first + 1.0, MAX_MOVE), 3)
  end
end

function sandbox_table.insert(list, ...)
  if select("#", ...) >= 2 then shift_guard("table.insert", list, (...)) end
  return insert(list, ...)
end

function sandbox_table.remove(list, ...)
  if select("#", ...) >= 1 then shift_guard("table.remove", list, (...)) end
  return remove(list, ...)
end

function sandbox_table.move(a1, f, e, t, a2)
  local first, last = tointeger(tonumber(f)), tointeger(tonumber(e))
  if first and last and last - first >= MAX_MOVE then
    error(sformat("table.move: %.0f elements are more than the sandbox moves at once (%d)",
                  last - first + 1.0, MAX_MOVE), 2)
  end
  return move(a1, f, e, t, a2)
end

local sandbox_string = copy(string)
sandbox_string.dump = blocked("string.dump")

local GC_OPTIONS = { collect = true, count = true, step = true, isrunning = true }

local function sandbox_collectgarbage(opt, ...)
  if opt ~= nil and not GC_OPTIONS[opt] then
    error(sformat("collectgarbage('%s') is not available in the sandbox (the worker manages "
                  .. "memory; allowed: collect, count, step, isrunning)", tostring(opt)), 2)
  end
  return raw_collectgarbage(opt, ...)
end

-- Finalizers could run code after the session (at interpreter close): none.
local function sandbox_setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc finalizers are not available in the sandbox" .. HINT, 2)
  end
  return setmetatable(t, mt)
end

local function sandbox_print(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  emit("info", "alc.lua.print", concat(parts, "\t"))
end

local function sandbox_warn(first, ...)
  local parts = { first }
  for i = 1, select("#", ...) + 1 do
    local v = select(i, first, ...)
    if type(v) ~= "string" then arg_error(i, "warn", "string", v) end
    parts[i] = v
  end
  if select("#", ...) == 0 and sbyte(first, 1) == 64 then return end -- "@on"/"@off"
  emit("warn", "alc.lua.warn", concat(parts))
end

-- ------------------------------------------------------------------ the swap

local modules = {
  string = sandbox_string,
  table = sandbox_table,
  math = copy(math),
  utf8 = copy(utf8),
  coroutine = copy(coroutine),
  os = sandbox_os,
  io = sandbox_io,
  debug = sandbox_debug,
  package = package,
}

local globals = {
  assert = assert, error = error, getmetatable = getmetatable, ipairs = ipairs, next = next,
  pairs = pairs, pcall = pcall, rawequal = rawequal, rawget = rawget, rawlen = rawlen,
  rawset = rawset, select = select, tonumber = tonumber, tostring = tostring, type = type,
  xpcall = xpcall, _VERSION = G._VERSION,
  setmetatable = sandbox_setmetatable,
  collectgarbage = sandbox_collectgarbage,
  print = sandbox_print,
  warn = sandbox_warn,
  load = text_load,
  loadfile = sandbox_loadfile,
  dofile = sandbox_dofile,
  require = sandbox_require,
}

-- Metatables of host objects (lupa's Python objects, FILE*) and of strings:
-- getmetatable yields a placeholder, so nobody can call __gc or swap __index.
for key, value in next, registry do
  if type(key) == "string" and type(value) == "table" and rawget(value, "__name") ~= nil then
    value.__metatable = "host object (opaque in the sandbox)"
  end
end
local string_mt = getmetatable("")
string_mt.__index = sandbox_string
string_mt.__metatable = { __index = sandbox_string }

for key in next, G do G[key] = nil end
for key in next, LOADED do LOADED[key] = nil end
for name, value in next, globals do G[name] = value end
for name, module in next, modules do
  G[name] = module
  LOADED[name] = module
end
G._G = G
LOADED._G = G

-- For the host: put more directories first on package.path.
return function(templates)
  package.path = templates .. (package.path == "" and "" or ";" .. package.path)
end
