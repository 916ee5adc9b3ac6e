"""The click/search protocol (paper App. C.1): the environment announces each step's type before
generation, the agent loop hands it to routing, routed policies decide only `router_steps` (the
others run at bf16), KL rows carry the step type, and Table 4 / Fig. 6 split KL by it.
Real shop environment, real tiny agents (HF backend), real KL stage."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from dmr import envs, kl, step_types
from dmr.agent import AgentConfig, run
from dmr.llm import Generation, load
from dmr.policies import RandomRouter, StepTypeGate, make_router, realised_fraction
from dmr.prompts import get
from dmr.routing import StepContext
from dmr.rundir import claim, finalize

SHOP = {"max_steps": 8, "n_products": 200, "page_size": 3}


def ctx(i, step_type):
    return StepContext(f"e{i}", 0, "", [], "", [], step_type=step_type)


def test_gate_forces_other_step_types_high():
    inner = RandomRouter("bf16", "w4", p=0.0)
    gate = StepTypeGate(inner, ["click"], "bf16")
    types = ["search", "click", "click", "search", "action"]
    assert gate.decide([ctx(i, t) for i, t in enumerate(types)]) == ["bf16", "w4", "w4", "bf16", "bf16"]
    assert gate.p == 0.0  # the wrapped router's settings stay visible (run specs record them)
    # make_router wraps every routed policy, never the fixed ones.
    assert isinstance(make_router("random:0", ["bf16", "w4"], router_steps=["click"]), StepTypeGate)
    assert make_router("quant", ["bf16", "w4"], router_steps=["click"]).decide([ctx(0, "search")]) == ["w4"]
    assert make_router("random:0", ["bf16", "w4"]).decide([ctx(0, "search")]) == ["w4"]



def test_gate_hands_over_no_low_proposal_for_a_forced_step():
    # A proposal router decodes every step it sees at low precision; a step the gate forces to bf16
    # must not take that low proposal as its action.
    class Proposing(RandomRouter):
        def decide(self, contexts):
            self.generations = {(c.episode, c.step): Generation("low", 0, 1, [0], [0.0]) for c in contexts}
            return super().decide(contexts)

    gate = StepTypeGate(Proposing("bf16", "w4", p=0.0), ["click"], "bf16")
    assert gate.decide([ctx(0, "search"), ctx(1, "click")]) == ["bf16", "w4"]
    assert set(gate.generations) == {("e1", 0)}


class ExpertDriver:
    """Routes with `router` and hands the agent loop the shop expert's answer as every step's
    generation (the loop's `generations` hook, as the KL oracle uses it), so a run visits search,
    results and item pages whatever the tiny model would have written."""

    def __init__(self, router, shards, style):
        self.router, self.shards, self.style = router, shards, style
        self.last_scores = None

    def decide(self, contexts):
        self.generations = {}
        for c in contexts:
            env = next(e for e in self.shards if e._task is not None and e._task.key == c.episode)
            text = self.style.answer(env.expert_action())
            self.generations[(c.episode, c.step)] = Generation(text, 0, 1, [0], [0.0])
        return self.router.decide(contexts)


def drive(tmp_path, router_steps, backends, policy="random:0"):
    made = []

    def factory():
        made.append(envs.make("shop", **SHOP))
        return made[-1]

    style = get("instruct", window=1)
    router = ExpertDriver(make_router(policy, list(backends), router_steps=router_steps), made, style)
    tasks = envs.make("shop", **SHOP).tasks("train", 4)
    cfg = AgentConfig(prompt={"style": "instruct", "window": 1}, max_new_tokens=8, shards=2)
    run(factory, tasks, backends, router, cfg, tmp_path, progress=False)
    spec = {"env": "shop", "env_kwargs": SHOP, "policy": "full", "agent": {"prompt": cfg.prompt}}
    claim(tmp_path, spec)
    finalize(tmp_path, spec)
    return pl.read_parquet(tmp_path / "steps.parquet"), pl.read_parquet(tmp_path / "episodes.parquet")


def test_agent_loop_forces_search_steps_to_bf16(tiny_world, noisy_model, tmp_path):
    _, _, model = tiny_world
    backends = {"bf16": load("hf", str(model), threads=1), "w4": load("hf", str(noisy_model), threads=1)}
    steps, eps = drive(tmp_path / "gated", ["click"], backends)
    assert eps["won"].all() and (eps["score"] == 1.0).all()
    assert set(steps["step_type"]) == {"search", "click"}
    assert (steps.filter(pl.col("step") == 0)["step_type"] == "search").all()
    # random:0 routes every decided step low: exactly the search steps ran at bf16.
    assert ((steps["precision"] == "bf16") == (steps["step_type"] == "search")).all()
    # A matched baseline matches the router's share among the steps it decided (0 here), not the
    # forced ones.
    assert realised_fraction(tmp_path / "gated/episodes.parquet", ["click"], "bf16") == 0.0
    assert realised_fraction(tmp_path / "gated/episodes.parquet") > 0.0
    # The shop announces every step's type before it is generated.
    assert steps["announced_type"].to_list() == steps["step_type"].to_list()
    ungated, _ = drive(tmp_path / "ungated", None, backends)
    assert (ungated["precision"] == "w4").all()

    # KL rows of a run carry its step types.
    kl.main(["--rollout", str(tmp_path / "gated"), "--high", str(model), "--low", str(noisy_model),
             "--quant", "w4", "--out", str(tmp_path / "kl/steps.parquet"), "--quiet"])
    rows = pl.read_parquet(tmp_path / "kl/steps.parquet")
    assert rows.height == steps.height
    assert sorted(rows["step_type"].to_list()) == sorted(steps["step_type"].to_list())


def test_table4_and_fig6(tmp_path):
    rng = np.random.default_rng(0)
    click = np.concatenate([np.full(80, 1e-4), np.full(20, 0.5)])
    search = np.full(50, 2.0)
    df = pl.DataFrame({"kl": np.concatenate([click, search]), "step_type": ["click"] * 100 + ["search"] * 50})
    df = df.sample(fraction=1.0, shuffle=True, seed=int(rng.integers(1000)))
    df.write_parquet(tmp_path / "kl.parquet")
    (tmp_path / "threshold.json").write_text(json.dumps({"tau": 0.1, "step_types": ["click"]}))
    step_types.main(["--kl", str(tmp_path / "kl.parquet"), "--threshold", str(tmp_path / "threshold.json"),
                     "--title", "shop/tiny w4", "--out", str(tmp_path / "t.parquet"), "--markdown", str(tmp_path / "t.md"),
                     "--figure", str(tmp_path / "fig/kl_step_types.png")])
    t = {r["step_type"]: r for r in pl.read_parquet(tmp_path / "t.parquet").iter_rows(named=True)}
    assert list(t) == ["click", "search", "all"]
    assert t["click"]["steps"] == 100 and t["click"]["pct_below_0.01"] == pytest.approx(80.0)
    assert t["click"]["pct_above_tau"] == pytest.approx(20.0) and t["click"]["mean_kl"] == pytest.approx(0.10008)
    assert t["search"]["pct_below_0.01"] == 0.0 and t["search"]["pct_above_tau"] == 100.0
    assert t["all"]["steps"] == 150 and t["all"]["pct_above_tau"] == pytest.approx(100 * 70 / 150)
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("# shop/tiny w4") and "| search | 50 |" in md and "click steps" in md
    assert (tmp_path / "fig/kl_step_types.png").exists() and (tmp_path / "fig/kl_step_types.pdf").exists()


def test_matching_counts_the_steps_the_gate_saw(tmp_path):
    """An ALFWorld think step is announced as an action (its type shows only in what the model
    writes), so the gate let the router decide it: the matched share counts it too."""
    steps = pl.DataFrame({"precision": ["bf16", "w4", "bf16", "w4", "bf16"],
                          "step_type": ["think", "action", "action", "action", "search"],
                          "announced_type": ["action", "action", "action", "action", "search"]})
    steps.write_parquet(tmp_path / "steps.parquet")
    pl.DataFrame({"high_calls": [3], "calls": [5]}).write_parquet(tmp_path / "episodes.parquet")
    assert realised_fraction(tmp_path / "episodes.parquet", ["action"], "bf16") == 0.5
    # A run recorded before announced types existed falls back to the recorded type.
    steps.drop("announced_type").write_parquet(tmp_path / "steps.parquet")
    assert realised_fraction(tmp_path / "episodes.parquet", ["action"], "bf16") == pytest.approx(1 / 3)
