"""Router ablations (dmr.ablation, klst's variant options): the offline yardstick and a real run."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from dmr import ablation, klst


def test_top_k_spends_exactly_the_budget():
    scores = [0.9, 0.1, 0.5, 0.5, 0.3]
    assert ablation.top_k(scores, 0.4).tolist() == [True, False, True, False, False]  # ties: first one
    assert ablation.top_k(scores, 0.5).sum() == 3  # ceil(2.5)
    assert ablation.top_k([], 0.4).tolist() == []


def test_offline_recall_and_kl_mass_by_hand():
    scores = [0.9, 0.8, 0.1, 0.2, 0.7]
    kl = [2.0, 0.0, 1.0, 0.5, 0.5]  # positives above tau 0.6: steps 0 and 2
    out = ablation.offline(scores, kl, tau_ref=0.6, budgets=[0.4, 0.6])
    assert out["val_positive"] == pytest.approx(0.4)
    assert out["recall@0.4"] == pytest.approx(0.5)  # top 2 = steps 0, 1: one of two positives
    assert out["kl_mass@0.4"] == pytest.approx(2.0 / 4.0)
    assert out["recall@0.6"] == pytest.approx(0.5)  # + step 4 (0.7), still not step 2
    assert out["kl_mass@0.6"] == pytest.approx(2.5 / 4.0)
    assert out["oracle_recall@0.4"] == pytest.approx(1.0)
    # a router that ranks by KL itself is the oracle
    assert ablation.offline(kl, kl, 0.6, [0.4])["recall@0.4"] == pytest.approx(1.0)


def test_variant_names():
    assert ablation.parse("depth16") == ("depth", "16")
    assert ablation.parse("tau-low-mass") == ("tau", "low-mass")
    assert ablation.parse("steps-as") == ("steps", "as")
    assert ablation.parse("encoder-text") == ("encoder", "text")
    with pytest.raises(ValueError, match="unknown ablation variant 'depth'"):
        ablation.parse("depth")


@pytest.fixture(scope="module")
def kl_pool(tmp_path_factory):
    """A KL table whose high-KL steps are the ones after 'open' actions, with think steps."""
    rng = np.random.default_rng(0)
    rows = []
    for e in range(24):
        for t in range(8):
            act = ["open drawer 1", "go to shelf 2", "think: find it"][(e + t) % 3]
            rows.append({"task": f"t{e:02d}", "step": t, "step_type": "think" if act.startswith("think") else "action",
                         "goal": "put a mug in shelf 1", "prev_action": None if t == 0 else act,
                         "observation": "Nothing happens." if t % 2 else "You arrive at shelf 2.",
                         "kl": float(rng.lognormal(0.0 if act.startswith("open") else -4.0, 0.5))})
    d = tmp_path_factory.mktemp("pool")
    pl.DataFrame(rows).write_parquet(d / "steps.parquet")
    (d / "threshold.json").write_text(json.dumps({"tau": 0.2}))
    pl.DataFrame({"name": ["auto", "dense"], "tau": [0.2, 0.9]}).write_parquet(d / "sweep.parquet")
    return d


def test_variants_train_and_compare(kl_pool, tmp_path):
    common = ["--kl", str(kl_pool / "steps.parquet"), "--threshold", str(kl_pool / "threshold.json"),
              "--sweep", str(kl_pool / "sweep.parquet"), "--precisions", "bf16", "w2", "--epochs", "3",
              "--lr", "0.003", "--quiet", "--arch", json.dumps({"layers": 1, "d_model": 32, "heads": 2, "ff": 32})]
    klst.main(common + ["--out", str(tmp_path / "depth1")])
    klst.main(common + ["--tau-point", "dense", "--out", str(tmp_path / "tau-dense")])
    (kl_pool / "labels.json").write_text(json.dumps({"ao": {"tau": 0.2}, "as": {"tau": 0.15}}))
    klst.main(common + ["--step-types", "all", "--labels-summary", str(kl_pool / "labels.json"), "--label-set", "as",
                        "--out", str(tmp_path / "steps-as")])
    m = {v: json.loads((tmp_path / v / "metrics.json").read_text()) for v in ("depth1", "tau-dense", "steps-as")}
    assert m["depth1"]["tau"] == 0.2 and m["tau-dense"]["tau"] == 0.9 and m["steps-as"]["tau"] == 0.15
    assert m["steps-as"]["steps"] == 24 * 8 and m["depth1"]["steps"] < 24 * 8  # think steps join in AS only
    out = tmp_path / "tables" / "ablation.parquet"
    ablation.main([a for v in m for a in ("--router", v, str(tmp_path / v))]
                  + ["--threshold", str(kl_pool / "threshold.json"), "--budgets", "0.4", "--step-types", "action",
                     "--out", str(out), "--figure", str(tmp_path / "fig.png")])
    df = pl.read_parquet(out)
    assert df["variant"].to_list() == ["depth1", "tau-dense", "steps-as"]
    assert all(0.0 <= r <= 1.0 for r in df["recall@0.4"])
    assert len(set(df["val_steps"])) == 1  # the AS router is judged on the action steps, like the others
    assert (tmp_path / "fig.png").exists() and (tmp_path / "fig.pdf").exists()
    assert "recall@0.4" in out.with_suffix(".md").read_text()


def test_unknown_sweep_point_is_named(kl_pool, tmp_path):
    with pytest.raises(SystemExit, match="--tau-point 'sparse'.*auto.*dense"):
        klst.main(["--kl", str(kl_pool / "steps.parquet"), "--threshold", str(kl_pool / "threshold.json"),
                   "--sweep", str(kl_pool / "sweep.parquet"), "--tau-point", "sparse", "--precisions", "bf16", "w2",
                   "--out", str(tmp_path / "x")])
