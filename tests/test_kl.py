"""Step KL (dmr.kl), the threshold rule (dmr.threshold) and quantile calibration (dmr.calibrate)."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from dmr import agent, calibrate, kl, threshold
from dmr.llm import Scored, load


def _pool(model, out, n=4, max_steps=6):
    agent.main(["--env", "household", "--env-kwargs", json.dumps({"max_steps": max_steps}), "--split", "train",
                "--n", str(n), "--model", f"bf16={model}", "--max-new-tokens", "12", "--shards", "3",
                "--out", str(out), "--quiet"])
    return out


def test_kl_of_identical_models_is_zero(tiny_world, tmp_path):
    _, _, model = tiny_world
    pool = _pool(model, tmp_path / "pool")
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(model), "--quant", "same",
             "--out", str(tmp_path / "kl.parquet"), "--quiet"])
    df = pl.read_parquet(tmp_path / "kl.parquet")
    steps = pl.read_parquet(pool / "steps.parquet")
    assert df.height == steps.height and set(df["quant"]) == {"same"}
    assert df["kl"].max() < 1e-6 and (df["tokens"] > 0).all()
    assert {"step_type", "step", "prev_action", "observation", "goal"} <= set(df.columns)


def test_replay_kl_matches_uncached_scoring(tiny_world, noisy_model, tmp_path):
    """The replay's per-episode prefix caches must not change the numbers."""
    _, _, model = tiny_world
    pool = _pool(model, tmp_path / "pool", n=3)
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(noisy_model), "--quant", "noisy",
             "--batch", "2", "--out", str(tmp_path / "kl.parquet"), "--quiet"])
    df = pl.read_parquet(tmp_path / "kl.parquet").sort("task", "step")
    assert df["kl"].min() >= 0 and df["kl"].max() > 1e-4, "a perturbed model must diverge somewhere"
    from dmr import prompts
    from dmr.prompts import Episode

    hi, lo = load("hf", str(model)), load("hf", str(noisy_model))
    style = prompts.get("react")
    ep, steps = kl.episodes_of(pool)[0]
    view = Episode(ep["goal"], steps[0]["observation"])
    for t, s in enumerate(steps):
        text = style.render(hi.tokenizer, view)
        expect = kl.step_kl(hi.score([text], [s["output"]])[0], lo.score([text], [s["output"]])[0])["kl"]
        got = df.filter((pl.col("task") == ep["task"]) & (pl.col("step") == t))["kl"][0]
        assert got == pytest.approx(expect, rel=1e-3, abs=1e-6)
        if t + 1 < len(steps):
            view.history.append((kl.executed(s), steps[t + 1]["observation"]))


def _scored(logp: torch.Tensor, ids, k=None) -> Scored:
    if k is None:
        return Scored(token_ids=ids, logprobs=[float(logp[i, t]) for i, t in enumerate(ids)], dist=logp)
    top = logp.topk(k, -1)
    return Scored(token_ids=ids, logprobs=[float(logp[i, t]) for i, t in enumerate(ids)],
                  topk=[(top.indices[i].tolist(), top.values[i].tolist()) for i in range(len(ids))])


def test_topk_kl_bounds_exact_kl():
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(5, 50, generator=g) * 3).log_softmax(-1)
    l = (h + torch.randn(5, 50, generator=g)).log_softmax(-1)
    ids = [0, 1, 2, 3, 4]
    exact, _ = kl.token_kl(_scored(h, ids), _scored(l, ids))
    full, missing = kl.token_kl(_scored(h, ids, 50), _scored(l, ids, 50))
    assert missing == 0 and full == pytest.approx(exact, rel=1e-4, abs=1e-6)
    coarse, _ = kl.token_kl(_scored(h, ids, 10), _scored(l, ids, 50))
    assert all(c <= e + 1e-6 for c, e in zip(coarse, exact))  # data-processing inequality
    assert kl.token_kl(_scored(h, ids), _scored(h, ids))[0] == pytest.approx([0.0] * 5, abs=1e-6)
    with pytest.raises(ValueError, match="different continuation"):
        kl.token_kl(_scored(h, ids), _scored(l, [1, 1, 1, 1, 1]))


def test_threshold_sits_in_the_sparse_plateau(tmp_path):
    r = np.random.default_rng(0)
    kls = np.concatenate([10 ** r.normal(-4, 0.4, 9000), 10 ** r.normal(-1, 0.3, 1000)])
    c = threshold.choose(kls)
    assert 10 ** -2.9 < c["tau"] < 10 ** -1.7
    assert c["positive_fraction"] == pytest.approx(0.1, abs=0.005)
    rows = {x["name"]: x for x in threshold.sweep(kls, c)}
    assert rows["dense"]["region"] == "dense" and rows["dense"]["density"] > 5 * rows["auto"]["density"]
    assert rows["plateau-left"]["tau"] < c["tau"] < rows["plateau-right"]["tau"]
    # The paper's tau_1 sits at the far-left edge of the low mode: nearly every step is positive.
    assert rows["low-edge"]["tau"] < rows["low-mass"]["tau"] < rows["plateau-left"]["tau"]
    assert rows["low-edge"]["positive_fraction"] == pytest.approx(0.95, abs=0.005)
    assert c["plateau_found"] and rows["auto"]["region"] == "sparse"
    # A unimodal histogram has no plateau: tau falls back to labelling fallback_positive of the steps.
    c1 = threshold.choose(10 ** r.normal(-3, 1, 5000), fallback_positive=0.25)
    assert not c1["plateau_found"] and c1["positive_fraction"] == pytest.approx(0.25, abs=0.002)
    pl.DataFrame({"task": ["t"] * len(kls), "step": range(len(kls)), "kl": kls, "quant": "w4",
                  "step_type": ["action"] * len(kls)}).write_parquet(tmp_path / "kl.parquet")
    threshold.main(["--kl", str(tmp_path / "kl.parquet"), "--out", str(tmp_path / "t.json"),
                    "--sweep", str(tmp_path / "s.parquet"), "--figure", str(tmp_path / "fig" / "h.png")])
    assert json.loads((tmp_path / "t.json").read_text())["tau"] == pytest.approx(c["tau"])
    assert (tmp_path / "fig" / "h.png").exists() and (tmp_path / "fig" / "h.pdf").exists()


@pytest.mark.parametrize("n", [200, 3000])
def test_quantile_calibration_hits_the_budget(n):
    scores = np.random.default_rng(n).beta(0.5, 2.0, n)
    for k, tau in calibrate.thresholds(scores, [0.2, 0.4, 0.7]).items():
        assert abs(calibrate.high_fraction(scores, tau) - float(k)) <= 0.01, k
    with pytest.raises(ValueError, match="budget"):
        calibrate.thresholds(scores, [1.5])


def _household_run(tiny_world, noisy_model):
    """Both precisions of a routed household run on three short test tasks: (backends, style, play)
    where play(router, out) runs the agent loop and returns its step rows."""
    from dmr import envs, prompts
    from dmr.agent import AgentConfig, run

    _, _, model = tiny_world
    backends = {"bf16": load("hf", str(model)), "low": load("hf", str(noisy_model))}
    style = prompts.get("react")
    cfg = AgentConfig(max_new_tokens=12, shards=3)
    tasks = envs.make("household", max_steps=5).tasks("test", 3)

    def play(router, out):
        run(lambda: envs.make("household", max_steps=5), tasks, backends, router, cfg, out, progress=False)
        return [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    return backends, style, play


def test_oracle_routes_on_true_step_kl(tiny_world, noisy_model, tmp_path):
    from dmr.llm import Sampling
    from dmr.policies import OracleRouter

    backends, style, play = _household_run(tiny_world, noisy_model)

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


def test_kl_probe_measures_without_acting(tiny_world, noisy_model, tmp_path):
    """--probe-kl: the wrapped router's decisions and actions are unchanged; every step carries the
    true KL the oracle would have measured there."""
    from dmr.llm import Sampling
    from dmr.policies import KLProbe, OracleRouter, RandomRouter

    backends, style, steps = _household_run(tiny_world, noisy_model)
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


def test_uncertainty_policy_routes_on_the_low_models_entropy(tiny_world, noisy_model, tmp_path):
    from dmr.llm import Sampling
    from dmr.policies import UncertaintyRouter, make_router

    _, _, model = tiny_world
    backends, style, play = _household_run(tiny_world, noisy_model)

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
    pool = _pool(model, tmp_path / "pool", n=3)
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


def test_proposal_router_trains_on_what_it_sees_at_deployment(tiny_world, noisy_model, tmp_path):
    """route.router.encoder: proposal. KL-ST trains on the low model's proposals over the KL pool's
    bf16 rollout; deployed, the router computes the same embedding of the same step, a step kept low
    takes the low model's proposal (no second decode, the quant run's very action) and a router
    without the low model is refused by name."""
    from dmr import klst
    from dmr.llm import Sampling
    from dmr.policies import Fixed, make_router
    from dmr.router import PROPOSAL, ProposalEncoder
    from dmr.routing import StepContext

    _, _, model = tiny_world
    pool = _pool(model, tmp_path / "pool", n=3)
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(noisy_model), "--quant", "low",
             "--out", str(tmp_path / "kl.parquet"), "--quiet"])
    df = pl.read_parquet(tmp_path / "kl.parquet").sort("task", "step")
    (tmp_path / "threshold.json").write_text(json.dumps({"tau": float(df["kl"].median())}))
    r = tmp_path / "router"
    klst.main(["--kl", str(tmp_path / "kl.parquet"), "--threshold", str(tmp_path / "threshold.json"),
               "--precisions", "bf16", "low", "--arch", '{"encoder": "proposal", "window": 1, "layers": 1}',
               "--rollout", str(pool), "--low", str(noisy_model), "--epochs", "2", "--out", str(r), "--quiet"])
    assert json.loads((r / "router.json").read_text())["encoder"] == PROPOSAL
    assert json.loads((r / "metrics.json").read_text())["encoder"] == PROPOSAL
    backends, style, play = _household_run(tiny_world, noisy_model)
    sampling = Sampling(12, stop=style.stop)
    # Training features = deployment features: the pool's step 1 of its first episode, re-embedded.
    enc = ProposalEncoder(backends["low"], style, Sampling(24, stop=style.stop), precision="low")
    ep, steps = kl.episodes_of(pool)[0]
    ctx = StepContext(ep["task"], 1, ep["goal"], [(kl.executed(steps[0]), steps[1]["observation"])],
                      steps[1]["observation"], [], first=steps[0]["observation"])
    feats = klst.proposal_features(ProposalEncoder(load("hf", str(noisy_model)), style, Sampling(24, stop=style.stop),
                                                   precision="low"), pool, df.filter(pl.col("task") == ep["task"]),
                                   progress=False)
    assert torch.allclose(enc.embed([ctx])[0], feats[1], atol=1e-4)
    assert set(enc.generations) == {(ep["task"], 1)}

    def routed(threshold, out):
        router = make_router("dmr", ["bf16", "low"], router=str(r), threshold=threshold, backends=backends,
                             style=style, sampling=sampling)
        rows = play(router, out)
        for s in rows:
            assert (s["precision"] == "bf16") == (s["route_score"] >= threshold)
            if s["precision"] == "low":
                assert s["llm_time"] == 0.0  # the proposal was the action
        return rows

    low = routed(2.0, tmp_path / "all-low")
    quant = play(Fixed("low"), tmp_path / "quant")
    key = lambda s: (s["task"], s["step"])  # noqa: E731
    assert [(key(s), s["action"]) for s in sorted(low, key=key)] == [(key(s), s["action"]) for s in sorted(quant, key=key)]
    assert {s["precision"] for s in routed(-1.0, tmp_path / "all-high")} == {"bf16"}
    with pytest.raises(ValueError, match="backends"):
        make_router("dmr", ["bf16", "low"], router=str(r), threshold=0.5)


def test_dagger_adds_the_routed_states_labelled_by_their_true_kl(tiny_world, noisy_model, tmp_path):
    """dmr.klst --dagger: a routed probe run of other training tasks joins the training set, its
    steps labelled 1[true_kl > tau]; the KL pool's validation episodes stay those of a router
    trained without it; a run without measured KL, or one that replays the pool's tasks, is refused."""
    from dmr import klst

    _, _, model = tiny_world
    pool = _pool(model, tmp_path / "pool", n=4)
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(noisy_model), "--quant", "low",
             "--out", str(tmp_path / "kl.parquet"), "--quiet"])
    tau = float(pl.read_parquet(tmp_path / "kl.parquet")["kl"].median())
    (tmp_path / "threshold.json").write_text(json.dumps({"tau": tau}))

    def routed(out, offset, probe=True):
        agent.main(["--env", "household", "--env-kwargs", json.dumps({"max_steps": 6}), "--split", "train",
                    "--n", "3", "--offset", str(offset), "--model", f"bf16={model}", "--model", f"low={noisy_model}",
                    "--policy", "random", "--p", "0.3", "--max-new-tokens", "12", "--shards", "3", "--out", str(out),
                    "--quiet"] + (["--probe-kl"] if probe else []))
        return out

    def train(out, *dagger):
        klst.main(["--kl", str(tmp_path / "kl.parquet"), "--threshold", str(tmp_path / "threshold.json"),
                   "--precisions", "bf16", "low", "--arch", '{"layers": 1, "window": 4}', "--epochs", "2",
                   "--val-fraction", "0.25", "--out", str(out), "--quiet"] + (["--dagger", *map(str, dagger)] if dagger else []))
        return pl.read_parquet(out / "train_scores.parquet"), json.loads((out / "metrics.json").read_text())

    probe = routed(tmp_path / "probe", offset=4)
    base, _ = train(tmp_path / "base")
    scores, metrics = train(tmp_path / "dagger", probe)
    steps = pl.read_parquet(probe / "steps.parquet")
    added = scores.filter(pl.col("source") != "pool").sort("task", "step")
    assert metrics["dagger"] == {str(probe): steps.height} and added.height == steps.height
    truth = steps.sort("task", "step")
    assert added["kl"].to_list() == pytest.approx(truth["true_kl"].to_list())
    assert added["label"].to_list() == [int(v > tau) for v in truth["true_kl"]]
    mine = scores.filter(pl.col("source") == "pool").select("task", "step", "split")
    assert mine.sort("task", "step").equals(base.select("task", "step", "split").sort("task", "step"))
    with pytest.raises(SystemExit, match="true_kl"):
        train(tmp_path / "bad", routed(tmp_path / "plain", offset=7, probe=False))
    with pytest.raises(SystemExit, match="must not be the KL pool's"):
        train(tmp_path / "clash", routed(tmp_path / "again", offset=0))
