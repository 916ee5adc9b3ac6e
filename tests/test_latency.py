"""Latency coefficients (App. A) and the episode cost model (Eq. 9)."""
from __future__ import annotations

import json

import polars as pl
import pytest

from dmr import latency


def steps(rows):
    return pl.DataFrame(rows, schema={"llm_time": pl.Float64, "completion_tokens": pl.Int64}, orient="row")


def test_coefficient_is_pooled_not_averaged_per_run():
    # Run A: 2 s over 10 tokens (0.2 s/tok); run B: 1 s over 40 tokens (0.025 s/tok). Pooled as in
    # Eq. 10: (2 + 1) / (10 + 40) = 0.06, not the mean of the per-run ratios (0.1125).
    a = steps([(1.5, 6), (0.5, 4)])
    b = steps([(0.25, 10), (0.25, 10), (0.5, 20)])
    c = latency.token_coefficient([a, b])
    assert c["coef"] == pytest.approx(3.0 / 50)
    assert c["tokens"] == 50 and c["calls"] == 5 and c["time"] == pytest.approx(3.0)


def test_coefficient_needs_tokens():
    with pytest.raises(ValueError, match="no completion tokens"):
        latency.token_coefficient([steps([(1.0, 0)])])


def test_cost_model_matches_hand_computation():
    # 12 decisions at 20 ms, 30 bf16 tokens at 25 ms, 50 low tokens at 15 ms = 0.24 + 0.75 + 0.75 s.
    assert latency.episode_cost(12, 30, 50, 0.020, 0.025, 0.015) == pytest.approx(1.74)
    coef = {"high": "bf16", "per_token": {"bf16": 0.025, "q": 0.015}, "router": 0.020}
    eps = pl.DataFrame({"task": ["a", "b"], "calls": [12, 4], "high_tokens": [30, 0], "tokens": [80, 10]})
    # a: 3 bf16 steps of 10 tokens and 9 low ones of 50 in all; b: 4 low steps of 10 in all.
    routed = pl.DataFrame({"task": ["a"] * 12 + ["b"] * 4, "route_score": [0.5] * 16,
                           "precision": ["bf16"] * 3 + ["q"] * 13,
                           "completion_tokens": [10] * 3 + [5] * 8 + [10] + [3, 3, 2, 2]})
    assert latency.episodes_cost(eps, routed, coef, "q").to_list() == pytest.approx([1.74, 0.08 + 0.15])
    # A single-precision run has no router: no step has a route score, n = 0.
    fixed = routed.with_columns(pl.lit(None, pl.Float64).alias("route_score"))
    assert latency.episodes_cost(eps, fixed, coef, "q").to_list() == pytest.approx([1.5, 0.15])


def _webshop_episode(router, key="shop/test/0"):
    """A WebShop-like episode played through `router` as the agent loop records it: its step rows
    (task, step type, precision, route_score, completion tokens). Search steps come first and again
    after a 'back to search'; the step type is known before the router decides (App. C.1)."""
    from dmr.routing import StepContext

    types = ["search", "click", "click", "click", "search", "click", "click"]
    rows = []
    for i, t in enumerate(types):
        ctx = StepContext(key, i, "buy a red mug under 20 dollars", [], "page", [], step_type=t)
        precision = router.decide([ctx])[0]
        score = (getattr(router, "last_scores", None) or [None])[0]
        rows.append({"task": key, "step": i, "step_type": t, "precision": precision, "route_score": score,
                     "completion_tokens": 40 if t == "search" else 10})
    return rows


def test_router_calls_exclude_forced_search_steps_in_table1_and_the_grpo_reward():
    """App. A.2: n counts router-decided steps, not steps forced to bf16 by the step-type protocol.
    One count (latency.router_calls) for Table 1's modelled time and GRPO's reward: a KL-ST-style run
    gated to click steps has 5 router calls in 7 steps, a router that decides both types (GRPO's) 7,
    a single-precision run 0; Table 1 and the GRPO return charge the same n."""
    from dmr import grpo
    from dmr.policies import Fixed, RandomRouter, StepTypeGate

    gated = _webshop_episode(StepTypeGate(RandomRouter("bf16", "q", 0.5, seed=1), ["click"], "bf16"))
    both = _webshop_episode(RandomRouter("bf16", "q", 0.5, seed=1))
    full = _webshop_episode(Fixed("bf16"))
    assert [r["precision"] for r in gated if r["step_type"] == "search"] == ["bf16", "bf16"]  # forced
    assert latency.router_calls(gated) == {"shop/test/0": 5}
    assert latency.router_calls(both) == {"shop/test/0": 7}
    assert latency.router_calls(full) == {"shop/test/0": 0}
    assert latency.router_calls(pl.DataFrame(gated)) == {"shop/test/0": 5}

    coef = {"high": "bf16", "per_token": {"bf16": 0.025, "q": 0.015}, "router": 0.020}
    c = latency.pair(coef, "q")
    for rows, n in ((gated, 5), (both, 7), (full, 0)):
        hi = sum(r["completion_tokens"] for r in rows if r["precision"] == "bf16")
        lo = sum(r["completion_tokens"] for r in rows if r["precision"] != "bf16")
        expect = latency.episode_cost(n, hi, lo, c["router"], c["high"], c["low"])
        eps = pl.DataFrame({"task": ["shop/test/0"], "won": [True], "steps": [7], "high_tokens": [hi],
                            "tokens": [hi + lo]})
        table1 = latency.episodes_cost(eps, pl.DataFrame(rows), coef, "q")[0]
        reward = grpo.trajectory_returns(eps.to_dicts(), rows, {"bf16": c["high"], "q": c["low"]}, c["router"],
                                         lam=1.0, t_ref=1.0)
        assert table1 == pytest.approx(expect) and reward["cost"][0] == pytest.approx(expect)
        assert reward["decided"][0] == n
    # Every call counted (the old Table 1 rule) would charge the gated run 2 router calls more.
    assert latency.episodes_cost(eps, pl.DataFrame(gated), coef, "q")[0] != pytest.approx(
        latency.episodes_cost(eps, pl.DataFrame(both), coef, "q")[0])


def test_w3_is_projected_from_w4_of_the_same_method():
    proj = latency.w3_projection(["awq_w4a16", "gptq_w4a16", "gptq_w3a16"], {"awq_w4a16": 0.0168, "gptq_w4a16": 0.0230})
    assert proj == {"gptq_w3a16": ("gptq_w4a16", pytest.approx(0.0230 / 1.15))}
    # The paper's 4B cell has only AWQ-W4 beside GPTQ-W3: 16.77 / 1.15 = 14.58 ms.
    src, v = latency.w3_projection(["awq_w4a16", "gptq_w3a16"], {"awq_w4a16": 16.77})["gptq_w3a16"]
    assert src == "awq_w4a16" and round(v, 2) == 14.58
    with pytest.raises(ValueError, match="needs a W4 scheme"):
        latency.w3_projection(["gptq_w3a16"], {})


def test_config_coefficients_in_ms_with_low_default():
    per, router = latency.config_coefficients({"bf16": 25.02, "low": 16.77, "gptq_w3a16": 14.58, "router": 19.90},
                                              ["awq_w4a16", "gptq_w3a16"])
    assert per == pytest.approx({"bf16": 0.02502, "awq_w4a16": 0.01677, "gptq_w3a16": 0.01458})
    assert router == pytest.approx(0.0199)
    with pytest.raises(ValueError, match="no value for 'rtn_w2a16'"):
        latency.config_coefficients({"bf16": 1, "router": 1}, ["rtn_w2a16"])


def test_router_coefficient_charges_batches_to_decided_steps_only():
    """The replay charges each eligible step its batch's elapsed time; forced steps are not counted."""
    from dmr.routing import StepContext

    class Clock:
        eligible = ("action",)

        def __init__(self):
            self.batches, self.ended, self.last_scores = [], [], None

        def decide(self, contexts):
            # As dmr.router.Router: a score where it decided, None on a forced step.
            self.batches.append([c.step_type for c in contexts])
            self.last_scores = [0.5 if c.step_type in self.eligible else None for c in contexts]
            return ["bf16"] * len(contexts)

        def end_session(self, key):
            self.ended.append(key)

    def episode(name, types):
        return [StepContext(name, i, "g", [], "o", [], step_type=t) for i, t in enumerate(types)]

    clock = Clock()
    out = latency.router_coefficient(clock, [episode("a", ["action", "think", "action"]), episode("b", ["action"]),
                                             episode("c", ["think", "action"])], shards=2, progress=False)
    # a and b start together; b ends after one step and c takes its place.
    assert clock.batches == [["action", "action"], ["think", "think"], ["action", "action"]]
    assert out["decided"] == 4 and out["batches"] == 3 and sorted(clock.ended) == ["a", "b", "c"]


def test_table3_names_its_coefficients(tmp_path):
    coef = {"cell": "x/y", "source": "config", "high": "bf16", "quants": ["q"], "measured": {"bf16": {"coef": 0.03}},
            "per_token": {"bf16": 0.025, "q": 0.015}, "router": 0.02, "projected": {}, "t_ref": 1.0}
    df = latency.table(coef)
    assert df["c_low_ms"].to_list() == pytest.approx([15.0]) and df["source"].to_list() == ["config"]
    md = latency.markdown(df, coef)
    assert "given in the config" in md and "| q | 25.00 | 15.00 | 20.00 | 0.60 | 30.00 | – |" in md
    json.dumps(coef)


def test_episode_cost_of_a_three_precision_run_charges_each_precision():
    """Eq. 9 over bf16, W4 and W2 (`quant` 'w4+w2'): each precision's tokens at its coefficient, the
    router calls once per decided step; a two-precision name on the same steps refuses the W2 step."""
    steps = pl.DataFrame({"task": ["a", "a", "a", "b"], "precision": ["bf16", "w4", "w2", "bf16"],
                          "completion_tokens": [10, 20, 40, 5], "route_score": [0.9, 0.4, 0.1, None]})
    eps = pl.DataFrame({"task": ["a", "b"], "won": [True, False], "high_tokens": [10, 5], "tokens": [70, 5]})
    coef = {"high": "bf16", "per_token": {"bf16": 0.02, "w4": 0.01, "w2": 0.005}, "router": 0.001}
    assert latency.precisions_of(coef, "w4+w2") == ["bf16", "w4", "w2"]
    assert latency.precisions_of(coef, "bf16") == ["bf16"]
    cost = latency.episodes_cost(eps, steps, coef, "w4+w2")
    assert cost.to_list() == pytest.approx([3 * 0.001 + 0.2 + 0.2 + 0.2, 5 * 0.02])
    with pytest.raises(ValueError, match="'w2'"):
        latency.episodes_cost(eps, steps, coef, "w4")
