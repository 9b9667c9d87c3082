-- The `alc` API offered to code run by the bundled worker, as algocline declares it
-- (types/alc.d.lua). Natives come from the Python host (`host`, natives.py); everything
-- below them is written in Lua on top, like algocline's prelude, so that the real
-- strategy packages run unchanged. Error texts follow algocline's.
local raw_host = ...
local alc = {}

-- Host functions answer (true, results...) or (false, message): the message becomes a
-- Lua error at the caller's line (no Python exception object ever reaches Lua). They
-- run with the memory cap lifted (their results are copied into Lua outside a protected
-- call); settle() puts the cap back as soon as they return.
local settle = raw_host.settle
local function guard(f)
  return function(...)
    local r = table.pack(f(...))
    settle()
    if not r[1] then error(r[2], 2) end
    return table.unpack(r, 2, r.n)
  end
end
local host = {}
for name, f in pairs(raw_host) do
  host[name] = type(f) == "userdata" and guard(f) or f
end

-- JSON null: one read-only sentinel per runtime (algocline hands Lua mlua's null).
alc.null = host.null

-- ------------------------------------------------------------------ natives

alc.log = host.log
alc.json_encode = host.json_encode
alc.json_decode = host.json_decode
alc.array = host.array
alc.chunk = host.chunk
alc.match_enum = host.match_enum
alc.match_bool = host.match_bool
alc.time = host.time
alc.progress = host.progress
alc._dirs = host.dirs()
alc.stats = { record = host.stats_record, get = host.stats_get }

-- print goes to the session log (tab-joined, like algocline's print override).
function print(...)
  local parts = table.pack(...)
  for i = 1, parts.n do parts[i] = tostring(parts[i]) end
  host.print(table.concat(parts, "\t", 1, parts.n))
end

-- alc.state.*: persisted per namespace (ctx._ns, else "default"), read at first use.
do
  local ns
  local function namespace()
    if ns == nil then
      local c = rawget(_G, "ctx")
      ns = type(c) == "table" and type(rawget(c, "_ns")) == "string" and c._ns or "default"
    end
    return ns
  end
  local function op(name)
    local f = host.state
    return function(...) return f(name, namespace(), ...) end
  end
  alc.state = {
    get = op("get"), set = op("set"), keys = op("keys"), delete = op("delete"),
    has = op("has"), set_nx = op("set_nx"), incr = op("incr"),
  }
end

-- alc.card.*: immutable run records on disk (TOML + JSONL samples), as algocline's.
alc.card = {}
for _, name in ipairs({ "create", "get", "list", "append", "get_by_alias", "alias_set",
                        "alias_list", "find", "write_samples", "read_samples", "lineage",
                        "sink_backfill" }) do
  local f = host.card
  alc.card[name] = function(...) return f(name, ...) end
end

-- alc.math: mlua-mathlib's functions, bound on first use (a session pays only for
-- what it calls); RNG handles are opaque tables.
do
  local rng_mt = { __name = "LuaRng", __metatable = "LuaRng",
                   __tostring = function() return "LuaRng" end }
  local handles = setmetatable({}, { __mode = "k" })
  local buffers = setmetatable({}, { __mode = "k" })
  local function rng_id(rng, fname)
    local id = handles[rng]
    if id == nil then
      error("alc.math." .. fname .. ": expected a LuaRng from alc.math.rng_create, got "
        .. type(rng), 3)
    end
    return id
  end
  local takes_rng = { shuffle = true, sample_with_replacement = true }
  local names
  local function bind(name)
    if names == nil then
      names = {}
      for _, n in ipairs(host.math_names()) do names[n] = true end
    end
    if not names[name] then return nil end
    local call = host.math
    local function f(...) return call(name, ...) end
    if name == "rng_float" then
      -- draws come 256 at a time from the host (same stream, far fewer host calls)
      local floats = host.rng_floats
      return function(rng)
        local id = rng_id(rng, name)
        local buf = buffers[rng]
        if buf == nil or buf.i > #buf.v then
          buf = { v = floats(id, 256), i = 1 }
          buffers[rng] = buf
        end
        local x = buf.v[buf.i]
        buf.i = buf.i + 1
        return x
      end
    elseif name == "rng_create" then
      return function(seed)
        local handle = setmetatable({}, rng_mt)
        handles[handle] = f(seed)
        return handle
      end
    elseif name == "shuffle" then
      -- in place on the caller's table, as mlua-mathlib's shuffle
      return function(rng, tbl)
        if type(tbl) ~= "table" then error("alc.math.shuffle: expected a table", 2) end
        local order = f(rng_id(rng, name), #tbl)
        local copy = {}
        for i = 1, #tbl do copy[i] = tbl[i] end
        for i, j in ipairs(order) do tbl[i] = copy[j] end
        return tbl
      end
    elseif name == "sample_with_replacement" then
      return function(rng, tbl, n)
        if type(tbl) ~= "table" or #tbl == 0 then
          error("alc.math.sample_with_replacement: tbl must be a non-empty array", 2)
        end
        local out = {}
        for i, j in ipairs(f(rng_id(rng, name), #tbl, n)) do out[i] = tbl[j] end
        return out
      end
    elseif name:match("^rng_") or name:match("_sample$") or takes_rng[name] then
      return function(rng, ...) return f(rng_id(rng, name), ...) end
    end
    return f
  end
  alc.math = setmetatable({}, { __index = function(t, name)
    local fn = type(name) == "string" and bind(name) or nil
    if fn ~= nil then rawset(t, name, fn) end
    return fn
  end })
end

-- ------------------------------------------------------------------ budget

-- ctx.budget = { max_llm_calls, max_elapsed_ms, max_tokens }, read once; like
-- algocline (serde's as_u64) a limit counts only as a non-negative integer.
local budget_limits
local function budget()
  if budget_limits == nil then
    budget_limits = false
    local c = rawget(_G, "ctx")
    local b = type(c) == "table" and rawget(c, "budget")
    if type(b) == "table" then
      local limits = {}
      for _, k in ipairs({ "max_llm_calls", "max_elapsed_ms", "max_tokens" }) do
        local v = b[k]
        if math.type(v) == "integer" and v >= 0 then limits[k] = v end
      end
      if next(limits) then budget_limits = limits end
    end
  end
  return budget_limits or nil
end

local function budget_error()
  local b = budget()
  if not b then return nil end
  local calls, elapsed, tokens = host.counters()
  if b.max_llm_calls and calls >= b.max_llm_calls then
    return string.format("budget_exceeded: max_llm_calls (%d) reached (%d used)",
      b.max_llm_calls, calls)
  end
  if b.max_elapsed_ms and elapsed >= b.max_elapsed_ms then
    return string.format("budget_exceeded: max_elapsed_ms (%dms) reached (%dms elapsed)",
      b.max_elapsed_ms, elapsed)
  end
  if b.max_tokens and tokens >= b.max_tokens then
    return string.format("budget_exceeded: max_tokens (%d) reached (%d used)",
      b.max_tokens, tokens)
  end
  return nil
end

--- Remaining budget, or nil without ctx.budget; an unset limit is alc.null.
function alc.budget_remaining()
  local b = budget()
  if not b then return nil end
  local calls, elapsed, tokens = host.counters()
  local function left(max, used)
    if max == nil then return alc.null end
    return math.max(max - used, 0)
  end
  return { llm_calls = left(b.max_llm_calls, calls), elapsed_ms = left(b.max_elapsed_ms, elapsed),
           tokens = left(b.max_tokens, tokens) }
end

--- True while every set limit has capacity left (true without a budget).
function alc.budget_check()
  local r = alc.budget_remaining()
  if r == nil then return true end
  if type(r.llm_calls) == "number" and r.llm_calls <= 0 then return false end
  if type(r.elapsed_ms) == "number" and r.elapsed_ms <= 0 then return false end
  return true
end

-- ------------------------------------------------------------------ LLM

local function opt(opts, key, kind)
  local v = opts and opts[key]
  if type(v) == kind then return v end
  return nil
end

-- As algocline converts: a number prompt is its text; max_tokens that is not a u32
-- (or an integral float) falls back to 1024.
local function query_of(prompt, opts, fname, level)
  if type(prompt) == "number" then prompt = tostring(prompt) end
  if type(prompt) ~= "string" then
    error(fname .. ": prompt must be a string, got " .. type(prompt), level + 1)
  end
  local max_tokens = opts and math.tointeger(opts.max_tokens)
  if not max_tokens or max_tokens < 0 or max_tokens > 4294967295 then max_tokens = 1024 end
  return {
    prompt = prompt,
    system = opt(opts, "system", "string"),
    max_tokens = max_tokens,
    grounded = opt(opts, "grounded", "boolean") or nil,
    underspecified = opt(opts, "underspecified", "boolean") or nil,
  }
end

-- The one place Lua leaves for the host: a batch of queries, answered in order
-- (host.pause validates the batch and raises the host's refusal, e.g. an answer too
-- big for the memory cap).
local pause = host.pause
local function ask(queries)
  local err = budget_error()
  if err then error(err, 3) end
  return pause(queries)
end

--- One query; pauses until the host answers.
function alc.llm(prompt, opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("alc.llm: opts must be a table, got " .. type(opts), 2)
  end
  return ask({ query_of(prompt, opts, "alc.llm", 2) })[1]
end

--- Several queries in one pause (ids q-0, q-1, ...); answers in input order.
function alc.llm_batch(items)
  if type(items) ~= "table" then
    error("alc.llm_batch: items must be an array of query tables, got " .. type(items), 2)
  end
  if #items == 0 then error("alc.llm_batch: empty items array", 2) end
  local queries = {}
  for i = 1, #items do
    local item = items[i]
    if type(item) ~= "table" then
      error("alc.llm_batch: item " .. i .. " must be a table with .prompt", 2)
    end
    queries[i] = query_of(item.prompt, item, "alc.llm_batch", 2)
  end
  local answers = ask(queries)
  local out = {}
  for i = 1, #queries do out[i] = answers[i] end
  return out
end

-- ------------------------------------------------------------------ prelude

--- Memoized alc.llm: session cache of 256 entries keyed by fingerprint(prompt, system,
--- max_tokens) or opts.cache_key; opts.cache_skip always asks.
do
  local cache, order, hits, misses, capacity = {}, {}, 0, 0, 256

  function alc.cache(prompt, opts)
    opts = opts or {}
    if opts.cache_skip then return alc.llm(prompt, opts) end
    local key = opts.cache_key
    if not key then
      local sig = tostring(prompt)
      if opts.system then sig = sig .. "\0" .. opts.system end
      if opts.max_tokens then sig = sig .. "\0" .. tostring(opts.max_tokens) end
      key = alc.fingerprint(sig)
    end
    local hit = cache[key]
    if hit ~= nil then
      hits = hits + 1
      alc.log("debug", "alc.cache: hit " .. key)
      return hit
    end
    local response = alc.llm(prompt, opts)
    cache[key] = response
    order[#order + 1] = key
    misses = misses + 1
    alc.log("debug", "alc.cache: miss " .. key)
    while #order > capacity do cache[table.remove(order, 1)] = nil end
    return response
  end

  function alc.cache_info()
    return { entries = #order, hits = hits, misses = misses, max_entries = capacity }
  end

  function alc.cache_clear()
    cache, order, hits, misses = {}, {}, 0, 0
  end
end

function alc.map(items, fn)
  local out = {}
  for i, item in ipairs(items) do out[i] = fn(item, i) end
  return out
end

--- Fold; without `init` the fold starts from items[1] at index 2.
function alc.reduce(items, fn, init)
  local acc, first = init, 1
  if acc == nil then acc, first = items[1], 2 end
  for i = first, #items do acc = fn(acc, items[i], i) end
  return acc
end

function alc.filter(items, fn)
  local out = {}
  for i, item in ipairs(items) do
    if fn(item, i) then out[#out + 1] = item end
  end
  return out
end

--- Majority vote over answers (trimmed, first seen wins ties): {winner, count, total}.
function alc.vote(answers)
  local counts, order = {}, {}
  for _, answer in ipairs(answers) do
    local key = (tostring(answer):gsub("^%s+", ""):gsub("%s+$", ""))
    if counts[key] == nil then counts[key] = 0; order[#order + 1] = key end
    counts[key] = counts[key] + 1
  end
  local winner, best = nil, 0
  for _, key in ipairs(order) do
    if counts[key] > best then winner, best = key, counts[key] end
  end
  return { winner = winner, count = best, total = #answers }
end

local function with_flag(opts, flag)
  local merged = {}
  for k, v in pairs(opts or {}) do merged[k] = v end
  merged[flag] = true
  return merged
end

function alc.ground(claim, opts) return alc.llm(claim, with_flag(opts, "grounded")) end

function alc.specify(prompt, opts) return alc.llm(prompt, with_flag(opts, "underspecified")) end

--- First integer in `str`, clamped to 1..10; `default` (5) when there is none.
function alc.parse_score(str, default)
  default = default or 5
  local n = tonumber(tostring(str):match("%d+"))
  if n == nil then return default end
  return math.max(1, math.min(10, n))
end

--- The number captured by `pattern`, or the first (signed, decimal) number; nil if none.
function alc.parse_number(text, pattern)
  if type(text) ~= "string" then return nil end
  if pattern then return tonumber(text:match(pattern)) end
  return tonumber(text:match("%-?%d+%.?%d*"))
end

local function decode_table(text)
  local ok, value = pcall(alc.json_decode, text)
  if ok and type(value) == "table" and value ~= alc.null then return value end
  return nil
end

--- A JSON object/array in LLM output: the whole text, a ``` fence, or the first
--- balanced {...} then [...] that decodes. nil when there is none.
function alc.json_extract(raw)
  if type(raw) ~= "string" then return nil end
  local found = decode_table(raw)
  if found then return found end
  local fenced = raw:match("```json%s*(.-)%s*```") or raw:match("```%s*(.-)%s*```")
  found = fenced and decode_table(fenced)
  if found then return found end
  for _, pattern in ipairs({ "%b{}", "%b[]" }) do
    for candidate in raw:gmatch(pattern) do
      found = decode_table(candidate)
      if found then return found end
    end
  end
  return nil
end

function alc.state.update(key, fn, default)
  local updated = fn(alc.state.get(key, default))
  alc.state.set(key, updated)
  return updated
end

--- alc.llm, or `default` (logged at warn) when it raises.
function alc.llm_safe(prompt, opts, default)
  local ok, result = pcall(alc.llm, prompt, opts)
  if ok then return result end
  alc.log("warn", "alc.llm_safe: " .. tostring(result))
  return default
end

--- alc.llm parsed with json_extract; one repair retry. Returns (parsed or nil, raw).
function alc.llm_json(prompt, opts)
  opts = opts or {}
  local raw = alc.llm(prompt, opts)
  local parsed = alc.json_extract(raw)
  if parsed then return parsed, raw end
  alc.log("warn", "alc.llm_json: JSON parse failed, retrying")
  local retry = {}
  for k, v in pairs(opts) do retry[k] = v end
  retry.system = "Output ONLY valid JSON. No markdown fences, no explanation."
  raw = alc.llm("The previous response was not valid JSON.\n\nPrevious output:\n" .. raw
    .. "\n\nFix the JSON and return ONLY valid JSON.\n\nOriginal request:\n" .. prompt, retry)
  parsed = alc.json_extract(raw)
  if not parsed then alc.log("warn", "alc.llm_json: JSON parse failed after retry") end
  return parsed, raw
end

--- 8 hex digits of DJB2 over the lowercased, whitespace-collapsed, trimmed text.
function alc.fingerprint(str)
  local s = tostring(str):lower():gsub("%s+", " "):gsub("^%s+", ""):gsub("%s+$", "")
  local h = 5381
  for i = 1, #s do h = (h * 33 + s:byte(i)) % 0x100000000 end
  return string.format("%08x", h)
end

--- defaults overridden by ctx (or ctx[opts.prefix]): dicts merge deeply, arrays and
--- scalars are replaced, `_schema` is dropped.
function alc.tuning(defaults, ctx, opts)
  if type(defaults) ~= "table" then return defaults end
  opts = opts or {}
  local source = ctx or {}
  if opts.prefix then
    local ns = source[opts.prefix]
    if type(ns) == "table" then
      source = ns
    else
      if ns ~= nil then
        alc.log("warn", "alc.tuning: prefix '" .. opts.prefix
          .. "' exists but is not a table, ignoring")
      end
      source = {}
    end
  end
  local out = {}
  for k, v in pairs(defaults) do
    if k ~= "_schema" then
      local override = source[k]
      if override == nil then
        out[k] = v
      elseif type(v) == "table" and type(override) == "table" and v[1] == nil then
        out[k] = alc.tuning(v, override)
      else
        out[k] = override
      end
    end
  end
  return out
end

--- One llm_batch over items: prompt_fn(item, i) gives a prompt string (opts.system and
--- opts.max_tokens added) or a query table; opts.post_fn(response, item, i) maps answers.
function alc.parallel(items, prompt_fn, opts)
  if type(items) ~= "table" or #items == 0 then
    error("alc.parallel: items must be a non-empty array", 2)
  end
  if type(prompt_fn) ~= "function" then error("alc.parallel: prompt_fn must be a function", 2) end
  opts = opts or {}
  local batch = {}
  for i, item in ipairs(items) do
    local p = prompt_fn(item, i)
    if type(p) == "string" then
      batch[i] = { prompt = p, system = opts.system, max_tokens = opts.max_tokens }
    elseif type(p) == "table" then
      if type(p.prompt) ~= "string" then
        error("alc.parallel: prompt_fn returned table without .prompt at index " .. i, 2)
      end
      batch[i] = p
    else
      error("alc.parallel: prompt_fn must return string or table, got " .. type(p)
        .. " at index " .. i, 2)
    end
  end
  local responses = alc.llm_batch(batch)
  if not opts.post_fn then return responses end
  local out = {}
  for i, response in ipairs(responses) do out[i] = opts.post_fn(response, items[i], i) end
  return out
end

--- Run strategies in order on a shallow copy of ctx; each stage's result becomes the
--- next stage's ctx.task (tables JSON-encoded). ctx.pipe_history records every stage.
function alc.pipe(strategies, ctx, opts)
  if type(strategies) ~= "table" or #strategies == 0 then
    error("alc.pipe: strategies must be a non-empty array", 2)
  end
  if type(ctx) ~= "table" then error("alc.pipe: ctx must be a table", 2) end
  opts = opts or {}
  local on_error = opts.on_error or "abort"
  local state = {}
  for k, v in pairs(ctx) do state[k] = v end
  state.pipe_history = {}
  for i, entry in ipairs(strategies) do
    local name, run
    if type(entry) == "string" then
      name = entry
      local ok, pkg = pcall(require, entry)
      if not ok then
        error("alc.pipe: failed to load strategy '" .. entry .. "': " .. tostring(pkg), 2)
      end
      if type(pkg) ~= "table" or type(pkg.run) ~= "function" then
        error("alc.pipe: strategy '" .. entry .. "' must export run(ctx)", 2)
      end
      run = pkg.run
    elseif type(entry) == "function" then
      name, run = "(inline-" .. i .. ")", entry
    else
      error("alc.pipe: strategy[" .. i .. "] must be a string or function", 2)
    end
    local ok, result
    if on_error == "abort" then
      ok, result = true, run(state)
    else
      ok, result = pcall(run, state)
    end
    if not ok then
      alc.log("warn", "alc.pipe: stage '" .. name .. "' failed: " .. tostring(result))
      state.pipe_history[#state.pipe_history + 1] = { strategy = name, error = tostring(result) }
    else
      if type(result) ~= "table" then
        error("alc.pipe: strategy '" .. name .. "' must return a table (ctx)", 2)
      end
      state = result
      state.pipe_history[#state.pipe_history + 1] = { strategy = name, result = state.result }
      if state.result ~= nil and i < #strategies then
        state.task = type(state.result) == "table" and alc.json_encode(state.result)
          or tostring(state.result)
      end
      if opts.on_stage then opts.on_stage(i, name, state) end
    end
  end
  return state
end

-- ------------------------------------------------------------------ fork

--- Each strategy's run(ctx) in a Lua VM of its own (same ctx, lib_paths and sandbox);
--- every round their queries go out together in one batch. Returns {strategy, ok,
--- result | error} per strategy; opts.on_error = "skip" (default) or "fail".
function alc.fork(strategies, ctx, opts)
  if type(strategies) ~= "table" or #strategies == 0 then
    error("alc.fork: strategies must be a non-empty array", 2)
  end
  if type(ctx) ~= "table" then error("alc.fork: ctx must be a table", 2) end
  for _, name in ipairs(strategies) do
    if type(name) ~= "string" or not name:match("^[%w_]+$") then
      error("alc.fork: invalid strategy name '" .. tostring(name)
        .. "' (only alphanumeric and underscore allowed)", 2)
    end
  end
  local id, report = host.fork_start(strategies, ctx)
  while true do
    local batch = {}
    for _, r in ipairs(report) do
      for _, q in ipairs(r.queries or {}) do batch[#batch + 1] = q end
    end
    if #batch == 0 then break end
    id, report = host.fork_answer(id, ask(batch))
  end
  local results = {}
  for i, r in ipairs(report) do
    if not r.ok and (opts and opts.on_error) == "fail" then
      error("alc.fork: strategy '" .. r.strategy .. "' failed: " .. tostring(r.error), 2)
    end
    results[i] = { strategy = r.strategy, ok = r.ok, result = r.result, error = r.error }
  end
  return results
end

-- ------------------------------------------------------------------ eval

-- evalframe's host contract (mlua-batteries shape): json, read-only fs, time.
local function read_file(path)
  local open = io and io.open
  if not open then error("std.fs.read: file reading is not available in this sandbox", 2) end
  local f, err = open(path, "r")
  if not f then error("std.fs.read: " .. tostring(err), 2) end
  local text = f:read("a")
  f:close()
  return text
end

-- False, not an error, for a path the sandbox refuses (its io.open raises).
local function is_file(path)
  local open = io and io.open
  if type(path) ~= "string" or not open then return false end
  local ok, f = pcall(open, path, "r")
  if not ok or not f then return false end
  f:close()
  return true
end

-- Read-only views: code can call these but not replace them under evalframe.
local function frozen(t)
  return setmetatable({}, {
    __index = t,
    __newindex = function(_, k) error("std is read-only (cannot set " .. tostring(k) .. ")", 2) end,
    __metatable = "std",
  })
end

std = frozen({
  json = frozen({ encode = alc.json_encode, decode = alc.json_decode }),
  fs = frozen({ read = read_file, is_file = is_file }),
  time = frozen({ now = alc.time }),
})

do
  local function resolve_grader(ef, g)
    if type(g) == "function" then return g end
    if type(g) == "string" then
      local grader = ef.graders[g]
      if not grader then error("alc.eval: unknown grader '" .. g .. "'") end
      return grader
    end
    error("alc.eval: grader must be a string name or function, got " .. type(g))
  end

  local function suite_spec_of(ef, spec, provider)
    local out = { provider = provider }
    for i = 1, #spec do
      if type(spec[i]) == "table" and ef.bind.is_binding(spec[i]) then
        for j = 1, #spec do out[j] = spec[j] end
        out.cases = spec.cases
        return out
      end
    end
    for i, g in ipairs(spec.graders or { "exact_match" }) do
      out[i] = ef.bind({ resolve_grader(ef, g) })
    end
    local cases = {}
    for i, c in ipairs(spec.cases or {}) do
      if type(c) == "table" and ef.case.is_case(c) then
        cases[i] = c
      elseif type(c) == "table" and c.input then
        cases[i] = ef.case(c)
      else
        error("alc.eval: case #" .. i .. " must have an 'input' field")
      end
    end
    out.cases = cases
    return out
  end

  local function load_scenario_file(path, label)
    if not is_file(path) then return false end
    local chunk, err = load(read_file(path), "@" .. path, "t")
    if not chunk then error("alc.eval: failed to load scenario" .. label .. ": " .. err) end
    return true, chunk()
  end

  local function resolve_scenario(name)
    local ok, loaded = pcall(require, name)
    if ok then return loaded end
    local found
    found, loaded = load_scenario_file((alc._dirs.scenarios or "") .. "/" .. name .. ".lua",
      " '" .. name .. "'")
    if found then return loaded end
    found, loaded = load_scenario_file(name, "")
    if found then return loaded end
    error("alc.eval: could not resolve scenario '" .. name .. "'")
  end

  --- Evaluate `strategy` on a scenario (name or table) through evalframe.
  function alc.eval(scenario, strategy, opts)
    if not scenario then error("alc.eval: scenario is required") end
    if type(scenario) ~= "string" and type(scenario) ~= "table" then
      error("alc.eval: scenario must be a string or table")
    end
    if type(strategy) ~= "string" then error("alc.eval: strategy must be a string package name") end
    opts = opts or {}
    local ok, ef = pcall(require, "evalframe")
    if not ok then
      error("alc.eval: evalframe not installed. Run alc_pkg_install to add it.")
    end
    local spec, scenario_name
    if type(scenario) == "string" then
      scenario_name, spec = scenario, resolve_scenario(scenario)
    else
      scenario_name, spec = scenario.name, scenario
    end
    if type(spec) ~= "table" then
      error("alc.eval: scenario resolved to " .. type(spec) .. ", expected table")
    end
    local provider = ef.providers.algocline({ strategy = strategy, opts = opts.strategy_opts })
    local suite = ef.suite(strategy .. ":" .. (scenario_name or "inline"))(
      suite_spec_of(ef, spec, provider))
    local report = suite:run():to_table()
    if opts.auto_card then
      local agg = report.aggregated or {}
      local card = alc.card.create({
        pkg = { name = opts.card_pkg or strategy },
        scenario = { name = scenario_name or "inline" },
        stats = { pass_rate = agg.pass_rate, mean_score = (agg.scores or {}).mean,
                  n = agg.total, passed = agg.passed },
      })
      if report.results and #report.results > 0 then
        alc.card.write_samples(card.card_id, report.results)
      end
      report.card_id = card.card_id
      alc.log("info", "alc.eval: card emitted — " .. card.card_id)
    end
    return report
  end
end

return alc
