"""Conformance: every real algocline package runs on the bundled worker.

Each package of the pinned corpus (``../shared/corpus/algocline-bundled-packages``,
with ``evalframe`` also on ``lib_paths``) runs end to end on the worker as spawned
by default (sandbox on), over the wire; every paused query is answered by a
deterministic responder; each run must complete with a non-empty result.

How each package is called: a strategy's ``ctx`` is built in Lua from its own
declared contract (``M.spec.entries.run.input``, required fields only), and
where its docs name more (callbacks, candidate lists, calibration data, smaller
simulation sizes) :data:`CALLS` adds exactly that. Pure-computation packages
(no ``run``) are called as their docs' Usage section shows.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool_notebook.protocol import Query
from tests.alc_worker import SharedWorker, shared_worker

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
PACKAGES = CORPUS / "algocline-bundled-packages"
LIB_PATHS = [str(PACKAGES.resolve()), str((CORPUS / "evalframe").resolve())]
NAMES = sorted(p.name for p in PACKAGES.iterdir() if (p / "init.lua").is_file()) \
    if PACKAGES.is_dir() else []
PER_PACKAGE_TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(
    not NAMES, reason=f"the pinned corpus is absent ({PACKAGES}): see shared/corpus/PIN.md")

# ctx from a contract: required fields only; strings named like a question get one.
SYNTH = r"""
local S = require("alc_shapes")
local synth
local function text(name)
  if name == "task" or name == "question" or name == "query" or name == "problem"
      or name == "prompt" then
    return "What is 2 + 2?"
  end
  return "sample " .. tostring(name or "text")
end
function synth(schema, name, depth)
  if type(schema) == "string" then schema = S[schema] end
  if type(schema) ~= "table" or depth > 8 then return nil end
  local kind = rawget(schema, "kind")
  if kind == "described" then return synth(schema.inner, name, depth) end
  if kind == "optional" then return nil end
  if kind == "ref" then return synth(S[schema.name], name, depth + 1) end
  if kind == "prim" then
    if schema.prim == "string" then return text(name) end
    if schema.prim == "number" then return 3 end
    if schema.prim == "boolean" then return true end
    return {}
  end
  if kind == "any" then return text(name) end
  if kind == "one_of" then return schema.values[1] end
  if kind == "shape" then
    local out = {}
    for k, f in pairs(schema.fields) do out[k] = synth(f, k, depth + 1) end
    return out
  end
  if kind == "array_of" then
    local out = {}
    for i = 1, 3 do
      local v = synth(schema.elem, name, depth + 1)
      out[i] = type(v) == "string" and (v .. " " .. i) or v
    end
    return out
  end
  if kind == "map_of" then
    return { a = synth(schema.val, name, depth + 1), b = synth(schema.val, name, depth + 1) }
  end
  if kind == "discriminated" then
    local tags = {}
    for k in pairs(schema.variants) do tags[#tags + 1] = k end
    table.sort(tags)
    local v = synth(schema.variants[tags[1]], name, depth + 1)
    v[schema.tag] = tags[1]
    return v
  end
  return nil
end
local function contract_ctx(M, extra)
  local entry = type(M.spec) == "table" and M.spec.entries and M.spec.entries.run
  local c = entry and synth(entry.input, "ctx", 0)
  if type(c) ~= "table" then c = { task = "What is 2 + 2?" } end
  for k, v in pairs(extra or {}) do c[k] = v end
  return c
end
"""

# Per package: the Lua body run after `local M = require(NAME)`; it may use
# contract_ctx(M, extra). Omitted: `return M.run(contract_ctx(M))`.
SMALL_SIM = """return M.run(contract_ctx(M, { runs = 3, steps = 10, generations = 3,
    rounds_per_gen = 2, n_agents = 10 }))"""
ORCH = """return M.run(contract_ctx(M, { phases = {
    { name = "plan", prompt = "Plan how to answer: {task}" },
    { name = "solve", prompt = "Answer {task} using the plan: {prev_output}" } } }))"""
CALLS: dict[str, str] = {
    # pure computation: as the Usage sections show
    "abm": """
        local buyer = M.Agent.define { state = { budget = 100 },
          step = function(self) self.state.budget = self.state.budget - 1 end }
        local m = M.Model.new({ scheduler = M.Scheduler.shuffle })
        M.Model.set_seed(m, 7)
        M.Model.add_agents(m, M.Agent.populate(buyer, 5))
        M.Model.run(m, 3)
        return M.mc.run({ sim_fn = function(seed) return { survived = seed % 2 == 0,
          users = seed } end, runs = 5, extract = { "survived", "users" } })""",
    "alc_shapes": """
        local ok, reason = M.check({ answer = "4", panel = {}, votes = {} }, M.voted)
        return { ok = ok, reason = reason or "" }""",
    "bft": """return { valid = M.validate(7, 2), threshold = M.threshold(7, 2),
                       max_faults = M.max_faults(7) }""",
    "civic": """
        local bus = M.broadcast_bus.new()
        bus:publish(1, { signal = 0.9 })
        bus:publish(2, { signal = 0.4 })
        local best = bus:aggregate_for(99, function(src) return src == 1 or src == 2 end,
          function(msgs)
            local b = 0
            for _, m in ipairs(msgs) do if m.signal > b then b = m.signal end end
            return b
          end)
        bus:reset()
        return { max_signal = best }""",
    "condorcet": """return { p = M.prob_majority(5, 0.7), anti = M.is_anti_jury(0.4) }""",
    "cost_pareto": """return { dominates = M.dominates({ accuracy = 0.93, neg_cost = -2.45 },
                                                { accuracy = 0.88, neg_cost = -134.50 }) }""",
    "crdt_doc": """
        local doc = M.doc.new({ id = "canvas-1" })
        M.merge(doc, M.op.set_add("a", "themes", "rugged", "a:1"))
        M.merge(doc, M.op.set_add("b", "themes", "minimal", "b:1"))
        M.merge(doc, M.op.lww_set("a", "title", "draft", 1))
        M.merge(doc, M.op.lww_set("b", "title", "final", 7))
        return M.doc.snapshot(doc)""",
    "ensemble_div": """return M.decompose({ 0.8, 0.6, 0.9 }, 1.0)""",
    "eval_guard": """
        local ok, reason = M.self_critique({ has_external_grader = false })
        return { ok = ok, reason = reason, report = M.check_all({ has_external_grader = false,
          has_baseline = true, metric_type = "absolute" }) }""",
    "flow": """
        local st = M.state_new({ key_prefix = "my_run", id = "abc", resume = true })
        local tok = M.token_issue(st)
        local req = M.token_wrap(tok, { slot = "gate", payload = { task = "2 + 2?" } })
        local out = require("cot").run(req.payload)
        local verified = M.token_verify(tok, out, req)
        M.state_set(st, "gate_ok", true)
        M.state_save(st)
        return { verified = verified, gate_ok = M.state_get(st, "gate_ok") }""",
    "inverse_u": """return M.detect({ 0.70, 0.75, 0.73, 0.71 })""",
    "kemeny": """return M.aggregate({ { "a", "b", "c" }, { "a", "c", "b" }, { "b", "a", "c" } })""",
    "mwu": """
        local u = M.new({ n = 5, T = 100 })
        u:update({ 0.3, 0.8, 0.1, 0.5, 0.2 })
        return { weights = u:weights(), solved = M.solve({ { 0.3, 0.8 }, { 0.1, 0.5 } }) }""",
    "scoring_rule": """return { brier = M.brier(0.8, 1), log = M.log_score(0.8, 1),
        calibration = M.calibration({ 0.1, 0.4, 0.8, 0.9 }, { 0, 0, 1, 1 }, { bins = 2 }) }""",
    "shapley": """
        local v = M.accuracy_coalition({ a = { 1, 0, 1 }, b = { 0, 1, 1 }, c = { 1, 1, 0 } },
          { 1, 1, 0 }, { "a", "b", "c" })
        return { exact = M.exact({ "a", "b", "c" }, v),
                 mc = M.montecarlo({ "a", "b", "c" }, v, { samples = 50 }) }""",
    "solve_verify_split": """return { cost = M.cost(4, 3, 1.0), split = M.optimal_split(100,
        { lambda = 2.0, exponent_solve = 0.57, exponent_verify = 0.39,
          prefactor_solve = 1.0, prefactor_verify = 1.0 }) }""",
    "sprt": """
        local st = M.new({ p0 = 0.5, p1 = 0.75, alpha = 0.05, beta = 0.10 })
        local verdict
        for _, x in ipairs({ 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1 }) do
          M.observe(st, x)
          verdict = M.decide(st)
          if verdict.verdict ~= "continue" then break end
        end
        return verdict""",
    "slm_mux": """
        local profiles = {
          { samples = { { "A", "A", "A" }, { "B", "C", "B" } }, correct = { "A", "B" } },
          { samples = { { "A", "B", "A" }, { "B", "B", "B" } }, correct = { "A", "B" } },
          { samples = { { "C", "A", "A" }, { "C", "C", "B" } }, correct = { "A", "B" } },
        }
        return { best = M.run(profiles, 2), confidence = M.confidence({ "A", "A", "B" }) }""",
    # simulations: the declared run/step counts, small
    "boids_abm": SMALL_SIM, "epidemic_abm": SMALL_SIM, "evogame_abm": SMALL_SIM,
    "opinion_abm": SMALL_SIM, "schelling_abm": SMALL_SIM, "sugarscape_abm": SMALL_SIM,
    "hybrid_abm": """return M.run(contract_ctx(M, { runs = 3, sweep_runs = 3,
        params = { rate = 0.5 },
        sim_fn = function(params, seed) return { score = (seed % 7) * params.rate } end,
        extract = { "score" } })).result""",
    # strategies whose docs require more than their contract's required fields
    "conformal_vote": """
        local function probs(a) return { { A = a, B = 1 - a }, { A = 0.6, B = 0.4 } } end
        local cal = M.calibrate({ calibration_samples = {
          { agent_probs = probs(0.9), true_label = "A" },
          { agent_probs = probs(0.2), true_label = "B" },
          { agent_probs = probs(0.7), true_label = "A" } }, alpha = 0.5 })
        return M.run(contract_ctx(M, { options = { "A", "B" }, calibration = cal,
          agents = { { prompt = "You are an analyst." }, { prompt = "You are a critic." } } }))""",
    "moa": """return M.run(contract_ctx(M, { personas = { "analyst", "critic", "expert" } }))""",
    "reconcile": """return M.run(contract_ctx(M, { personas = { "analyst", "critic" } }))""",
    "listwise_rank": """return M.run(contract_ctx(M, { candidates = { "x", "y", "z" } }))""",
    "pairwise_rank": """return M.run(contract_ctx(M, { candidates = { "x", "y", "z" } }))""",
    "recipe_ranking_funnel": """return M.run(contract_ctx(M,
        { candidates = { "x", "y", "z", "w" } }))""",
    "particle_infer": """return M.run(contract_ctx(M, {
        prm_fn = function(partial, task) return 0.6 end,
        orm_fn = function(final, task) return 0.7 end }))""",
    "smc_sample": """return M.run(contract_ctx(M, {
        reward_fn = function(answer, task) return 0.5 end }))""",
    "propose_verify": """return M.run(contract_ctx(M, { score_threshold = 0.5 }))""",
    "recipe_deep_panel": """return M.run(contract_ctx(M, { task_id = "corpus-deep-panel",
        p_estimate = 0.7 }))""",
    "optimize": """return M.run(contract_ctx(M, { scenario = "math_basic" }))""",
    "orch_fixpipe": ORCH, "orch_adaptive": ORCH, "orch_gatephase": ORCH,
    "recipe_safe_panel": """return M.run(contract_ctx(M, { p_estimate = 0.7 }))""",
    "recipe_trace": """return M.run(contract_ctx(M, { recipe = require("recipe_quick_vote") }))""",
    "isp_aggregate": """
        local cal = M.calibrate({ calibration_tensor = { { "A", "A", "B", "A", "A" },
          { "B", "B", "B", "C", "B" }, { "A", "C", "A", "A", "C" } }, options = { "A", "B", "C" },
          method = "isp" })
        return M.run(contract_ctx(M, { options = { "A", "B", "C" }, calibration = cal,
          method = "isp" }))""",
}


def respond(query: Query) -> str:
    """Deterministic answers shaped to what the prompt asks for."""
    prompt = query.prompt
    low = prompt.lower()
    if "verdict: a" in low:
        return "Verdict: A"
    if "json" in low:
        return json.dumps({"answer": "4", "score": 7, "confidence": 0.8, "verdict": "pass",
                           "items": ["4"], "reasoning": "2 + 2 = 4"})
    choices = re.findall(r"^\s*\[?([A-E1-9])[\].):]", prompt, re.MULTILINE)
    if choices:
        return f"{choices[0]}\nAnswer: {choices[0]}. Score: 7/10. YES"
    return "1. Answer: 4. Score: 7/10. YES, the answer is 4."


@pytest.fixture(scope="module")
def worker() -> Iterator[SharedWorker]:
    yield from shared_worker()


@pytest.mark.parametrize("name", NAMES)
def test_package_runs_to_a_result(worker: SharedWorker, name: str) -> None:
    body = CALLS.get(name, "return M.run(contract_ctx(M))")
    code = f"{SYNTH}\nlocal M = require({json.dumps(name)})\n{body}\n"
    result = worker.run(code, respond, lib_paths=LIB_PATHS, timeout=PER_PACKAGE_TIMEOUT)
    assert result not in (None, "", [], {}), f"{name} returned an empty result: {result!r}"


def test_every_pinned_package_is_covered() -> None:
    """134 packages are pinned; a package without a case here would be a silent gap."""
    assert len(NAMES) == 134, NAMES
    assert set(CALLS) <= set(NAMES), set(CALLS) - set(NAMES)
    assert os.path.isdir(LIB_PATHS[1])
