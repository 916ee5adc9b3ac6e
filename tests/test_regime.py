"""The regime table (dmr.regime): the three criteria of the paper's regime, from built files."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from dmr import regime, threshold


def _scheme(cell, name, kls, won: dict, **override):
    kl_dir = cell / name / "kl"
    kl_dir.mkdir(parents=True)
    (kl_dir / "threshold.json").write_text(json.dumps(threshold.choose(kls) | override))
    pl.DataFrame({"task": [f"t{i}" for i in range(len(kls))], "step": 0, "kl": kls, "step_type": "action",
                  "greedy_mismatch": kls > 0.01, "high_entropy": np.sqrt(kls)}).write_parquet(kl_dir / "steps.parquet")
    for policy, w in won.items():
        run = cell / ("bf16" if policy == "full" else name) / "rollouts" / policy / "seed0"
        run.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"task": [f"x{i}" for i in range(len(w))], "seed": 0, "won": w}).write_parquet(
            run / "episodes.parquet")


def test_shape_counts_modes_and_the_valley_between_them():
    assert regime.shape([1, 5, 20, 5, 1, 0, 0, 1, 6, 10, 6, 1]) == ("two modes", pytest.approx(0.1 / (22 / 3), abs=0.05))
    form, valley = regime.shape([1, 5, 20, 18, 15, 12, 9, 4, 1])
    assert form == "one mode"


def test_regime_table_tells_a_valley_from_the_edge_of_a_tail(tmp_path):
    r = np.random.default_rng(0)
    bimodal = np.concatenate([10 ** r.normal(-4, 0.4, 9000), 10 ** r.normal(-1, 0.3, 1000)])
    one_mode = 10 ** r.normal(-3, 0.6, 10000)
    full, quant, oracle = [True] * 90 + [False] * 10, [True] * 50 + [False] * 50, [True] * 88 + [False] * 12
    _scheme(tmp_path, "good", bimodal, {"full": full, "quant": quant, "oracle-k0.4": oracle})
    # One mode: whatever the rule's flag says, there is no valley between modes.
    _scheme(tmp_path, "mild", one_mode, {"full": full, "quant": [True] * 85 + [False] * 15},
            plateau_found=True, positive_fraction=0.05)
    # Two modes, but the plateau found at the min_positive cap: the edge of the high mode's tail.
    _scheme(tmp_path, "edge", bimodal, {"full": full, "quant": quant}, plateau_found=True, positive_fraction=0.018)
    df = regime.table(tmp_path, ["good", "mild", "edge", "absent"], seeds=[0])
    good, mild, edge = (df.row(i, named=True) for i in range(3))
    assert df.height == 3  # a scheme without a KL pool is skipped
    assert edge["shape"] == "two modes" and edge["plateau_found"] and not edge["b_plateau"] and edge["a_gap"]
    assert good["shape"] == "two modes" and good["plateau_found"] and good["sparse_plateau"]
    assert good["bf16_entropy_p50"] == pytest.approx(float(np.quantile(np.sqrt(bimodal), 0.5)), rel=1e-3)
    assert good["gap"] == pytest.approx(40.0) and good["oracle_recovered"] == pytest.approx(38 / 40)
    assert good["a_gap"] and good["b_plateau"] and good["c_oracle"]
    # One mode: whatever the flag says, a plateau at the min_positive cap is no valley; no oracle run.
    assert mild["plateau_found"] and mild["shape"] == "one mode" and not mild["b_plateau"] and not mild["a_gap"]
    assert mild["oracle_k0.4"] is None and not mild["c_oracle"]
    text = regime.markdown(df, "t")
    assert "| good |" in text and "yes yes yes" in text and "no no no" in text
    with pytest.raises(ValueError, match="no KL pool|none of"):
        regime.table(tmp_path, ["absent"], seeds=[0])
