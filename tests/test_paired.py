"""Paired statistics (dmr.paired): known inputs give known differences, CIs, p-values and shares."""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from dmr import paired


def run(won, seed=0, prefix="t"):
    return pl.DataFrame({"seed": [seed] * len(won), "task": [f"{prefix}{i}" for i in range(len(won))],
                         "won": [bool(w) for w in won]})


def test_mcnemar_exact_values():
    x = np.array([1, 1, 1, 0, 1, 0])
    y = np.array([0, 0, 0, 1, 1, 0])
    # 3 discordant for x, 1 for y: 2 * P(Bin(4, 1/2) <= 1) = 2 * 5/16
    assert paired.mcnemar(x, y) == pytest.approx(10 / 16)
    assert paired.mcnemar(np.ones(10), np.zeros(10)) == pytest.approx(2 / 1024)
    assert paired.mcnemar(x, x) == 1.0


def test_difference_ci_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(2000) < 0.6).astype(float)
    y = np.where(rng.random(2000) < 0.8, x, 1 - x)  # 20% discordant pairs
    d = paired.difference(x, y)
    diffs = 100 * (x - y)
    half = 1.96 * diffs.std(ddof=1) / math.sqrt(len(x))
    assert d["delta"] == pytest.approx(diffs.mean())
    assert d["lo"] == pytest.approx(diffs.mean() - half, abs=0.3)
    assert d["hi"] == pytest.approx(diffs.mean() + half, abs=0.3)
    assert d["n"] == 2000
    # The same inputs give the same CI: the bootstrap's generator is fixed.
    assert paired.difference(x, y) == d


def test_identical_and_dominating_runs():
    x, y = np.ones(50), np.zeros(50)
    d = paired.difference(x, y)
    assert (d["delta"], d["lo"], d["hi"]) == (100.0, 100.0, 100.0) and paired.verdict(d) == "win"
    assert paired.verdict(paired.difference(y, x)) == "loss"
    assert paired.verdict(paired.difference(x, x)) == "tie"


def test_recovered_share():
    full = np.array([1, 1, 1, 1, 0, 1, 1, 1] * 10, dtype=float)
    quant = np.array([0, 0, 1, 0, 0, 0, 1, 0] * 10, dtype=float)
    assert paired.recovered(full, full, quant)["share"] == pytest.approx(1.0)
    assert paired.recovered(quant, full, quant)["share"] == pytest.approx(0.0)
    part = np.array([1, 0, 1, 1, 0, 0, 1, 0] * 10, dtype=float)  # 4/8 against Quant 2/8 and Full 7/8
    rec = paired.recovered(part, full, quant)
    assert rec["share"] == pytest.approx(0.4) and rec["lo"] < 0.4 < rec["hi"]
    assert paired.recovered(full, quant, full)["share"] is None  # no gap: nothing to recover


def test_runs_must_be_paired():
    with pytest.raises(ValueError, match="not paired"):
        paired.aligned(run([1, 0, 1]), run([1, 0, 1], prefix="u"))
    with pytest.raises(ValueError, match="twice"):
        paired.outcomes(pl.concat([run([1, 0]), run([1, 1])]))


def test_compare_pairs_by_seed_and_task():
    full = [run([1] * 40, 0), run([1] * 40, 1)]
    quant = [run([0] * 40, 0), run([0] * 40, 1)]
    dmr = [run([1] * 30 + [0] * 10, 0), run([1] * 30 + [0] * 10, 1)]
    rnd = [run([1] * 10 + [0] * 30, 0), run([1] * 10 + [0] * 30, 1)]
    df = paired.compare({"Full": full, "w2/Quant": quant, "w2/DMR@0.4": dmr, "w2/Random@0.4": rnd})
    d = df.filter(pl.col("method") == "DMR").row(0, named=True)
    assert d["vs_random"] == pytest.approx(50.0) and d["vs_random_verdict"] == "win" and d["paired_tasks"] == 80
    assert d["recovered"] == pytest.approx(0.75) and d["vs_full"] == pytest.approx(-25.0)
    r = df.filter(pl.col("method") == "Random").row(0, named=True)
    assert r["vs_random"] is None and r["recovered"] == pytest.approx(0.25)


def test_forced_is_a_reference_without_a_budget():
    """Forced (only App. C.1's forced steps at bf16) gets its recovered share and no budget; every routed
    method at a budget is also paired with it: what routing adds on top of the rule."""
    full, quant = [run([1] * 40, 0)], [run([0] * 40, 0)]
    forced = [run([1] * 20 + [0] * 20, 0)]
    dmr = [run([1] * 30 + [0] * 10, 0)]
    df = paired.compare({"Full": full, "w2/Quant": quant, "w2/Forced": forced, "w2/DMR@0.4": dmr})
    f = df.filter(pl.col("method") == "Forced").row(0, named=True)
    assert f["budget"] is None and f["recovered"] == pytest.approx(0.5) and f["vs_forced"] is None
    d = df.filter(pl.col("method") == "DMR").row(0, named=True)
    assert d["vs_forced"] == pytest.approx(25.0) and d["vs_forced_lo"] > 0 and d["vs_forced_verdict"] == "win"
    assert paired.compare({"Full": full, "w2/Quant": quant, "w2/DMR@0.4": dmr})["vs_forced"].to_list() == [None]
