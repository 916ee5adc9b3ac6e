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
    eps = pl.DataFrame({"calls": [12, 4], "high_tokens": [30, 0], "tokens": [80, 10]})
    assert latency.episodes_cost(eps, coef, "q", routed=True).to_list() == pytest.approx([1.74, 0.08 + 0.15])
    # A single-precision run has no router: n = 0.
    assert latency.episodes_cost(eps, coef, "q", routed=False).to_list() == pytest.approx([1.5, 0.15])


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
            self.batches, self.ended = [], []

        def decide(self, contexts):
            self.batches.append([c.step_type for c in contexts])
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
