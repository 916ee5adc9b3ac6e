"""The threshold rule (dmr.threshold): tau in the sparse plateau of the step-KL histogram."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from dmr import threshold


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
