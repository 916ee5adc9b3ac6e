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
    assert df["variant"].to_list() == ["depth1", "tau-dense", "steps-as"] and df["budget"].to_list() == [0.4] * 3
    assert all(0.0 <= r <= 1.0 for r in df["recall"])
    assert len(set(df["val_steps"])) == 1  # the AS router is judged on the action steps, like the others
    assert df["success"].null_count() == 3  # no online runs given: offline only
    assert (tmp_path / "fig.png").exists() and (tmp_path / "fig.pdf").exists()
    assert "| recall |" in out.with_suffix(".md").read_text()
    assert "Online: not run" in out.with_suffix(".md").read_text()


def episodes(seed: int, won: list[int], high: list[int], calls: int = 10) -> pl.DataFrame:
    """A run's episodes table: task tI won or not, `high` of its `calls` LLM calls at bf16."""
    return pl.DataFrame({"seed": [seed] * len(won), "task": [f"t{i}" for i in range(len(won))],
                         "won": [bool(w) for w in won], "high_calls": high, "calls": [calls] * len(won)})


def offline_rows(variants, budgets):
    """dmr.ablation.summarise's shape: a row per variant, recall/kl_mass/oracle_recall per budget."""
    rows = []
    for i, v in enumerate(variants):
        kind, value = ablation.parse(v)
        row = {"variant": v, "kind": kind, "value": value, "layers": int(value) if kind == "depth" else 2,
               "tau": 0.1 * (i + 1), "positive_fraction": 0.2, "params": 1000 * (i + 1), "val_bacc": 0.6 + 0.1 * i,
               "best_epoch": 1, "val_steps": 50, "val_positive": 0.2}
        for k in budgets:
            row |= {f"recall@{k:g}": k + 0.01 * i, f"kl_mass@{k:g}": k + 0.02 * i, f"oracle_recall@{k:g}": 1.0}
        rows.append(row)
    return pl.DataFrame(rows)


def test_online_table_by_hand():
    """Success per (variant, K) is the mean over seeds; delta is paired on (seed, task) against the
    cell's DMR@K; the offline columns join per K; a budget not run online has null online columns."""
    ref = {0.4: [episodes(0, [1, 0, 1, 0], [2, 2, 2, 2]), episodes(1, [1, 1, 0, 0], [2, 2, 2, 2])]}
    # depth1 at 0.4: seed 0 wins 3 of 4, seed 1 wins 1 of 4; bf16 calls 4 and 6 of 40 each.
    d1 = [episodes(0, [1, 1, 1, 0], [1, 1, 1, 1]), episodes(1, [0, 0, 1, 0], [3, 3, 0, 0])]
    on = ablation.online({("depth1", 0.4): d1, ("depth2", 0.4): ref[0.4]}, ref, own={("depth2", 0.4)})
    r = on.filter(pl.col("variant") == "depth1").row(0, named=True)
    assert r["success"] == pytest.approx(50.0) and r["success_std"] == pytest.approx(np.std([75, 25], ddof=1))
    assert r["high_frac"] == pytest.approx((4 / 40 + 6 / 40) / 2)
    # pairs (seed, task): depth1 - ref = [0, +1, 0, 0] on seed 0 and [-1, -1, +1, 0] on seed 1 -> mean 0/8
    assert r["delta"] == pytest.approx(0.0) and r["paired_tasks"] == 8 and r["delta_lo"] < 0 < r["delta_hi"]
    assert (r["seeds"], r["episodes"], r["cell_router"]) == (2, 8, False)
    own = on.filter(pl.col("variant") == "depth2").row(0, named=True)
    assert (own["delta"], own["delta_lo"], own["delta_hi"], own["cell_router"]) == (0.0, 0.0, 0.0, True)

    df = ablation.table(offline_rows(["depth2", "depth1"], [0.2, 0.4]), on, [0.2, 0.4])
    assert df.select("variant", "budget").rows() == [("depth1", 0.2), ("depth1", 0.4), ("depth2", 0.2), ("depth2", 0.4)]
    assert df.filter(pl.col("budget") == 0.2)["success"].null_count() == 2  # 0.2 not run online
    row = df.filter((pl.col("variant") == "depth1") & (pl.col("budget") == 0.4)).row(0, named=True)
    assert row["success"] == pytest.approx(50.0) and row["recall"] == pytest.approx(0.41)  # depth1 is offline row 1
    assert row["kl_mass"] == pytest.approx(0.42) and row["val_bacc"] == pytest.approx(0.7)
    assert not any("@" in c for c in df.columns)
    md = ablation.markdown(df, [0.2, 0.4], "t")
    assert r["dmr_success"] == pytest.approx(50.0)
    assert "| depth1 | 0.4 | 50.0 ± 35.4 | 50.0 | +0.0 [" in md
    assert "| depth2 | 0.4 | 50.0 ± 0.0 | 50.0 | 0 (the cell's router) |" in md
    assert "| depth1 | 0.2 | – | – | – | – | 0.210 |" in md


def test_online_runs_must_pair_with_the_cells_dmr():
    ref = {0.4: [episodes(0, [1, 0], [1, 1])]}
    with pytest.raises(ValueError, match="not paired"):
        ablation.online({("depth1", 0.4): [episodes(0, [1, 0, 1], [1, 1, 1])]}, ref)
    with pytest.raises(ValueError, match="no DMR@0.2 run"):
        ablation.online({("depth1", 0.2): ref[0.4]}, ref)
    on = ablation.online({("depth4", 0.4): ref[0.4]}, ref)
    with pytest.raises(ValueError, match=r"variants \['depth4'\] that have no router"):
        ablation.table(offline_rows(["depth1"], [0.4]), on, [0.4])


def test_main_reads_online_runs(kl_pool, tmp_path):
    """The command line: --online VARIANT K RUN..., --reference K RUN...; a variant whose runs are the
    reference's is the cell's router."""
    common = ["--kl", str(kl_pool / "steps.parquet"), "--threshold", str(kl_pool / "threshold.json"),
              "--sweep", str(kl_pool / "sweep.parquet"), "--precisions", "bf16", "w2", "--epochs", "1", "--quiet",
              "--arch", json.dumps({"layers": 1, "d_model": 16, "heads": 2, "ff": 16})]
    klst.main(common + ["--out", str(tmp_path / "depth1")])
    runs = {}
    for name, won in (("ref", [1, 0, 1]), ("d1", [1, 1, 1])):
        runs[name] = []
        for s in (0, 1):
            d = tmp_path / name / f"seed{s}"
            d.mkdir(parents=True)
            episodes(s, won, [1, 1, 1]).write_parquet(d / "episodes.parquet")
            runs[name].append(str(d))
    out = tmp_path / "ablation.parquet"
    ablation.main(["--router", "depth1", str(tmp_path / "depth1"), "--router", "depth2", str(tmp_path / "depth1"),
                   "--threshold", str(kl_pool / "threshold.json"), "--budgets", "0.2", "0.4",
                   "--online", "depth1", "0.4", *runs["d1"], "--online", "depth2", "0.4", *runs["ref"],
                   "--reference", "0.4", *runs["ref"], "--out", str(out), "--figure", str(tmp_path / "fig.png")])
    df = pl.read_parquet(out).filter(pl.col("budget") == 0.4)
    assert dict(zip(df["variant"], df["success"])) == pytest.approx({"depth1": 100.0, "depth2": 200 / 3})
    assert dict(zip(df["variant"], df["cell_router"])) == {"depth1": False, "depth2": True}
    assert df.filter(pl.col("variant") == "depth1")["delta"][0] == pytest.approx(100 / 3)
    assert df["dmr_success"].to_list() == pytest.approx([200 / 3] * 2)
    assert (tmp_path / "fig.png").exists()
    with pytest.raises(SystemExit, match="at least one run directory"):
        ablation.main(["--router", "depth1", str(tmp_path / "depth1"), "--threshold", str(kl_pool / "threshold.json"),
                       "--online", "depth1", "0.4", "--out", str(out)])


def test_unknown_sweep_point_is_named(kl_pool, tmp_path):
    with pytest.raises(SystemExit, match="--tau-point 'sparse'.*auto.*dense"):
        klst.main(["--kl", str(kl_pool / "steps.parquet"), "--threshold", str(kl_pool / "threshold.json"),
                   "--sweep", str(kl_pool / "sweep.parquet"), "--tau-point", "sparse", "--precisions", "bf16", "w2",
                   "--out", str(tmp_path / "x")])
