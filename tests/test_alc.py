"""The ``alc`` API, function by function, on the real worker over its socket.

Expected values are algocline's: its prelude and bridge code and its own Lua
tests (crates/algocline-engine/tests/lua/, bridge/*.rs tests), e.g.
``parse_score("15") == 10``, ``vote`` returning ``{winner, count, total}``,
``json_encode({}) == "{}"``, ``chunk`` windows, ``match_enum`` picking the
latest candidate, state files under ``<home>/state/<ns>.json`` and cards under
``<home>/cards/<pkg>/<card_id>.toml``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pool_notebook.protocol import Query
from pool_notebook.spawn import spawn_and_connect
from tests.alc_worker import LuaFailed, SharedWorker, shared_worker

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"


@pytest.fixture(scope="module")
def w() -> Iterator[SharedWorker]:
    yield from shared_worker()


def fails(text: str) -> pytest.RaisesContext[LuaFailed]:
    """The session fails with an error containing ``text``."""
    return pytest.raises(LuaFailed, match=re.escape(text))


def echo(query: Query) -> str:
    return f"echo: {query.prompt}"


# ----------------------------------------------------------------------------- JSON


def test_json_encode_is_compact_with_sorted_keys_and_empty_tables_as_objects(
        w: SharedWorker) -> None:
    assert w.run('return alc.json_encode({b = 1, a = {x = "q\\"uote"}, c = {1, 2}})') == \
        '{"a":{"x":"q\\"uote"},"b":1,"c":[1,2]}'
    assert w.run("return alc.json_encode({})") == "{}"
    assert w.run("return alc.json_encode(alc.json_decode('[]'))") == "[]"
    assert w.run("return alc.json_encode(nil)") == "null"
    assert w.run("return alc.json_encode(1.5)") == "1.5"
    # floats as serde_json (ryu) writes them, also next to look-alike strings
    assert w.run("return alc.json_encode({1e16, 1.5e-5, 1e-7, -2.5e20, 123.0, 0.0001,"
                 " 'e+1', {x = 1e-6}})") == \
        '[1e16,0.000015,1e-7,-2.5e20,123.0,0.0001,"e+1",{"x":1e-6}]'


def test_json_decode_values_and_errors(w: SharedWorker) -> None:
    assert w.run("""local v = alc.json_decode('{"a":1,"b":"two","c":[true,false]}')
                    return {v.a, v.b, #v.c, math.type(v.a)}""") == [1, "two", 2, "integer"]
    assert w.run("return alc.json_decode('3.5') + 1") == 4.5
    assert w.run("local v = alc.json_decode('[9007199254740993, 123456789012345678901234567890]')"
                 " return {math.type(v[1]), math.type(v[2])}") == ["integer", "float"]
    with fails("alc.json_decode: NaN is not valid JSON"):
        w.run("return alc.json_decode('[NaN]')")
    assert w.run("""local ok, e = pcall(alc.json_decode, '{bad')
                    return {ok, type(e), e:match('^alc.json_decode') ~= nil}""") == \
        [False, "string", True]
    assert w.run("""local ok, e = pcall(alc.json_decode, 42)
                    return e""").endswith("alc.json_decode: the argument must be a string, got "
                                          "number")


def test_json_null_decodes_to_a_non_nil_sentinel_and_encodes_back(w: SharedWorker) -> None:
    result = w.run("""local v = alc.json_decode('{"a":null,"b":[1,null]}')
                      return {a_is_nil = v.a == nil, same = v.a == alc.null,
                              again = alc.json_encode(v)}""")
    assert result["same"] is True
    assert result["again"] == '{"a":null,"b":[1,null]}'
    assert w.run("return {ctx.a == alc.null, ctx.b[2] == alc.null, tostring(ctx.a),"
                 " alc.json_decode('null') == alc.null}", ctx={"a": None, "b": [1, None]}) == \
        [True, True, "null", True]


def test_json_extract_raw_fenced_embedded_and_arrays(w: SharedWorker) -> None:
    assert w.run("""return alc.json_extract('{"a": 1}')""") == {"a": 1}
    assert w.run("""return alc.json_extract('Here:\\n```json\\n{"k": [1, 2]}\\n```\\nbye')""") == \
        {"k": [1, 2]}
    assert w.run("""return alc.json_extract('The result is {"ok": true} as asked')""") == \
        {"ok": True}
    assert w.run("""return alc.json_extract('list: [1, 2, 3] done')""") == [1, 2, 3]
    assert w.run("""return alc.json_extract('{broken} then {"good": 2}')""") == {"good": 2}
    assert w.run("""return {alc.json_extract('no json here') == nil,
                            alc.json_extract(42) == nil, alc.json_extract('"str"') == nil}""") \
        == [True, True, True]


# ----------------------------------------------------------------------------- LLM wrappers


def test_llm_json_retries_once_with_a_repair_prompt(w: SharedWorker) -> None:
    parsed, raw = w.run("return {alc.llm_json('Give me JSON', {system = 's'})}",
                        ["sorry, no", '```json\n{"k": 1}\n```'])
    assert parsed == {"k": 1} and raw == '```json\n{"k": 1}\n```'
    first, second = w.queries
    assert first.prompt == "Give me JSON" and first.system == "s"
    assert second.prompt.startswith("The previous response was not valid JSON.")
    assert "Previous output:\nsorry, no" in second.prompt
    assert second.prompt.endswith("Original request:\nGive me JSON")
    assert second.system == "Output ONLY valid JSON. No markdown fences, no explanation."


def test_llm_json_gives_nil_and_the_raw_text_when_the_retry_fails_too(w: SharedWorker) -> None:
    assert w.run("local p, raw = alc.llm_json('x'); return {p == nil, raw}",
                 ["nope", "still nope"]) == [True, "still nope"]
    assert w.run("local p, raw = alc.llm_json('x'); return {p, raw}", ['{"a": [1]}']) == \
        [{"a": [1]}, '{"a": [1]}']
    assert len(w.queries) == 1


def test_llm_options_reach_the_query(w: SharedWorker) -> None:
    w.run("""return {alc.llm('p', {system = 'sys', max_tokens = 64}), alc.ground('claim'),
                     alc.specify('which?', {system = 'x'}), alc.llm(42, {max_tokens = 8.0}),
                     alc.llm('q', {max_tokens = -1}), alc.llm('r', {max_tokens = 2.5})}""", echo)
    q1, q2, q3, q4, q5, q6 = w.queries
    assert (q1.system, q1.max_tokens, q1.grounded) == ("sys", 64, False)
    assert (q2.prompt, q2.grounded, q2.max_tokens) == ("claim", True, 1024)
    assert (q3.underspecified, q3.system) == (True, "x")
    assert (q4.prompt, q4.max_tokens) == ("42", 8)
    assert q5.max_tokens == 1024 and q6.max_tokens == 1024
    with fails("alc.llm: prompt must be a string, got table"):
        w.run("return alc.llm({})")


def test_llm_batch_sends_one_pause_and_rejects_an_empty_list(w: SharedWorker) -> None:
    assert w.run("return alc.llm_batch({{prompt = 'a'}, {prompt = 'b', system = 's'}})",
                 echo) == ["echo: a", "echo: b"]
    assert [q.id for q in w.queries] == ["q-0", "q-1"]
    assert w.queries[1].system == "s"
    with fails("alc.llm_batch: empty items array"):
        w.run("return alc.llm_batch({})")


def test_llm_safe_returns_the_default_on_error(w: SharedWorker) -> None:
    assert w.run("return alc.llm_safe({}, nil, 'fallback')") == "fallback"
    assert w.run("return alc.llm_safe('ok?', nil, 'fallback')", ["fine"]) == "fine"


def test_parallel_batches_applies_shared_opts_and_post_fn(w: SharedWorker) -> None:
    result = w.run("""return alc.parallel({'x', 'y'}, function(item, i) return item .. i end,
        {system = 'S', max_tokens = 9,
         post_fn = function(resp, item, i) return item .. ':' .. resp .. ':' .. i end})""",
                   echo)
    assert result == ["x:echo: x1:1", "y:echo: y2:2"]
    assert [(q.system, q.max_tokens) for q in w.queries] == [("S", 9), ("S", 9)]


@pytest.mark.parametrize(("call", "message"), [
    ("alc.parallel({}, function(x) return x end)", "items must be a non-empty array"),
    ("alc.parallel({'a'}, 'not a function')", "prompt_fn must be a function"),
    ("alc.parallel({'a'}, function() return 42 end)",
     "prompt_fn must return string or table, got number at index 1"),
    ("alc.parallel({'a'}, function() return {system = 'hi'} end)",
     "prompt_fn returned table without .prompt at index 1"),
])
def test_parallel_validates_like_algocline(w: SharedWorker, call: str, message: str) -> None:
    with fails(message):
        w.run(f"return {call}")


def test_cache_answers_repeats_without_asking(w: SharedWorker) -> None:
    result = w.run("""local a = alc.cache('Summarize X')
                      local b = alc.cache('summarize   x')  -- same fingerprint
                      local c = alc.cache('Summarize X', {cache_skip = true})
                      local info = alc.cache_info()
                      alc.cache_clear()
                      return {a, b, c, info, alc.cache_info()}""", echo)
    a, b, c, info, cleared = result
    assert a == b == "echo: Summarize X" and c == "echo: Summarize X"
    assert len(w.queries) == 2
    assert info == {"entries": 1, "hits": 1, "misses": 1, "max_entries": 256}
    assert cleared["hits"] == 0 and cleared["misses"] == 0


# ----------------------------------------------------------------------------- combinators


def test_vote_returns_winner_count_total(w: SharedWorker) -> None:
    assert w.run("return alc.vote({'yes', ' yes ', 'no', 'yes'})") == \
        {"winner": "yes", "count": 3, "total": 4}
    assert w.run("return alc.vote({'a', 'b'})") == {"winner": "a", "count": 1, "total": 2}
    assert w.run("return alc.vote({})") == {"count": 0, "total": 0}


@pytest.mark.parametrize(("args", "expected"), [
    ("'Score: 8/10'", 8), ("'no digits'", 5), ("'15'", 10), ("'0'", 1),
    ("'nothing', 3", 3), ("'7.9'", 7), ("nil", 5),
])
def test_parse_score_first_integer_clamped(w: SharedWorker, args: str, expected: int) -> None:
    assert w.run(f"return alc.parse_score({args})") == expected


@pytest.mark.parametrize(("args", "expected"), [
    ("'Found 3 subtasks to implement'", 3), ("'Score: 7.5/10'", 7.5),
    ("'Created 3 subtasks for implementation', '(%d+)%s+subtask'", 3),
    ("'Temperature: -5 degrees'", -5), ("'no numbers here'", None), ("42", None),
])
def test_parse_number(w: SharedWorker, args: str, expected: float | None) -> None:
    assert w.run(f"return alc.parse_number({args})") == expected


def test_map_filter_reduce(w: SharedWorker) -> None:
    assert w.run("return alc.map({1, 2, 3}, function(x, i) return x * 10 + i end)") == \
        [11, 22, 33]
    assert w.run("return alc.filter({1, 2, 3, 4}, function(x) return x % 2 == 0 end)") == [2, 4]
    assert w.run("return alc.reduce({10, 20, 30}, function(a, x) return a + x end)") == 60
    assert w.run("return alc.reduce({'a', 'b', 'c'}, function(a, x) return a .. x end)") == "abc"
    assert w.run("""local seen = {}
        alc.reduce({10, 20, 30}, function(a, x, i) seen[#seen + 1] = i; return a + x end)
        return seen""") == [2, 3]
    assert w.run("return alc.reduce({5}, function(a, x) return a * x end, 10)") == 50


def test_fingerprint_is_normalized_djb2(w: SharedWorker) -> None:
    fp, same, other = w.run("""return {alc.fingerprint('  Hello  World  '),
        alc.fingerprint('hello world'), alc.fingerprint('hello there')}""")
    assert fp == same != other
    h = 5381
    for b in b"hello world":
        h = (h * 33 + b) % 2**32
    assert fp == f"{h:08x}"


def test_tuning_deep_merges_dicts_and_replaces_arrays(w: SharedWorker) -> None:
    assert w.run("""return alc.tuning({exponents = {alpha = 1.0, beta = 1.0}, list = {1, 2},
                                       k = 3, _schema = {x = 1}},
                                      {exponents = {alpha = 2.0}, list = {9}, other = 1})""") == \
        {"exponents": {"alpha": 2.0, "beta": 1.0}, "list": [9], "k": 3}
    assert w.run("return alc.tuning({k = 1, j = 2}, {pkg = {k = 5}}, {prefix = 'pkg'})") == \
        {"k": 5, "j": 2}


def test_pipe_passes_results_on_as_task_and_records_history(w: SharedWorker) -> None:
    result = w.run("""return alc.pipe({
            function(c) c.result = {n = 1}; return c end,
            function(c) c.result = 'saw ' .. c.task; return c end,
          }, {task = 'start'})""")
    assert result["result"] == 'saw {"n":1}'
    assert result["pipe_history"] == [{"strategy": "(inline-1)", "result": {"n": 1}},
                                      {"strategy": "(inline-2)", "result": 'saw {"n":1}'}]
    skipped = w.run("""return alc.pipe({function() error('boom') end,
            function(c) c.result = 'ok'; return c end}, {task = 't'}, {on_error = 'skip'})""")
    assert skipped["result"] == "ok" and "boom" in skipped["pipe_history"][0]["error"]
    with fails("alc.pipe: strategies must be a non-empty array"):
        w.run("return alc.pipe({}, {})")


def test_fork_runs_strategies_in_their_own_vms_with_one_batch_per_round(
        w: SharedWorker, tmp_path: Path) -> None:
    (tmp_path / "s_upper.lua").write_text(
        "return {run = function(ctx) LEAK = 'from s_upper'\n"
        "return {out = alc.llm('up ' .. ctx.task):upper()} end}")
    (tmp_path / "s_twice.lua").write_text(
        "return {run = function(ctx) local a = alc.llm('one ' .. ctx.task)\n"
        "return {out = a .. '+' .. alc.llm('two ' .. ctx.task), leak = LEAK or 'none'} end}")
    (tmp_path / "s_fail.lua").write_text("return {run = function() error('nope') end}")
    results = w.run("return alc.fork({'s_upper', 's_twice', 's_fail'}, {task = 'x'})", echo,
                    lib_paths=[str(tmp_path)])
    assert results[0] == {"strategy": "s_upper", "ok": True, "result": {"out": "ECHO: UP X"}}
    assert results[1] == {"strategy": "s_twice", "ok": True,  # its own VM: no LEAK
                          "result": {"out": "echo: one x+echo: two x", "leak": "none"}}
    assert results[2]["ok"] is False and "nope" in results[2]["error"]
    assert [q.prompt for q in w.queries] == ["up x", "one x", "two x"]
    with fails("alc.fork: strategy 's_fail' failed"):
        w.run("return alc.fork({'s_fail'}, {}, {on_error = 'fail'})", lib_paths=[str(tmp_path)])
    with fails("invalid strategy name"):
        w.run("return alc.fork({'../etc'}, {})")


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize(("text", "opts", "expected"), [
    ("a\nb\nc\nd\ne", "{size = 2}", ["a\nb", "c\nd", "e"]),
    ("", "nil", []),
    ("a\nb", "{size = 10}", ["a\nb"]),
    ("a\nb\nc\nd", "{size = 2, overlap = 1}", ["a\nb", "b\nc", "c\nd"]),
    ("a\nb", "{size = 0}", []),
    ("abcdefg", "{mode = 'chars', size = 3}", ["abc", "def", "g"]),
    ("abcdef", "{mode = 'chars', size = 4, overlap = 2}", ["abcd", "cdef"]),
    ("line\r\nnext\n", "{size = 1}", ["line", "next"]),
])
def test_chunk(w: SharedWorker, text: str, opts: str, expected: list[str]) -> None:
    assert w.run(f"return alc.chunk({json.dumps(text)}, {opts})") == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("Verdict: BLOCKED. Fix the issues.", "BLOCKED"),
    ("the answer is pass", "PASS"),
    ("First PASS, but on reflection BLOCKED", "BLOCKED"),
    ("Result: PASSS", "PASS"),
    ("nothing relevant", None),
])
def test_match_enum(w: SharedWorker, text: str, expected: str | None) -> None:
    assert w.run(f"return alc.match_enum({json.dumps(text)}, {{'PASS', 'BLOCKED'}})") == expected


def test_match_enum_threshold(w: SharedWorker) -> None:
    assert w.run("return alc.match_enum('PAS', {'PASS'}, {threshold = 0.99})") is None


@pytest.mark.parametrize(("text", "expected"), [
    ("Approved. The plan looks good.", True), ("rejected: missing tests", False),
    ("I need more information", None), ("No, wait: yes", True), ("yes... actually no", False),
    ("nobody knows", None), ("LGTM", True),
])
def test_match_bool(w: SharedWorker, text: str, expected: bool | None) -> None:
    assert w.run(f"return alc.match_bool({json.dumps(text)})") is expected


# ----------------------------------------------------------------------------- state


def test_state_functions_persist_per_namespace(w: SharedWorker) -> None:
    ns = "t_state"
    result = w.run("""
        alc.state.set('x', {1, 2})
        local first = alc.state.set_nx('once', 'a')
        local second = alc.state.set_nx('once', 'b')
        local n1 = alc.state.incr('n')
        local n2 = alc.state.incr('n', 2.5)
        local m = alc.state.incr('m', 1, 10)
        local u = alc.state.update('counter', function(c) return c + 1 end, 41)
        alc.state.set('gone', true)
        alc.state.delete('gone')
        local keys = alc.state.keys()
        table.sort(keys)
        return {x = alc.state.get('x'), first = first, second = second,
                once = alc.state.get('once'),
                n = {n1, n2}, m = m, u = u, has = {alc.state.has('x'), alc.state.has('gone')},
                missing = alc.state.get('missing', 'dflt'), keys = keys}""", ctx={"_ns": ns})
    assert result == {"x": [1, 2], "first": True, "second": False, "once": "a",
                      "n": [1.0, 3.5], "m": 11.0, "u": 42,
                      "has": [True, False], "missing": "dflt",
                      "keys": ["counter", "m", "n", "once", "x"]}
    on_disk = json.loads((w.home / "state" / f"{ns}.json").read_text())
    assert on_disk["x"] == [1, 2] and on_disk["n"] == 3.5
    # the next session sees it; another namespace does not
    assert w.run("return alc.state.get('once')", ctx={"_ns": ns}) == "a"
    assert w.run("alc.state.set('nothing', nil) return {alc.state.get('nothing', 1) == alc.null,"
                 " alc.state.has('nothing')}", ctx={"_ns": ns}) == [True, True]
    assert w.run("return alc.state.get('once', 'none')") == "none"
    with fails("incr: value at 'x' is not a number"):
        w.run("return alc.state.incr('x')", ctx={"_ns": ns})
    with fails("Invalid namespace"):
        w.run("return alc.state.get('k')", ctx={"_ns": "../evil"})


# ----------------------------------------------------------------------------- cards


def test_card_lifecycle_on_disk(w: SharedWorker) -> None:
    created = w.run("""return alc.card.create({pkg = {name = 'cot'},
        model = {id = 'claude-opus-4-6'}, params = {depth = 3},
        stats = {pass_rate = 0.75, n = 4}, scenario = {name = 'math'}})""")
    card_id, path = created["card_id"], Path(created["path"])
    assert card_id.startswith("cot_opus46_")
    assert path == w.home / "cards" / "cot" / f"{card_id}.toml"
    on_disk = tomllib.loads(path.read_text())
    assert on_disk["schema_version"] == "card/v0" and on_disk["pkg"] == {"name": "cot"}
    h = 5381  # DJB2 (64-bit) of the params' stable JSON, as algocline's card.rs
    for b in b'{"depth":3}':
        h = (h * 33 + b) % 2**64
    assert on_disk["param_fingerprint"] == f"{h:016x}"
    card = w.run(f"return alc.card.get('{card_id}')")
    assert card["stats"] == {"pass_rate": 0.75, "n": 4} and card["card_id"] == card_id
    merged = w.run(f"return alc.card.append('{card_id}', {{notes = {{text = 'hi'}}}})")
    assert merged["notes"] == {"text": "hi"}
    with fails("key 'stats' already set on card"):
        w.run(f"return alc.card.append('{card_id}', {{stats = {{}}}})")
    with fails("pkg.name is required"):
        w.run("return alc.card.create({stats = {}})")
    listed = w.run("return alc.card.list({pkg = 'cot'})")
    assert listed[0] == {"card_id": card_id, "pkg": "cot", "created_at": card["created_at"],
                         "model": "claude-opus-4-6", "scenario": "math", "pass_rate": 0.75}
    assert w.run("return alc.card.get('nope_missing')") is None


def test_card_aliases_find_samples_and_lineage(w: SharedWorker) -> None:
    ids = w.run("""
        local a = alc.card.create({pkg = {name = 'lin'}, card_id = 'lin_a',
          stats = {pass_rate = 0.5}})
        local b = alc.card.create({pkg = {name = 'lin'}, card_id = 'lin_b',
          stats = {pass_rate = 0.9},
          metadata = {prior_card_id = 'lin_a', prior_relation = 'derived_from'}})
        local c = alc.card.create({pkg = {name = 'lin'}, card_id = 'lin_c',
          stats = {pass_rate = 0.7},
          metadata = {prior_card_id = 'lin_b', prior_relation = 'sweep_variant'}})
        return {a.card_id, b.card_id, c.card_id}""")
    assert ids == ["lin_a", "lin_b", "lin_c"]
    alias = w.run("return alc.card.alias_set('best', 'lin_b', {pkg = 'lin', note = 'top'})")
    assert {k: alias[k] for k in ("name", "card_id", "pkg", "note")} == \
        {"name": "best", "card_id": "lin_b", "pkg": "lin", "note": "top"}
    assert w.run("return alc.card.get_by_alias('best').card_id") == "lin_b"
    assert w.run("return alc.card.get_by_alias('unknown')") is None
    assert [a["name"] for a in w.run("return alc.card.alias_list({pkg = 'lin'})")] == ["best"]
    with fails("alc.card.alias_set: card 'nope' not found"):
        w.run("return alc.card.alias_set('x', 'nope')")
    found = w.run("""return alc.card.find({pkg = 'lin', where = {stats = {pass_rate = {gte = 0.6}}},
                                          order_by = '-stats.pass_rate'})""")
    assert [c["card_id"] for c in found] == ["lin_b", "lin_c"]
    found = w.run("""return alc.card.find({where = {_or = {{card_id = 'lin_a'},
        {metadata = {prior_relation = {starts_with = 'sweep'}}}}}, order_by = 'card_id',
        limit = 5})""")
    assert [c["card_id"] for c in found] == ["lin_a", "lin_c"]
    for where, expected in [
        ("{card_id = {['in'] = {'lin_a', 'lin_c'}}}", ["lin_a", "lin_c"]),
        ("{metadata = {prior_card_id = {exists = false}}}", ["lin_a"]),
        ("{card_id = {nin = {'lin_a'}}, stats = {pass_rate = {lt = 0.8}}}", ["lin_c"]),
        ("{metadata = {prior_relation = {contains = 'variant'}}}", ["lin_c"]),
        ("{_not = {stats = {pass_rate = {gte = 0.6}}}}", ["lin_a"]),
        ("{_and = {{stats = {n = {exists = false}}}, {card_id = {ne = 'lin_b'}}}}",
         ["lin_a", "lin_c"]),
    ]:
        found = w.run(f"return alc.card.find({{pkg = 'lin', where = {where},"
                      " order_by = 'card_id'})")
        assert [c["card_id"] for c in found] == expected, where
    with fails("alc.card.find: limit must be a non-negative integer, got -1"):
        w.run("return alc.card.find({limit = -1})")
    with fails("_or must be an array of sub-predicates"):
        w.run("return alc.card.find({where = {_or = 1}})")
    written = w.run("return alc.card.write_samples('lin_a', {{i = 1, ok = true}, {i = 2}})")
    assert written["count"] == 2 and written["path"].endswith("lin/lin_a.samples.jsonl")
    assert w.run("return alc.card.read_samples('lin_a', {where = {ok = true}})") == \
        [{"i": 1, "ok": True}]
    assert w.run("return alc.card.read_samples('lin_a', {offset = 1, limit = 1})") == [{"i": 2}]
    with fails("alc.card.write_samples: samples must be an array"):
        w.run("return alc.card.write_samples('lin_b', {a = 1})")
    with fails("samples already exist for card 'lin_a'"):
        w.run("return alc.card.write_samples('lin_a', {{i = 3}})")
    up = w.run("return alc.card.lineage({card_id = 'lin_c'})")
    assert [(n["card_id"], n["depth"]) for n in up["nodes"]] == \
        [("lin_c", 0), ("lin_b", -1), ("lin_a", -2)]
    assert up["edges"][0] == {"from": "lin_c", "to": "lin_b", "relation": "sweep_variant"}
    assert up["truncated"] is False
    down = w.run("return alc.card.lineage({card_id = 'lin_a', direction = 'down', depth = 1,"
                 " include_stats = false})")
    assert [(n["card_id"], n["depth"]) for n in down["nodes"]] == [("lin_a", 0), ("lin_b", 1)]
    assert down["truncated"] is True and "stats" not in down["nodes"][0]
    with fails("unknown sink: warehouse"):
        w.run("return alc.card.sink_backfill({sink = 'warehouse'})")


# ----------------------------------------------------------------------------- misc natives


def test_stats_time_dirs_and_progress(w: SharedWorker) -> None:
    result = w.run("""alc.stats.record('acc', {0.5, 0.75})
                      alc.progress(1, 3, 'first')
                      local t = alc.time()
                      return {stats = alc.stats.get('acc'), missing = alc.stats.get('x') == nil,
                              t = t, dirs = alc._dirs}""")
    assert result["stats"] == [0.5, 0.75] and result["missing"] is True
    assert abs(result["t"] - __import__("time").time()) < 60
    assert result["dirs"]["state"] == str(w.home / "state")
    assert result["dirs"]["cards"] == str(w.home / "cards")
    assert result["dirs"]["scenarios"].endswith("scenarios")


def test_print_log_progress_and_stats_reach_the_finished_metrics(w: SharedWorker) -> None:
    w.run("""print('a', 1, nil, true)
             alc.log('warn', 'careful')
             alc.log('shout', 'unknown level')
             alc.progress(2, 5, 'half way')
             alc.stats.record('acc', 0.5)
             return 1""")
    logs = [(e["level"], e["source"], e["message"]) for e in w.metrics["recent_logs"]]
    assert logs == [("info", "alc.lua.print", "a\t1\tnil\ttrue"), ("warn", "alc.log", "careful"),
                    ("shout", "alc.log", "unknown level")]
    assert w.metrics["progress"] == {"step": 2, "total": 5, "message": "half way"}
    assert w.metrics["custom"] == {"acc": 0.5}


def test_budget_counts_llm_calls(w: SharedWorker) -> None:
    ctx = {"budget": {"max_llm_calls": 2}}
    assert w.run("""local before = alc.budget_remaining()
                    alc.llm('a')
                    local after = alc.budget_remaining()
                    return {before.llm_calls, alc.budget_check(), after.llm_calls}""",
                 echo, ctx=ctx) == [2, True, 1]
    with fails("budget_exceeded: max_llm_calls (2) reached (2 used)"):
        w.run("alc.llm('a'); alc.llm('b'); return alc.llm('c')", echo, ctx=ctx)
    assert w.run("alc.llm('a'); alc.llm('b'); return alc.budget_check()", echo, ctx=ctx) is False
    assert w.run("return {alc.budget_remaining() == nil, alc.budget_check()}") == [True, True]
    tokens = {"budget": {"max_tokens": 25}}
    assert w.run("alc.llm('a') local r = alc.budget_remaining()"
                 " return {r.tokens, r.llm_calls == alc.null}", echo, ctx=tokens,
                 usage={"prompt_tokens": 6, "completion_tokens": 4}) == [15, True]
    with fails("budget_exceeded: max_tokens (25) reached (30 used)"):
        w.run("for i = 1, 5 do alc.llm('a') end", echo, ctx=tokens,
              usage={"prompt_tokens": 6, "completion_tokens": 4})
    assert w.run("return alc.budget_remaining().elapsed_ms",
                 ctx={"budget": {"max_elapsed_ms": 60000}}) > 50000
    with fails("budget_exceeded: max_elapsed_ms (0ms) reached"):
        w.run("return alc.llm('late')", ctx={"budget": {"max_elapsed_ms": 0}})


def test_math_rng_is_reproducible_per_seed(w: SharedWorker) -> None:
    code = """local r = alc.math.rng_create(%d)
              local out = {}
              for i = 1, 4 do out[i] = alc.math.rng_float(r) end
              out[5] = alc.math.rng_int(r, 1, 6)
              out[6] = alc.math.categorical_sample(r, {0, 1, 0})
              return out"""
    a, b, c = w.run(code % 7), w.run(code % 7), w.run(code % 8)
    assert a == b != c
    assert all(0 <= x < 1 for x in a[:4]) and 1 <= a[4] <= 6 and a[5] == 2
    shuffled = w.run("""local t = {1, 2, 3, 4, 5}
        local same = alc.math.shuffle(alc.math.rng_create(1), t)
        return {same == t, t}""")
    assert shuffled[0] is True and sorted(shuffled[1]) == [1, 2, 3, 4, 5]
    with fails("expected a LuaRng"):
        w.run("return alc.math.rng_float({})")
    # two handles with one seed give one stream, also across the 256-draw buffer
    same, count = w.run("""local a, b = alc.math.rng_create(3), alc.math.rng_create(3)
        local same, n = true, 0
        for i = 1, 600 do
          local x, y = alc.math.rng_float(a), alc.math.rng_float(b)
          if x ~= y then same = false end
          if x >= 0 and x < 1 then n = n + 1 end
        end
        return {same, n}""")
    assert same is True and count == 600


def test_math_statistics(w: SharedWorker) -> None:
    r = w.run("""local m = alc.math
        return {mean = m.mean({1, 2, 3, 4}), var = m.variance({1, 2, 3, 4}),
                median = m.median({3, 1, 2, 4}), p25 = m.percentile({1, 2, 3, 4, 5}, 25),
                iqr = m.iqr({1, 2, 3, 4, 5}), cdf = m.normal_cdf(0, 0, 1),
                ppf = m.normal_ppf(0.975), soft = m.softmax({1, 1}),
                wilson = m.wilson_ci(5, 10, 0.95), corr = m.correlation({1, 2, 3}, {2, 4, 6}),
                beta_mean = m.beta_mean(2, 2), fact = m.factorial(5),
                welch = m.welch_t_test({1, 2, 3, 4}, {2, 3, 4, 5}), rank = m.rank({10, 20, 20, 5}),
                entropy = m.entropy({0.5, 0.5}), hist = m.histogram({1, 2, 2, 3}, 2),
                ndcg = m.ndcg({3, 2, 1}, 3), perms = #m.permutations(3)}""")
    assert r["mean"] == 2.5 and r["var"] == pytest.approx(5 / 3) and r["median"] == 2.5
    assert r["p25"] == 2.0 and r["iqr"] == 2.0
    assert r["cdf"] == pytest.approx(0.5) and r["ppf"] == pytest.approx(1.959964, abs=1e-6)
    assert r["soft"] == [0.5, 0.5] and r["corr"] == pytest.approx(1.0)
    assert r["wilson"]["center"] == pytest.approx(0.5)
    assert r["wilson"]["lower"] == pytest.approx(0.2366, abs=1e-4)
    assert r["beta_mean"] == 0.5 and r["fact"] == 120
    assert r["welch"]["t_stat"] == pytest.approx(-1.0954, abs=1e-4)
    assert r["welch"]["p_value"] == pytest.approx(0.3153, abs=1e-3)
    assert r["rank"] == [2.0, 3.5, 3.5, 1.0]
    assert r["entropy"] == pytest.approx(math.log(2))
    assert r["hist"] == {"counts": [1, 3], "edges": [1.0, 2.0, 3.0]}
    assert r["ndcg"] == pytest.approx(1.0) and r["perms"] == 6
    with fails("alc.math.mean: data must be a non-empty array"):
        w.run("return alc.math.mean({})")


def test_std_global_for_evalframe(w: SharedWorker, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello")
    result = w.run(f"""return {{std.json.encode({{a = 1}}), std.json.decode('[1]'),
        std.fs.read({json.dumps(str(tmp_path / "data.txt"))}),
        std.fs.is_file({json.dumps(str(tmp_path / "data.txt"))}),
        std.fs.is_file({json.dumps(str(tmp_path / "none.txt"))}), std.time.now() > 0}}""",
                   lib_paths=[str(tmp_path)])
    assert result == ['{"a":1}', [1], "hello", True, False, True]
    with fails("std is read-only (cannot set read)"):
        w.run("std.fs.read = function() return 'forged' end")


@pytest.mark.skipif(not (CORPUS / "evalframe").is_dir(), reason="pinned evalframe is absent")
def test_eval_runs_a_strategy_on_an_inline_scenario_and_emits_a_card(
        w: SharedWorker, tmp_path: Path) -> None:
    (tmp_path / "say.lua").write_text(
        "return {run = function(ctx) ctx.result = alc.llm(ctx.task); return ctx end}")
    lib_paths = [str(tmp_path), str((CORPUS / "evalframe").resolve())]
    report = w.run("""return alc.eval({cases = {{input = 'two plus two', expected = '4'},
                                               {input = 'three', expected = '3'}}}, 'say',
                                      {auto_card = true})""",
                   lambda q: "4", lib_paths=lib_paths)
    assert report["aggregated"]["total"] == 2 and report["aggregated"]["passed"] == 1
    card = w.run(f"return alc.card.get('{report['card_id']}')")
    assert card["pkg"]["name"] == "say" and card["stats"]["n"] == 2
    with fails("could not resolve scenario 'no_such_scenario'"):
        w.run("return alc.eval('no_such_scenario', 'say')", lib_paths=lib_paths)
    # a named scenario from the scenarios directory (alc._dirs.scenarios), simple form
    scenarios = w.home / "alc" / "scenarios"
    scenarios.mkdir(parents=True, exist_ok=True)
    (scenarios / "mine.lua").write_text(
        "return {graders = {'contains'}, cases = {{input = 'q', expected = '4'}}}")
    report = w.run("return alc.eval('mine', 'say')", lambda q: "it is 4", lib_paths=lib_paths)
    assert report["name"] == "say:mine" and report["aggregated"]["passed"] == 1


@pytest.mark.skipif(not (CORPUS / "evalframe").is_dir(), reason="pinned corpus is absent")
def test_eval_with_a_pinned_scenario_in_evalframe_form(w: SharedWorker, tmp_path: Path) -> None:
    """math_basic: ef.bind graders and named ef.case cases, resolved through require."""
    (tmp_path / "say.lua").write_text(
        "return {run = function(ctx) ctx.result = alc.llm(ctx.task); return ctx end}")
    answers = {"2+2": "4", "15-7": "8", "7*8": "56", "144/12": "12", "2^10": "1024",
               "prime": "Yes", "5!": "120"}

    def respond(query: Query) -> str:
        return next((a for k, a in answers.items() if k in query.prompt), "?")
    report = w.run("return alc.eval('scenarios.math_basic', 'say')", respond,
                   lib_paths=[str(tmp_path), str((CORPUS / "algocline-bundled-packages").resolve()),
                              str((CORPUS / "evalframe").resolve())])
    assert report["name"] == "say:scenarios.math_basic"
    assert report["aggregated"]["total"] == 7 and report["aggregated"]["passed"] == 7
    assert len(w.queries) == 7


@pytest.mark.usefixtures("w")  # its home; not pool_home, whose teardown kills w's worker
def test_json_too_big_for_the_memory_cap_is_a_lua_error() -> None:
    """alc.json_decode beyond the cap: a Lua error naming the cap (nothing is copied into
    Lua first, so the VM neither aborts nor thrashes); the same connection goes on."""
    big = ("local parts = {} for i = 1, 300000 do parts[i] = '[1,2,3]' end "
           "local s = '[' .. table.concat(parts, ',') .. ']' "
           "local ok, e = pcall(alc.json_decode, s) return {ok, e}")

    async def main() -> list[Any]:
        client, _ = await spawn_and_connect(
            "{python} -m pool_notebook.worker --max-memory-mb 24 --sid {sid} --sock {sock}")
        async with client:
            out = [(await client.run(code)).feed_result
                   for code in (big, "return alc.json_decode('[1, 2]')")]
            await client.shutdown()
            return out
    refused, after = asyncio.run(asyncio.wait_for(main(), 120))
    ok, message = refused.outcome.result
    assert ok is False and "memory cap" in message, message
    assert after.outcome.result == [1, 2]


@pytest.mark.usefixtures("w")
def test_state_is_charged_per_key_while_it_stands() -> None:
    """Setting one key (or stat) again and again, or deleting it, does not use up the cap;
    many distinct big keys do, with the cap named."""
    mib = "('x'):rep(2^20)"

    async def main() -> list[Any]:
        client, _ = await spawn_and_connect(
            "{python} -m pool_notebook.worker --max-memory-mb 16 --sid {sid} --sock {sock}")
        async with client:
            out = [(await client.run(code, ctx={"_ns": "t_charge"})).feed_result.outcome
                   for code in (
                       f"for i = 1, 40 do alc.state.set('same', {mib} .. i) end return 'ok'",
                       f"for i = 1, 40 do alc.state.set('k', {mib}); alc.state.delete('k') end"
                       " return 'ok'",
                       f"for i = 1, 40 do alc.stats.record('s', {mib}) end return 'ok'",
                       f"for i = 1, 40 do alc.state.set('k' .. i, {mib}) end return 'ok'")]
            await client.shutdown()
            return out
    same, deleted, stat, many = asyncio.run(asyncio.wait_for(main(), 120))
    assert same.result == "ok" and deleted.result == "ok" and stat.result == "ok"
    assert "memory cap of 16 MiB" in many.error


MATH_CALLS = {
    "rng_create": "1", "rng_float": "r", "rng_int": "r, 1, 6", "normal_sample": "r, 0, 1",
    "beta_sample": "r, 2, 3", "gamma_sample": "r, 2, 1", "exp_sample": "r, 1.5",
    "uniform_sample": "r, 0, 2", "lognormal_sample": "r, 0, 1", "student_t_sample": "r, 3",
    "chi_squared_sample": "r, 2", "poisson_sample": "r, 3", "binomial_sample": "r, 10, 0.5",
    "dirichlet_sample": "r, {1, 2, 3}", "categorical_sample": "r, {1, 2}",
    "shuffle": "r, {1, 2, 3}", "sample_with_replacement": "r, {'a', 'b'}, 3",
    "mean": "d", "variance": "d", "stddev": "d", "median": "d", "percentile": "d, 90",
    "iqr": "d", "covariance": "d, e", "correlation": "d, e", "softmax": "d",
    "log_normalize": "d", "histogram": "d, 3", "wilson_ci": "3, 10, 0.9",
    "normal_cdf": "1, 0, 1", "beta_cdf": "0.5, 2, 3", "gamma_cdf": "1, 2, 1",
    "poisson_cdf": "2, 3", "normal_inverse_cdf": "0.3, 1, 2", "normal_ppf": "0.9",
    "beta_ppf": "0.5, 2, 3", "beta_mean": "2, 3", "beta_variance": "2, 3", "erf": "0.5",
    "erfc": "0.5", "lgamma": "4.5", "beta": "2, 3", "ln_beta": "2, 3",
    "regularized_incomplete_beta": "0.5, 2, 3", "regularized_incomplete_gamma": "2, 1",
    "digamma": "2", "factorial": "6", "ln_factorial": "6", "logsumexp": "d", "logit": "0.3",
    "expit": "0.5", "welch_t_test": "d, e", "mann_whitney_u": "d, e", "chi_squared_test": "d, e",
    "ks_test": "d, e", "rank": "d", "spearman_correlation": "d, e", "kendall_tau": "d, e",
    "ndcg": "d, 3", "mrr": "{1, 2, 0}", "entropy": "p", "kl_divergence": "p, q",
    "js_divergence": "p, q", "cross_entropy": "p, q", "moving_average": "d, 2",
    "ewma": "d, 0.5", "autocorrelation": "d, 1", "permutations": "3",
}


def test_every_math_function_answers_with_valid_arguments(w: SharedWorker) -> None:
    from pool_notebook.worker.mathlib import MathLib
    assert set(MATH_CALLS) == MathLib.NAMES
    calls = ",\n".join(f"{name} = alc.math.{name}({args})" for name, args in MATH_CALLS.items())
    result = w.run(f"""local r = alc.math.rng_create(5)
        local d, e = {{1, 2, 4, 8, 9}}, {{2, 1, 5, 7, 10}}
        local p, q = {{0.2, 0.3, 0.5}}, {{0.3, 0.3, 0.4}}
        local out = {{ {calls} }}
        out.rng_create = tostring(out.rng_create)
        return out""")
    assert set(result) == set(MATH_CALLS)
    assert result["rng_create"] == "LuaRng"
    assert result["factorial"] == 720 and result["permutations"][0] == [1, 2, 3]
    assert result["regularized_incomplete_beta"] == pytest.approx(0.6875)
    assert result["normal_inverse_cdf"] == pytest.approx(1 + 2 * -0.5244005, abs=1e-6)
    assert result["mrr"] == pytest.approx(0.5)
    assert sorted(result["shuffle"]) == [1, 2, 3]
    assert all(x in ("a", "b") for x in result["sample_with_replacement"])


@pytest.mark.usefixtures("w")
def test_state_incr_from_two_workers_loses_no_update() -> None:
    """Two workers on one home increment one counter at the same time: every increment
    lands (the namespace file is rewritten under an exclusive lock)."""
    code = "for i = 1, 150 do alc.state.incr('hits') end return alc.state.get('hits')"

    async def both() -> list[Any]:
        clients = [(await spawn_and_connect())[0] for _ in range(2)]  # both ready first
        feeds = await asyncio.gather(*(c.run(code, ctx={"_ns": "t_race"}) for c in clients))
        for c in clients:
            await c.shutdown()
        return [f.feed_result.outcome.result for f in feeds]
    results = asyncio.run(asyncio.wait_for(both(), 120))
    assert max(results) == 300.0 and min(results) >= 150.0
