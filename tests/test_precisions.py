"""More than two precisions (bf16, then by falling cost): the ladder labels (dmr.labels), the ladder
decision (dmr.routing), KL-ST over all classes (dmr.klst) and calibration for a cost budget
(dmr.calibrate); with two precisions each reduces to the paper's binary rule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from dmr import calibrate, klst
from dmr.labels import precision_labels
from dmr.router import RouterNet
from dmr.routing import ladder, needs_more

# -- labels --------------------------------------------------------------------------------------


def test_labels_are_the_cheapest_precision_that_suffices():
    kl = [[1e-5, 1e-5],  # both suffice: the cheaper, w3
          [1e-5, 1.0],  # w4 suffices, w3 does not
          [1.0, 1e-5],  # w4 does not, w3 does: still the cheapest that suffices
          [1.0, 1.0],  # neither: bf16
          [0.01, 0.02],  # at its tau a precision suffices
          [0.05, 0.05]]  # each precision against its own tau
    assert precision_labels(kl[:5], [0.01, 0.02]).tolist() == [2, 1, 2, 0, 2]
    assert precision_labels(kl, [0.1, 0.01]).tolist() == [2, 1, 2, 0, 1, 1]
    with pytest.raises(ValueError, match="one tau per low precision"):
        precision_labels(kl, [0.1])


def test_two_precisions_reduce_to_the_binary_labels():
    rng = np.random.default_rng(0)
    tau = 1e-2
    kl = np.concatenate([10 ** rng.normal(-3, 1.5, 500), [tau, tau, np.nan, 0.0, np.inf]])
    want = [0 if v > tau else 1 for v in kl]  # dmr.klst's label before there were more precisions
    assert precision_labels(kl, [tau]).tolist() == want
    assert precision_labels(kl[:, None], np.array([tau])).tolist() == want


# -- the ladder decision -------------------------------------------------------------------------


def test_ladder_goes_to_the_cheapest_precision_below_its_threshold():
    p = [0.125, 0.25, 0.625]
    assert needs_more(p) == [0.125, 0.375]
    assert [ladder(p, t) for t in (0.1, 0.125, 0.2, 0.375, 0.5)] == [0, 0, 1, 1, 2]
    assert ladder(p, [0.5, 0.25]) == 1 and ladder(p, [0.1, 0.4]) == 2 and ladder(p, [0.1, 0.3]) == 0
    with pytest.raises(ValueError, match="thresholds"):
        ladder(p, [0.5])
    rng = np.random.default_rng(1)
    for q, t in zip(rng.random(200), rng.random(200)):  # two precisions: bf16 iff p_bf16 >= t
        assert ladder([q, 1 - q], t) == (0 if q >= t else 1)
    assert needs_more([0.3, 0.7]) == [0.3]  # h_1 is p_bf16 itself, not a rounded sum


# -- KL-ST over three classes ----------------------------------------------------------------------


def test_training_separates_three_classes(windowed_pool):
    """Three well-separated classes, each marked by the current step's embedding; the rare ones
    are found thanks to the inverse-frequency class weights."""
    n_eps, L, D = 60, 5, 16

    def label(e, t):
        c = 0 if (e % 6 == 0 and t == L - 1) else 1 if t == 0 else 2  # rare, common, most
        return c, c

    emb, wins, y = windowed_pool(n_eps, L, D, label)
    idx = list(range(len(wins)))
    net = RouterNet(n_classes=3, in_dim=D, d_model=32, layers=1, heads=2, ff=32, window=L, dropout=0.0)
    fit = klst.train(net, emb, wins, y, idx, idx, epochs=30, bs=64, lr=3e-3, seed=0, progress=False)
    counts = np.bincount(y, minlength=3)
    assert fit["class_weights"] == pytest.approx((len(y) / (3 * counts)).tolist(), rel=1e-5)
    pred = klst.predict(net, emb, wins).argmax(-1).numpy()
    for c in range(3):
        assert (pred[np.asarray(y) == c] == c).mean() > 0.95, c
    assert klst.balanced_accuracy(pred, y, 3) > 0.95


def pool(tasks: int = 24, steps: int = 5, w3_shift: float = 0.0):
    """A KL pool of household-like bf16 steps whose observation says how far each low precision
    strays: locked doors are hard for both, keys only for w3, the rest easy."""
    rows = []
    for e in range(tasks):
        for t in range(steps):
            kind = "locked" if t == steps - 1 and e % 3 == 0 else "key" if t == 1 else "plain"
            obs = {"locked": "The door is locked.", "key": f"You pick up the key {t}.",
                   "plain": f"You walk to shelf {t}."}[kind]
            rows.append({"task": f"t{e:02d}", "step": t, "step_type": "action", "goal": f"open the door {e % 4}",
                         "prev_action": "" if t == 0 else f"go to shelf {t}", "observation": obs,
                         "kl_w4": {"locked": 1.0, "key": 1e-4, "plain": 1e-5}[kind],
                         "kl_w3": {"locked": 2.0, "key": 0.5, "plain": 1e-4 + w3_shift}[kind]})
    df = pl.DataFrame(rows)
    return {q: df.drop("kl_w4", "kl_w3").with_columns(kl=df[f"kl_{q}"], quant=pl.lit(q)) for q in ("w4", "w3")}


ARCH = json.dumps({"encoder": "text", "layers": 1, "d_model": 32, "heads": 2, "ff": 32, "window": 3, "dropout": 0.0})


def write_pools(tmp_path, pools):
    for q, df in pools.items():
        df.write_parquet(tmp_path / f"kl_{q}.parquet")
        (tmp_path / f"threshold_{q}.json").write_text(json.dumps({"tau": 1e-2}))
    return [str(tmp_path / f"kl_{q}.parquet") for q in ("w4", "w3")], \
        [str(tmp_path / f"threshold_{q}.json") for q in ("w4", "w3")]


def test_klst_trains_a_three_precision_router(tmp_path):
    kls, ths = write_pools(tmp_path, pool())
    out = tmp_path / "router"
    klst.main(["--kl", *kls, "--threshold", *ths, "--precisions", "bf16,w4,w3", "--arch", ARCH, "--epochs", "25",
               "--batch-size", "16", "--lr", "3e-3", "--val-fraction", "0.25", "--out", str(out), "--quiet"])
    assert json.loads((out / "router.json").read_text())["precisions"] == ["bf16", "w4", "w3"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["taus"] == {"w4": 1e-2, "w3": 1e-2} and "tau" not in m
    # per 24 episodes of 5 steps: 8 locked (bf16), 24 keys (w4), the other 88 plain (w3)
    assert m["class_fractions"] == pytest.approx({"bf16": 8 / 120, "w4": 24 / 120, "w3": 88 / 120})
    assert m["positive_fraction"] == pytest.approx(8 / 120) and m["arch"]["n_classes"] == 3
    assert m["val_bacc"] > 0.95 and m["train_bacc"] > 0.95
    s = pl.read_parquet(out / "train_scores.parquet")
    assert s.columns == ["task", "step", "step_type", "kl_w4", "kl_w3", "label", "score", "target", "prob_bf16",
                         "prob_w4", "prob_w3", "split", "source"]
    assert (s["label"] == (s["target"] == 0).cast(pl.Int64)).all() and (s["score"] == s["prob_bf16"]).all()
    # --tau overrides both thresholds: with w3's at 1.0 the key steps are w3's too
    klst.main(["--kl", *kls, "--threshold", *ths, "--tau", "1e-2", "1.0", "--precisions", "bf16", "w4", "w3",
               "--arch", ARCH, "--epochs", "1", "--out", str(tmp_path / "r2"), "--quiet"])
    m2 = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert m2["class_fractions"] == pytest.approx({"bf16": 8 / 120, "w4": 0.0, "w3": 112 / 120})


def test_klst_two_precisions_keep_the_binary_outputs(tmp_path):
    kls, ths = write_pools(tmp_path, pool())
    out = tmp_path / "router"
    klst.main(["--kl", kls[1], "--threshold", ths[1], "--precisions", "bf16", "w3", "--arch", ARCH, "--epochs", "1",
               "--out", str(out), "--quiet"])
    s = pl.read_parquet(out / "train_scores.parquet")
    assert s.columns == ["task", "step", "step_type", "kl", "label", "score", "split", "source"]
    assert s["label"].to_list() == [1 if v > 1e-2 else 0 for v in s["kl"]]
    m = json.loads((out / "metrics.json").read_text())
    assert m["tau"] == 1e-2 and "taus" not in m and "class_fractions" not in m


def test_klst_refuses_pools_of_different_rollouts(tmp_path):
    pools = pool()
    kls, ths = write_pools(tmp_path, pools)
    common = ["--precisions", "bf16", "w4", "w3", "--arch", ARCH, "--epochs", "1", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match="one --kl pool and one --threshold"):
        klst.main(["--kl", *kls, "--threshold", ths[0], *common])
    pools["w3"].filter(pl.col("task") != "t03").write_parquet(kls[1])
    with pytest.raises(SystemExit, match="same bf16 rollout: 5 steps only in the first"):
        klst.main(["--kl", *kls, "--threshold", *ths, *common])
    pools["w3"].with_columns(observation=pl.when(pl.col("step") == 2).then(pl.lit("Elsewhere."))
                             .otherwise(pl.col("observation"))).write_parquet(kls[1])
    with pytest.raises(SystemExit, match="24 steps differ"):
        klst.main(["--kl", *kls, "--threshold", *ths, *common])
    with pytest.raises(SystemExit, match="--tau-point: two-precision"):
        klst.main(["--kl", *kls, "--threshold", *ths, "--tau-point", "dense", *common])


# -- calibration for a cost budget ---------------------------------------------------------------

# Four steps over (bf16, w4, w3) with exact binary fractions, so every share below is exact.
PROBS = [[0.875, 0.0625, 0.0625],  # h = (0.875, 0.9375)
         [0.5, 0.25, 0.25],  # h = (0.5, 0.75)
         [0.25, 0.125, 0.625],  # h = (0.25, 0.375)
         [0.125, 0.0625, 0.8125]]  # h = (0.125, 0.1875)
COSTS = [1.0, 0.5, 0.25]  # per token, relative to bf16


def test_cost_budget_thresholds_known_values():
    cum = calibrate.cumulative(PROBS)
    assert cum.tolist() == [[0.875, 0.9375], [0.5, 0.75], [0.25, 0.375], [0.125, 0.1875]]
    # Raising t moves one step one rung down at each h: cost shares 1, .875, .8125, .6875, .625, .5,
    # .4375, .3125, then .25 above every h. t_K is the first (smallest) t whose share is <= K.
    above = float(np.nextafter(0.9375, np.inf))
    taus = calibrate.cost_thresholds(cum, [1.0, 0.9, 0.7, 0.5, 0.45, 0.3, 0.25], COSTS)
    assert taus == {"1": 0.125, "0.9": 0.1875, "0.7": 0.375, "0.5": 0.75, "0.45": 0.875, "0.3": above, "0.25": above}
    assert {k: calibrate.cost_share(cum, t, COSTS) for k, t in taus.items()} == {
        "1": 1.0, "0.9": 0.875, "0.7": 0.6875, "0.5": 0.5, "0.45": 0.4375, "0.3": 0.25, "0.25": 0.25}
    prec = ["bf16", "w4", "w3"]
    assert calibrate.precision_shares(cum, taus["0.5"], prec) == {"bf16": 0.25, "w4": 0.25, "w3": 0.5}
    assert calibrate.precision_shares(cum, taus["0.9"], prec) == {"bf16": 0.75, "w4": 0.25, "w3": 0.0}
    assert calibrate.precision_shares(cum, taus["0.3"], prec) == {"bf16": 0.0, "w4": 0.0, "w3": 1.0}
    # the same steps weighted by their tokens (Eq. 9 is per token): 2, 1, 1, 4 of 8
    w = [2, 1, 1, 4]
    taus_w = calibrate.cost_thresholds(cum, [0.9, 0.6, 0.5], COSTS, w)
    assert taus_w == {"0.9": 0.1875, "0.6": 0.375, "0.5": 0.75}
    assert [calibrate.cost_share(cum, t, COSTS, w) for t in taus_w.values()] == [0.75, 0.5625, 0.46875]
    # absolute coefficients give the same thresholds as relative ones
    assert calibrate.cost_thresholds(cum, [0.5], [20.0, 10.0, 5.0]) == {"0.5": 0.75}
    with pytest.raises(ValueError, match="below 0.25"):
        calibrate.cost_thresholds(cum, [0.2], COSTS)
    with pytest.raises(ValueError, match="ordered by cost"):
        calibrate.cost_thresholds(cum, [0.5], [1.0, 0.25, 0.5])
    with pytest.raises(ValueError, match="budget K"):
        calibrate.cost_thresholds(cum, [1.5], COSTS)


def calib_run(tmp_path, probs, tokens, precisions):
    """A calibration rollout's steps (a forced step without scores among them) and a router
    directory whose precisions and training scores calibration reads."""
    run, router = tmp_path / "run", tmp_path / "router"
    run.mkdir()
    router.mkdir()
    rows = [{"task": f"e{i // 2}", "step": i % 2, "route_score": p[0], "route_probs": p, "completion_tokens": n}
            for i, (p, n) in enumerate(zip(probs, tokens))]
    rows.insert(1, {"task": "e0", "step": 9, "route_score": None, "route_probs": None, "completion_tokens": 50})
    if len(precisions) == 2:
        rows = [{k: v for k, v in r.items() if k != "route_probs"} for r in rows]
    pl.DataFrame(rows).write_parquet(run / "steps.parquet")
    (router / "router.json").write_text(json.dumps({"precisions": precisions}))
    pl.DataFrame({"score": [p[0] for p in probs],
                  **{f"prob_{q}": [p[c] for p in probs] for c, q in enumerate(precisions)}}
                 ).write_parquet(router / "train_scores.parquet")
    return ["--run", str(run), "--train-scores", str(router / "train_scores.parquet"),
            "--figure", str(tmp_path / "fig.png")]


def test_calibrate_cost_budget_end_to_end(tmp_path):
    args = calib_run(tmp_path, PROBS, [2, 1, 1, 4], ["bf16", "w4", "w3"])
    coef = tmp_path / "coefficients.json"  # dmr.latency's layout, seconds per token
    coef.write_text(json.dumps({"per_token": {"bf16": 0.02, "w4": 0.01, "w3": 0.005, "other": 1.0}, "router": 0.003}))
    out = tmp_path / "calibration.json"
    calibrate.main([*args, "--budgets", "0.9", "0.6", "0.5", "--coefficients", str(coef), "--out", str(out)])
    cal = json.loads(out.read_text())
    assert cal["thresholds"] == {"0.9": 0.1875, "0.6": 0.375, "0.5": 0.75}
    assert cal["realised_cost_share"] == {"0.9": 0.75, "0.6": 0.5625, "0.5": 0.46875}
    assert cal["realised_precision_share"]["0.6"] == {"bf16": 0.5, "w4": 0.25, "w3": 0.25}
    assert cal["costs"] == COSTS and cal["steps"] == 4 and cal["weights"] == [2, 1, 1, 4]
    assert cal["same_threshold_on_train"]["0.5"] == {"bf16": 0.25, "w4": 0.25, "w3": 0.5}
    # any budget later, from the stored distributions
    assert calibrate.budget_threshold(out, 0.6) == 0.375
    assert calibrate.budget_threshold(out, 0.7) == 0.25 and calibrate.budget_threshold(out, 0.8) == 0.1875
    with pytest.raises(SystemExit, match="--coefficients"):
        calibrate.main([*args, "--out", str(out)])
    with pytest.raises(SystemExit, match=r"no cost coefficient for \['w3'\]"):
        calibrate.main([*args, "--coefficients", '{"bf16": 1, "w4": 0.5}', "--out", str(out)])
    with pytest.raises(SystemExit, match="below 0.25"):
        calibrate.main([*args, "--budgets", "0.2", "--coefficients", str(coef), "--out", str(out)])


def test_calibrate_two_precisions_keeps_the_quantile_rule(tmp_path):
    scores = np.random.default_rng(3).beta(0.5, 2.0, 60).tolist()
    args = calib_run(tmp_path, [[s, 1 - s] for s in scores], [5] * 60, ["bf16", "w4"])
    plain, costed = tmp_path / "plain.json", tmp_path / "costed.json"
    calibrate.main([*args, "--out", str(plain)])
    calibrate.main([*args, "--coefficients", '{"bf16": 1, "w4": 0.5}', "--out", str(costed)])
    assert plain.read_bytes() == costed.read_bytes()  # coefficients change nothing with one low precision
    cal = json.loads(plain.read_text())
    assert "probs" not in cal
    for k in ("0.2", "0.4", "0.7"):
        assert cal["thresholds"][k] == float(np.quantile(scores, 1 - float(k), method="higher"))
        # budget_threshold reads the stored scores, rounded to 6 decimals
        assert calibrate.budget_threshold(plain, float(k)) == pytest.approx(cal["thresholds"][k], abs=1e-6)


def test_calibrate_two_precisions_by_cost(tmp_path):
    """--by-cost: a binary router calibrated to a share of bf16's modelled cost (to meet a three-way
    router at equal cost): bf16 steps 2 and 4 of tokens 1 and 4 (at 1) and the rest at 0.5 cost
    (1 + 4 + 0.5 * (2 + 1)) / 8 = 0.8125 of bf16's; the thresholds act on p_bf16 as the paper's do."""
    probs = [[0.1, 0.9], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]
    args = calib_run(tmp_path, probs, [2, 1, 1, 4], ["bf16", "w4"])
    out = tmp_path / "calibration.json"
    calibrate.main([*args, "--by-cost", "--budgets", "0.85", "0.6", "--coefficients", '{"bf16": 1, "w4": 0.5}',
                    "--out", str(out)])
    cal = json.loads(out.read_text())
    # K = 0.6: t = 0.8 still keeps step 4 at bf16 (0.75 of the cost), so every step goes to w4 (0.5).
    assert cal["thresholds"]["0.85"] == 0.6 and 0.8 < cal["thresholds"]["0.6"] < 0.8 + 1e-9
    assert cal["realised_cost_share"] == {"0.85": 0.8125, "0.6": 0.5}
    assert cal["realised_precision_share"]["0.85"] == {"bf16": 0.5, "w4": 0.5}
    assert calibrate.budget_threshold(out, 0.85) == 0.6
    with pytest.raises(SystemExit, match="--coefficients"):
        calibrate.main([*args, "--by-cost", "--out", str(out)])


@pytest.mark.slow
@pytest.mark.long
def test_micro_ladder_cell_end_to_end(tmp_path):
    """A three-precision cell through the whole workflow (make test-long): the micro household agent,
    GPTQ-W4 and RTN-W3, the router over bf16/W4/W3 from both KL pools, its calibration at cost
    budgets, GRPO over three classes, matched random over each precision's share, the two binary
    routers calibrated to the same cost budgets, Table 1 with precision shares, and the summary."""
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "config/micro.yaml").read_text())
    cfg["cells"] = [{"benchmark": "household", "model": "tiny", "quants": ["gptq_w4a16", "rtn_w3a16"],
                     "route": ["gptq_w4a16+rtn_w3a16"]}]
    # Measured coefficients on this CPU need not fall along the ladder: the paper's Table 3 values.
    cfg["latency"] = {"source": "config",
                      "coefficients": {"bf16": 25.02, "gptq_w4a16": 16.77, "rtn_w3a16": 14.58, "router": 19.9}}
    cfg["route"] |= {"cost_budgets": [0.8, 0.9], "baselines": ["random"], "baseline_budgets": [0.4]}
    (tmp_path / "ladder.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(tmp_path),
                        "--configfile", str(tmp_path / "ladder.yaml"), "--cores", "2"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cell = tmp_path / "results/household/tiny"
    x = cell / "gptq_w4a16+rtn_w3a16"
    assert json.loads((x / "router/router.json").read_text())["precisions"] == ["bf16", "gptq_w4a16", "rtn_w3a16"]
    cal = json.loads((x / "router/calibration.json").read_text())
    assert set(cal["thresholds"]) == {"0.8", "0.9"}
    assert all(share <= float(k) + 1e-9 for k, share in cal["realised_cost_share"].items())
    for low in ("gptq_w4a16", "rtn_w3a16"):
        assert set(json.loads((cell / low / "router/calibration_cost.json").read_text())["thresholds"]) == {"0.8", "0.9"}
    curve = pl.read_parquet(x / "grpo/lam0.1/curve.parquet")
    assert {"frac_bf16", "frac_gptq_w4a16", "frac_rtn_w3a16"} <= set(curve.columns)
    table = pl.read_parquet(cell / "tables/main.parquet").filter(pl.col("quant") == "gptq_w4a16+rtn_w3a16")
    assert sorted(set(table["method"])) == ["DMR", "DMR-gptq_w4a16", "DMR-rtn_w3a16", "GRPO", "Random"]
    assert table["shares"].null_count() == 0 and set(table["budget"]) == {0.8, 0.9}
    dmr = pl.read_parquet(x / "rollouts/dmr-k0.8/seed0/steps.parquet")
    rnd = pl.read_parquet(x / "rollouts/random-k0.8/seed0/steps.parquet")
    assert set(rnd["precision"]) <= {"bf16", "gptq_w4a16", "rtn_w3a16"} and dmr["route_probs"].null_count() < dmr.height
    assert "### Three precisions at equal cost" in (tmp_path / "results/summary.md").read_text()
