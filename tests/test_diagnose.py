"""Routing-signal diagnostics (dmr.diagnose) and the uncertainty columns of the KL pass (dmr.kl)."""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from dmr import diagnose
from dmr.kl import uncertainty
from dmr.llm import Scored


def test_uncertainty_of_known_distributions():
    high = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.98, 0.01, 0.01]]))
    low = torch.log(torch.tensor([[0.5, 0.5, 1e-9], [0.2, 0.7, 0.1]]))
    u = uncertainty(Scored([0, 0], [0.0, 0.0], dist=high), Scored([0, 0], [0.0, 0.0], dist=low))
    h0 = -(0.5 * math.log(0.5)) * 2
    h1 = -(0.2 * math.log(0.2) + 0.7 * math.log(0.7) + 0.1 * math.log(0.1))
    assert u["low_entropy"] == pytest.approx((h0 + h1) / 2, abs=1e-5)
    assert u["low_entropy_max"] == pytest.approx(max(h0, h1), abs=1e-5)
    assert u["low_margin"] == pytest.approx(0.0, abs=1e-6)
    assert u["greedy_mismatch"] is True  # position 1: bf16 says token 0, the low model token 1
    same = uncertainty(Scored([0], [0.0], dist=high[:1]), Scored([0], [0.0], dist=high[:1]))
    assert same["greedy_mismatch"] is False
    assert uncertainty(Scored([0], [0.0], topk=[([0], [0.0])]), Scored([0], [0.0], topk=[([0], [0.0])]))["low_entropy"] is None


def pool(n_eps=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(n_eps):
        for t in range(10):
            lost = bool(rng.random() < 0.3)
            kl = float(rng.lognormal(-4, 0.5) * (20 if lost else 1))
            rows.append({"task": f"e{e}", "step": t, "kl": kl, "step_type": "action", "goal": "g",
                         "prev_action": "go to x" if t else None,
                         "observation": "Nothing happens." if lost else "You arrive at a place.",
                         "low_entropy": kl + rng.random() * 1e-3, "low_entropy_max": kl, "low_margin": -kl,
                         "greedy_mismatch": lost})
    return pl.DataFrame(rows)


def test_diagnose_ranks_known_signals():
    kl = pool()
    scores = kl.select("task", "step", "step_type", "kl").with_columns(
        score=pl.Series(np.random.default_rng(1).random(kl.height)),  # a router that learnt nothing
        split=pl.when(pl.col("task").str.slice(1).cast(pl.Int32) < 30).then(pl.lit("train")).otherwise(pl.lit("val")))
    tau = float(np.quantile(kl["kl"], 0.7))
    df = diagnose.diagnose(kl, scores, tau, [0.2, 0.4])
    by = {r["ranker"]: r for r in df.iter_rows(named=True)}
    assert by["KL oracle"]["kl_mass@0.4"] >= max(r["kl_mass@0.4"] for r in by.values()) - 1e-12
    assert by["KL oracle"]["spearman"] == pytest.approx(1.0)
    # "Nothing happens." marks the high-KL steps here, so it catches them; a random router does not.
    assert by["Nothing happens."]["recall@0.4"] > 0.9 and by["router"]["recall@0.4"] < 0.7
    assert by["low-model entropy"]["mismatch@0.4"] > 0.9
    assert df["val_steps"][0] == 100
    md = diagnose.markdown(df, [0.2, 0.4], "t")
    assert "| router |" in md and "held-out steps" in md


def test_diagnose_needs_held_out_steps():
    kl = pool(4)
    scores = kl.select("task", "step", "step_type", "kl").with_columns(score=pl.lit(0.5), split=pl.lit("train"))
    with pytest.raises(ValueError, match="held-out"):
        diagnose.diagnose(kl, scores, 0.1, [0.4])


def test_online_measures_of_a_probe_run():
    rows = []
    for e in range(10):
        for t in range(10):
            critical = t == 3
            rows.append({"task": f"e{e}", "step": t, "step_type": "action", "precision": "bf16" if critical else "w2",
                         "route_score": 0.9 if critical else 0.1, "true_kl": 1.0 if critical else 0.001,
                         "observation": "Nothing happens." if t > 7 else "ok"})
    steps = pl.DataFrame(rows)
    eps = pl.DataFrame({"task": [f"e{e}" for e in range(10)], "won": [e < 8 for e in range(10)]})
    o = diagnose.online(steps, eps, tau=0.1)
    assert o["online_recall"] == 1.0 and o["online_high_fraction"] == pytest.approx(0.1)
    assert o["online_spearman"] == pytest.approx(1.0) and o["online_kl_mass"] > 0.99
    assert o["online_high_in_lost_episodes"] == pytest.approx(0.2) and o["online_high_after_failed_action"] == 0.0
    assert "| Spearman(score, true KL) | 1.000 | 0 |" in "\n".join(diagnose.online_markdown(o))
    with pytest.raises(ValueError, match="probe-kl"):
        diagnose.online(steps.with_columns(true_kl=pl.lit(None, pl.Float64)), eps, tau=0.1)
