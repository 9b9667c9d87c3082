-- The `alc` runtime offered to code run by the bundled worker.
-- Natives (llm, llm_batch, log, json_encode/json_decode, state) are wired here
-- to the Python host; the helpers below are pure Lua on top of them, written
-- like algocline's prelude so real packages (e.g. `require("cot")`) run.
local host = ...
local alc = {}

local function query_of(prompt, opts)
  opts = opts or {}
  if type(prompt) ~= "string" then
    error("alc.llm: prompt must be a string, got " .. type(prompt), 3)
  end
  return {
    prompt = prompt,
    system = opts.system,
    max_tokens = opts.max_tokens or 1024,
    grounded = opts.grounded and true or nil,
    underspecified = opts.underspecified and true or nil,
  }
end

-- One pause with one query; resumes with the continue response text.
function alc.llm(prompt, opts)
  local answers = coroutine.yield({ query_of(prompt, opts) })
  return answers[1]
end

-- One pause with several queries (q-0, q-1, ...); returns the answers in order.
function alc.llm_batch(items)
  if type(items) ~= "table" then error("alc.llm_batch: expected a list of queries", 2) end
  if #items == 0 then return host.array({}) end
  local queries = {}
  for i, item in ipairs(items) do
    if type(item) == "string" then item = { prompt = item } end
    queries[i] = query_of(item.prompt, item)
  end
  return host.array(coroutine.yield(queries))
end

alc.log = host.log
alc.json_encode = host.json_encode
alc.json_decode = host.json_decode
alc.array = host.array
alc.state = { get = host.state_get, set = host.state_set }

function alc.map(list, fn)
  local out = {}
  for i, v in ipairs(list) do out[i] = fn(v, i) end
  return host.array(out)
end

function alc.filter(list, pred)
  local out = {}
  for i, v in ipairs(list) do
    if pred(v, i) then out[#out + 1] = v end
  end
  return host.array(out)
end

function alc.reduce(list, fn, init)
  local acc = init
  for i, v in ipairs(list) do acc = fn(acc, v, i) end
  return acc
end

-- Majority vote: the most frequent value (first seen wins ties), and its count.
function alc.vote(list)
  local counts, order = {}, {}
  for _, v in ipairs(list) do
    local key = type(v) == "string" and v:match("^%s*(.-)%s*$") or v
    if counts[key] == nil then order[#order + 1] = key; counts[key] = 0 end
    counts[key] = counts[key] + 1
  end
  local best, best_n = nil, 0
  for _, key in ipairs(order) do
    if counts[key] > best_n then best, best_n = key, counts[key] end
  end
  return best, best_n
end

-- First number in `str` (e.g. "Score: 7/10" -> 7), else `default`.
function alc.parse_score(str, default)
  if type(str) ~= "string" then return default end
  local n = str:match("(-?%d+%.?%d*)")
  return n and tonumber(n) or default
end

-- The number captured by `pattern` (default: the first number) in `text`, or nil.
function alc.parse_number(text, pattern)
  if type(text) ~= "string" then return nil end
  local captured = text:match(pattern or "(-?%d+%.?%d*)")
  return captured and tonumber(captured) or nil
end

-- Decode the JSON inside an LLM answer: a ```json fence, or the outermost {...} / [...].
function alc.json_extract(raw)
  if type(raw) ~= "string" then return nil end
  local fenced = raw:match("```json%s*(.-)%s*```") or raw:match("```%s*(.-)%s*```")
  local candidates = { fenced, raw:match("(%b{})"), raw:match("(%b[])"), raw }
  for _, text in ipairs(candidates) do
    if text then
      local ok, value = pcall(host.json_decode, text)
      if ok and value ~= nil then return value end
    end
  end
  return nil
end

-- alc.llm, but any error yields `default` instead.
function alc.llm_safe(prompt, opts, default)
  local ok, answer = pcall(alc.llm, prompt, opts)
  if ok and answer ~= nil then return answer end
  return default
end

-- alc.llm, decoded with alc.json_extract (nil when the answer holds no JSON).
function alc.llm_json(prompt, opts)
  return alc.json_extract(alc.llm(prompt, opts))
end

-- One llm_batch over `items`: prompt_fn(item, i) gives each prompt (or query table).
function alc.parallel(items, prompt_fn, opts)
  opts = opts or {}
  local queries = {}
  for i, item in ipairs(items) do
    local q = prompt_fn(item, i)
    if type(q) == "string" then
      q = { prompt = q, system = opts.system, max_tokens = opts.max_tokens }
    end
    queries[i] = q
  end
  return alc.llm_batch(queries)
end

return alc
