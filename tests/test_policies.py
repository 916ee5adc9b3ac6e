"""Routing policies (dmr.policies): fixed and random routers, the KL oracle, the KL probe, the
uncertainty baseline and what make_router asks for."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from dmr import kl
from dmr.llm import load
from dmr.policies import make_router
from dmr.routing import StepContext


def test_routers():
    ctx = [StepContext(f"e{i}", s, "", [], "", []) for i in range(20) for s in range(5)]
    assert set(make_router("full", ["bf16", "w4"]).decide(ctx)) == {"bf16"}
    assert set(make_router("quant", ["bf16", "w4"]).decide(ctx)) == {"w4"}
    r = make_router("random:0.5", ["bf16", "w4"], seed=1)
    picks = r.decide(ctx)
    assert picks == r.decide(ctx) and 20 < picks.count("bf16") < 80
    # decisions do not depend on how steps are batched together
    assert r.decide(ctx[:7]) == picks[:7]
    # Its score is p on every step it decides (Eq. 9 counts those as router calls, dmr.latency).
    assert r.last_scores == [0.5] * 7
    assert set(make_router("quant", ["w3"]).decide(ctx)) == {"w3"}
    with pytest.raises(ValueError, match="needs a low-precision"):
        make_router("random:0.2", ["bf16"])
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_router("sometimes", ["bf16", "w4"])


def test_random_routing_matches_a_three_precision_runs_shares(tmp_path):
    """Equal-cost random routing over bf16, W4 and W2: matched to a run's realised share of each
    precision (from its steps), drawn per (episode, step); over two precisions the same draws as the
    binary rule. A run with a step at another precision, or none routed, is refused."""
    from dmr.policies import RandomRouter

    run = tmp_path / "dmr3"
    run.mkdir()
    pl.DataFrame({"task": ["a"] * 10, "won": [True] * 10}).write_parquet(run / "episodes.parquet")
    precision = ["bf16"] * 2 + ["w4"] * 3 + ["w2"] * 5
    pl.DataFrame({"task": ["a"] * 10, "step": list(range(10)), "precision": precision,
                  "step_type": ["action"] * 10}).write_parquet(run / "steps.parquet")
    r = make_router("random", ["bf16", "w4", "w2"], seed=3, match=str(run / "episodes.parquet"))
    assert r.shares == pytest.approx([0.2, 0.3, 0.5])
    ctx = [StepContext(f"e{i}", s, "", [], "", []) for i in range(200) for s in range(20)]
    picks = r.decide(ctx)
    assert [picks.count(q) / len(picks) for q in ("bf16", "w4", "w2")] == pytest.approx([0.2, 0.3, 0.5], abs=0.02)
    assert r.last_scores[0] == pytest.approx(0.2) and r.decide(ctx[:9]) == picks[:9]
    # Two precisions: the ladder of shares is the binary rule, draw for draw.
    two = RandomRouter("bf16", ["w4"], [0.3, 0.7], seed=3).decide(ctx)
    assert two == RandomRouter("bf16", "w4", 0.3, seed=3).decide(ctx)
    with pytest.raises(ValueError, match="'w2'"):
        make_router("random", ["bf16", "w4", "w3"], seed=3, match=str(run / "episodes.parquet"))
    with pytest.raises(ValueError, match="give --match"):
        make_router("random:0.2", ["bf16", "w4", "w2"])
    with pytest.raises(ValueError, match="sum to 1"):
        RandomRouter("bf16", ["w4", "w2"], [0.2, 0.2, 0.2])


def test_oracle_routes_on_true_step_kl(tiny_world, noisy_model, tmp_path, household_run):
    from dmr.llm import Sampling
    from dmr.policies import OracleRouter

    backends, style, play = household_run

    def routed(tau, out):
        steps = play(OracleRouter(backends, "bf16", "low", style, Sampling(12, stop=style.stop), tau=tau), out)
        assert all(s["route_score"] is not None for s in steps)
        for s in steps:
            assert (s["precision"] == "bf16") == (s["route_score"] > tau)
            if s["precision"] == "bf16":
                assert s["llm_time"] == 0.0  # bf16's proposal was reused, not decoded again
        return steps

    first = routed(-1.0, tmp_path / "all-high")
    assert {s["precision"] for s in first} == {"bf16"}
    mid = float(np.median([s["route_score"] for s in first]))
    assert {s["precision"] for s in routed(mid, tmp_path / "mid")} == {"bf16", "low"}
    # Matched to a share, the cut follows the run's own KLs: a pool cut that routes nothing high
    # (tau = inf) still realises about half bf16 steps after the warm-up.
    matched = play(OracleRouter(backends, "bf16", "low", style, Sampling(12, stop=style.stop), tau=float("inf"),
                                target=0.5, warmup=3), tmp_path / "matched")
    late = [s for s in matched if s["step"] >= 2]
    assert 0.2 <= np.mean([s["precision"] == "bf16" for s in late]) <= 0.8


def test_matched_cut_realises_the_share_it_is_matched_to():
    from dmr.policies import MatchedCut

    cut = MatchedCut(tau=9.0, target=0.3, warmup=3)
    assert cut.see([1.0, 2.0, 3.0]) == 9.0  # warm-up: the pool's cut
    assert cut.current() == 2.0  # one of the three seen lies above it (round(0.9) = 1)
    values = np.random.default_rng(0).lognormal(size=2000) + 5.0  # not distributed as the pool
    high = []
    for batch in values.reshape(200, 10):
        c = cut.see(list(batch))
        high += list(batch > c)
    assert np.mean(high) == pytest.approx(0.3, abs=0.03)
    assert MatchedCut(tau=1.0).see([5.0, 0.5]) == 1.0 and MatchedCut(tau=1.0).seen == []  # unmatched: tau
    # Gated (App. C.1): only the routed step types count toward the share; forced ones run high anyway.
    from dmr.policies import OracleRouter
    from dmr.routing import StepContext

    o = OracleRouter({}, "bf16", "low", None, None, tau=9.0, target=0.5, warmup=1, counted=["click"])
    ctx = [StepContext("e", i, "g", [], "o", [], step_type=t) for i, t in enumerate(["search"] + ["click"] * 4)]
    o.see(ctx, [100.0, 1.0, 2.0, 3.0, 4.0])
    assert o.cut.seen == [1.0, 2.0, 3.0, 4.0] and o.current_tau() == 2.0  # counting the search step: 3.0
    with pytest.raises(ValueError, match="share"):
        MatchedCut(tau=1.0, target=1.5)


def test_kl_probe_measures_without_acting(tiny_world, noisy_model, tmp_path, household_run):
    """--probe-kl: the wrapped router's decisions and actions are unchanged; every step carries the
    true KL the oracle would have measured there."""
    from dmr.llm import Sampling
    from dmr.policies import KLProbe, OracleRouter, RandomRouter

    backends, style, steps = household_run
    plain = steps(RandomRouter("bf16", "low", 0.5), tmp_path / "plain")
    oracle = OracleRouter(backends, "bf16", "low", style, Sampling(12, stop=style.stop), tau=float("inf"))
    probed = steps(KLProbe(RandomRouter("bf16", "low", 0.5), oracle), tmp_path / "probed")
    key = lambda s: (s["task"], s["step"])  # noqa: E731
    assert [(key(s), s["precision"], s["action"]) for s in sorted(plain, key=key)] == \
        [(key(s), s["precision"], s["action"]) for s in sorted(probed, key=key)]
    assert all(s["true_kl"] is None for s in plain)
    assert all(s["true_kl"] is not None and s["true_kl"] >= 0 for s in probed)
    assert max(s["true_kl"] for s in probed) > 0


def test_oracle_proposals_obey_the_agents_constraint(tiny_world, noisy_model, tmp_path):
    # A constrained agent (the shop's click steps) must get constrained proposals from the oracle
    # too: its high steps take bf16's proposal as the action.
    from dmr import envs, prompts
    from dmr.agent import AgentConfig, run
    from dmr.llm import Sampling
    from dmr.policies import make_router

    _, _, model = tiny_world
    backends = {"bf16": load("hf", str(noisy_model)), "low": load("hf", str(model))}
    style = prompts.get("react")
    kl = tmp_path / "kl.parquet"
    pl.DataFrame({"kl": [0.0, 0.0]}).write_parquet(kl)  # tau 0: every step goes high
    eps = tmp_path / "e.parquet"
    pl.DataFrame({"high_calls": [1], "calls": [1]}).write_parquet(eps)
    router = make_router("oracle", ["bf16", "low"], match=str(eps), kl=str(kl), backends=backends, style=style,
                         sampling=Sampling(12, stop=style.stop), constrained=True)
    cfg = AgentConfig(max_new_tokens=12, shards=3, constrained=True)
    tasks = envs.make("household", max_steps=6).tasks("test", 3)
    run(lambda: envs.make("household", max_steps=6), tasks, backends, router, cfg, tmp_path / "run", progress=False)
    steps = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    high = [s for s in steps if s["precision"] == "bf16"]
    assert high and all(s["action"] in s["admissible"] for s in high)


def test_make_router_names_what_is_missing(tmp_path):
    from dmr.policies import make_router

    with pytest.raises(ValueError, match="--router"):
        make_router("dmr", ["bf16", "w4"], threshold=0.5)
    with pytest.raises(ValueError, match="exactly one of --threshold and --budget"):
        make_router("dmr", ["bf16", "w4"], router=str(tmp_path))
    with pytest.raises(ValueError, match="exactly one"):
        make_router("random", ["bf16", "w4"])
    eps = tmp_path / "e.parquet"
    pl.DataFrame({"high_calls": [1, 3], "calls": [4, 4]}).write_parquet(eps)
    assert make_router("random", ["bf16", "w4"], match=str(eps)).p == pytest.approx(0.5)
    with pytest.raises(ValueError, match="--kl"):
        make_router("oracle", ["bf16", "w4"], match=str(eps))


def test_uncertainty_policy_routes_on_the_low_models_entropy(tiny_world, noisy_model, tmp_path, household_run, rollout_pool):
    from dmr.llm import Sampling
    from dmr.policies import UncertaintyRouter, make_router

    _, _, model = tiny_world
    backends, style, play = household_run

    def routed(tau, out):
        steps = play(UncertaintyRouter(backends, "bf16", "low", style, Sampling(12, stop=style.stop), tau=tau), out)
        for s in steps:
            assert s["route_score"] is not None and s["route_score"] >= 0
            assert (s["precision"] == "bf16") == (s["route_score"] > tau)
            if s["precision"] == "low":
                assert s["llm_time"] == 0.0  # the low proposal was the action, not decoded again
        return steps

    assert {s["precision"] for s in routed(-1.0, tmp_path / "all-high")} == {"bf16"}
    low = routed(float("inf"), tmp_path / "all-low")
    assert {s["precision"] for s in low} == {"low"}
    mid = float(np.median([s["route_score"] for s in low]))
    assert {s["precision"] for s in routed(mid, tmp_path / "mid")} == {"bf16", "low"}
    # Matched like the oracle, on the pool's low_entropy; a pool without it is refused by name.
    from dmr.rundir import read_jsonl

    pl.DataFrame(read_jsonl(tmp_path / "mid/episodes.jsonl")).write_parquet(tmp_path / "mid/episodes.parquet")
    pool = rollout_pool(model, tmp_path / "pool", n=3)
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(noisy_model), "--quant", "low",
             "--out", str(tmp_path / "kl.parquet"), "--quiet"])
    r = make_router("uncertainty", ["bf16", "low"], match=str(tmp_path / "mid/episodes.parquet"),
                    kl=str(tmp_path / "kl.parquet"), backends=backends, style=style, sampling=Sampling(12, stop=style.stop))
    assert isinstance(r, UncertaintyRouter) and r.tau > 0 and 0 < r.target < 1
    # Matched online: after the warm-up the threshold is the running quantile of what it has seen.
    r.cut.warmup, r.cut.seen = 4, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    r.cut.target = 0.3
    assert r.current_tau() == 0.7  # three of the ten seen lie above it
    pl.read_parquet(tmp_path / "kl.parquet").drop("low_entropy").write_parquet(tmp_path / "old.parquet")
    with pytest.raises(ValueError, match="low_entropy"):
        make_router("uncertainty", ["bf16", "low"], match=str(tmp_path / "mid/episodes.parquet"),
                    kl=str(tmp_path / "old.parquet"), backends=backends, style=style, sampling=Sampling(12))


def test_signal_baselines_measure_the_kl_on_the_pools_block(tmp_path):
    """The oracle and the uncertainty baseline cut their online signal at a quantile of the KL pool's,
    so they measure it on the part of an output the pool did (its kl_block; a pool from before the
    column scored whole outputs)."""
    eps = tmp_path / "e.parquet"
    pl.DataFrame({"high_calls": [1, 3], "calls": [4, 4]}).write_parquet(eps)
    base = {"kl": [0.1, 0.2, 0.3], "low_entropy": [1.0, 2.0, 3.0], "step_type": ["action"] * 3}
    for block, cols in (("action", {"kl_block": ["action"] * 3}), ("output", {"kl_block": ["output"] * 3}),
                        ("output", {})):
        pool = tmp_path / f"pool-{block}-{len(cols)}.parquet"
        pl.DataFrame(base | cols).write_parquet(pool)
        for policy in ("oracle", "uncertainty"):
            r = make_router(policy, ["bf16", "w4"], match=str(eps), kl=str(pool), backends={})
            assert r.kl_block == block
