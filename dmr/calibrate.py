"""Inference-time calibration of the router's deployment threshold (paper Sec. 4.2, App. D).

The KL-ST router was trained on states of bf16 trajectories; deployed, its own mixed-precision
choices lead to other states and its scores shift. So the router runs once, at the default
threshold 0.5, on a calibration pool disjoint from train and test (a `dmr` rollout on the calib
split), and its high-precision scores s on the router-eligible steps are kept. For a budget K the
deployment threshold is tau_K = quantile_{1-K}(s): routing the steps with s >= tau_K to high
precision sends a fraction K of the calibration steps there. Any K can be derived later from the
stored scores without rerunning anything.

More than one low precision (a router over C > 2 precisions, bf16 first, then by falling cost; its
runs record each decided step's distribution as `route_probs`): a budget K is a share of bf16's
modelled LLM cost (Eq. 9: each step costs c_p per completion token at its precision p), not a share
of bf16 steps. The router decides by the precision ladder (dmr.routing.ladder) with one threshold t
on every rung, and a step's cost only falls as t grows, so the realised cost share on the
calibration pool is a non-increasing step function of t. t_K is the smallest t whose realised share
is at most K: the costliest routing within the budget. A K below c_cheapest / c_bf16 (every step at
the cheapest precision) cannot be met and is refused. c_router is left out of the share: every
decided step pays it whatever the thresholds are. The two-precision case keeps the quantile rule;
`--by-cost` calibrates a two-precision router to a cost budget too, so that it can be compared with
a router over more precisions at equal modelled cost.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dmr import plots
from dmr.routing import needs_more

TOL = 1e-9  # float slack when a realised cost share is compared with K


def thresholds(scores, budgets) -> dict[str, float]:
    s = np.asarray(scores, dtype=float)
    if len(s) == 0:
        raise ValueError("no router scores to calibrate on (no router-eligible steps in the calibration run)")
    out = {}
    for k in budgets:
        if not 0.0 < k <= 1.0:
            raise ValueError(f"budget K must be in (0, 1], got {k}")
        out[f"{k:g}"] = float(np.quantile(s, 1.0 - k, method="higher"))
    return out


def budget_threshold(calibration: str | Path, budget: float) -> float:
    """tau_K for any budget from a calibration file."""
    cal = json.loads(Path(calibration).read_text())
    if "probs" in cal:  # more than one low precision: K is a cost share
        return cost_thresholds(cumulative(cal["probs"]), [budget], cal["costs"], cal["weights"])[f"{budget:g}"]
    return thresholds(cal["scores"], [budget])[f"{budget:g}"]


def high_fraction(scores, tau: float) -> float:
    return float((np.asarray(scores) >= tau).mean())


def cumulative(probs) -> np.ndarray:
    """[N, C - 1]: h_1..h_{C-1} of each step's distribution over C precisions (dmr.routing.needs_more,
    computed as Router.decide computes it)."""
    rows = [needs_more(p) for p in probs]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError("need at least one step, each with a distribution over the same precisions")
    return np.asarray(rows, dtype=float)


def relative_costs(costs) -> np.ndarray:
    """Per-token coefficients (any unit), bf16 first, as shares of bf16's."""
    c = np.asarray(costs, dtype=float)
    if c.ndim != 1 or len(c) < 2 or not np.isfinite(c).all() or (c <= 0).any():
        raise ValueError(f"need a positive cost coefficient per precision, bf16 first; got {costs}")
    if (np.diff(c) > 0).any():
        raise ValueError(f"precisions must be ordered by cost, bf16 first, each no costlier than the one before; "
                         f"got coefficients {c.tolist()}")
    return c / c[0]


def ladder_levels(cum, t: float) -> np.ndarray:
    """Each step's precision index at the threshold t on every rung: the cheapest j with h_j < t,
    else 0; as h_j never falls with j, that is the number of h_j below t."""
    return (np.asarray(cum, dtype=float) < t).sum(axis=1)


def _weights(weights, n: int) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight (completion tokens) per step, not all zero, for {n} steps")
    return w


def cost_share(cum, t: float, costs, weights=None) -> float:
    """The share of bf16's LLM cost the ladder at threshold t spends on these steps."""
    r, lv = relative_costs(costs), ladder_levels(cum, t)
    w = _weights(weights, len(lv))
    return float(w @ r[lv] / w.sum())


def precision_shares(cum, t: float, precisions: list[str]) -> dict[str, float]:
    """The share of steps the ladder at threshold t sends to each precision."""
    lv = ladder_levels(cum, t)
    return {q: float((lv == j).mean()) for j, q in enumerate(precisions)}


def cost_thresholds(cum, budgets, costs, weights=None) -> dict[str, float]:
    """t_K per cost budget K: the smallest threshold whose realised cost share on the steps `cum`
    (their h_j, `cumulative`) is at most K. `costs`: the per-token coefficient of every precision,
    bf16 first; `weights`: each step's completion tokens (default: equal)."""
    h = np.asarray(cum, dtype=float)
    if h.ndim != 2 or len(h) == 0:
        raise ValueError("no router scores to calibrate on (no router-decided steps in the calibration run)")
    r = relative_costs(costs)
    if h.shape[1] != len(r) - 1:
        raise ValueError(f"{h.shape[1] + 1} precisions in the scores but {len(r)} cost coefficients")
    if (np.diff(h, axis=1) < 0).any() or not np.isfinite(h).all():
        raise ValueError("cumulative scores must be finite and never fall along the ladder (dmr.routing.needs_more)")
    w = _weights(weights, len(h))
    # Raising t past h_j moves a step from rung j - 1 to rung j and saves w (r_{j-1} - r_j) of cost.
    flat = h.ravel()
    order = np.argsort(flat, kind="stable")
    saved = np.concatenate([[0.0], np.cumsum((w[:, None] * (r[:-1] - r[1:])).ravel()[order])])
    cuts = np.unique(flat)
    cuts = np.append(cuts, np.nextafter(cuts[-1], np.inf))  # above every h: all at the cheapest
    share = 1.0 - saved[np.searchsorted(flat[order], cuts, side="left")] / w.sum()
    out = {}
    for k in budgets:
        if not 0.0 < k <= 1.0:
            raise ValueError(f"budget K must be in (0, 1], got {k}")
        if k < r[-1] - TOL:
            raise ValueError(f"cost budget K={k:g} is below {r[-1]:.4g}, the cost share of routing every step to the "
                             "cheapest precision: no thresholds meet it")
        out[f"{k:g}"] = float(cuts[np.argmax(share <= k + TOL)])
    return out


def figure(train_scores, calib_scores, cal: dict, title: str, path: Path) -> None:
    plt = plots.pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bins = np.linspace(0, 1, 41)
    ax.hist(train_scores, bins=bins, density=True, alpha=0.55, color="#7a9cc6",
            label=f"KL-ST training pool (mean {np.mean(train_scores):.2f})")
    ax.hist(calib_scores, bins=bins, density=True, alpha=0.55, color="#e39b5b",
            label=f"calibration pool (mean {np.mean(calib_scores):.2f})")
    ax.axvline(0.5, color="0.3", ls="--", lw=1, label="default 0.5")
    for k, t in cal["thresholds"].items():
        ax.axvline(t, color="#c0392b", lw=1)
        ax.text(t, ax.get_ylim()[1] * 0.92, f"K={k}", rotation=90, fontsize=6, ha="right", va="top", color="#c0392b")
    ax.set_xlabel("router high-precision score s")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save(fig, path)


def main(argv=None):
    import polars as pl

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="calibration rollout directory (policy dmr, threshold 0.5)")
    p.add_argument("--train-scores", required=True, type=Path, help="train_scores.parquet written by dmr.klst")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4, 0.7])
    p.add_argument("--router", type=Path, default=None,
                   help="> 2 precisions: the router directory, for its precisions (default: --train-scores' folder)")
    p.add_argument("--coefficients", default=None,
                   help="> 2 precisions: per-token cost coefficients, a coefficients.json of dmr.latency or a JSON "
                        "object {precision: coefficient}; a budget is then a share of bf16's modelled cost")
    p.add_argument("--by-cost", action="store_true",
                   help="two precisions: K is a share of bf16's modelled cost (needs --coefficients), as with more")
    p.add_argument("--out", required=True, type=Path, help="calibration.json")
    p.add_argument("--figure", required=True, type=Path, help="score distributions figure (.png and .pdf)")
    a = p.parse_args(argv)
    steps = pl.read_parquet(a.run / "steps.parquet")
    if "route_score" not in steps.columns or steps["route_score"].null_count() == len(steps):
        raise SystemExit(f"{a.run}: no router scores in steps.parquet (was it a dmr rollout?)")
    ladder = "route_probs" in steps.columns and steps["route_probs"].drop_nulls().len() > 0
    if a.by_cost or ladder:
        return calibrate_costs(steps, a, ladder)
    calib = steps["route_score"].drop_nulls().to_numpy()
    train = pl.read_parquet(a.train_scores)["score"].to_numpy()
    taus = thresholds(calib, a.budgets)
    cal = {"thresholds": taus, "steps": int(len(calib)), "episodes": int(steps["task"].n_unique()),
           "realised_on_calib": {k: high_fraction(calib, t) for k, t in taus.items()},
           "same_threshold_on_train": {k: high_fraction(train, t) for k, t in taus.items()},
           "default_0.5_high_fraction": {"train": high_fraction(train, 0.5), "calib": high_fraction(calib, 0.5)},
           "mean_score": {"train": float(train.mean()), "calib": float(calib.mean())},
           "scores": sorted(round(float(s), 6) for s in calib)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(cal, indent=1))
    figure(train, calib, cal, f"router scores: training vs calibration pool ({len(calib)} steps)", a.figure)
    for k, t in taus.items():
        print(f"K={k}: tau_K={t:.4f}; high on calib {100 * cal['realised_on_calib'][k]:.1f}%, "
              f"on train pool {100 * cal['same_threshold_on_train'][k]:.1f}%")
    d = cal["default_0.5_high_fraction"]
    print(f"default 0.5 would route {100 * d['train']:.1f}% of training-pool steps high but {100 * d['calib']:.1f}% "
          f"of calibration steps -> {a.out}")


def coefficients(given: str, precisions: list[str]) -> list[float]:
    """Each precision's per-token coefficient from --coefficients (a dmr.latency coefficients.json,
    whose `per_token` is read, or a JSON object {precision: coefficient})."""
    text = given.strip()
    coef = json.loads(text if text.startswith("{") else Path(given).read_text())
    coef = coef.get("per_token", coef)
    missing = [q for q in precisions if q not in coef]
    if missing:
        raise SystemExit(f"--coefficients: no cost coefficient for {missing}; have {sorted(coef)}")
    return [float(coef[q]) for q in precisions]


def calibrate_costs(steps, a, ladder: bool) -> None:
    """calibration.json at cost budgets (cost_thresholds): of a router over > 2 precisions (`ladder`: the
    run recorded each step's distribution), or of a two-precision one (--by-cost)."""
    import polars as pl

    router = a.router or a.train_scores.parent
    if not (router / "router.json").exists():
        raise SystemExit(f"{router}: no router.json, whose precisions the calibration run's route_probs follow "
                         "(give --router)")
    precisions = json.loads((router / "router.json").read_text())["precisions"]
    if a.coefficients is None:
        raise SystemExit(f"{a.run} routes {len(precisions)} precisions {precisions}: a budget is a share of bf16's "
                         "modelled cost; give --coefficients (dmr.latency's coefficients.json or {precision: c})")
    if ladder:
        decided = steps.filter(pl.col("route_probs").is_not_null())
        probs = decided["route_probs"].to_list()
    else:  # a two-precision run (--by-cost): its distribution is (p_bf16, 1 - p_bf16)
        decided = steps.filter(pl.col("route_score").is_not_null())
        probs = [[s, 1.0 - s] for s in decided["route_score"].to_list()]
    if {len(p) for p in probs} != {len(precisions)}:
        raise SystemExit(f"{a.run}: route_probs over {sorted({len(p) for p in probs})} classes, the router in {router} "
                         f"has {len(precisions)} precisions {precisions}")
    # Eq. 9 charges per completion token: a step weighs its tokens on the calibration run.
    weights = decided["completion_tokens"].to_list() if "completion_tokens" in decided.columns else None
    costs = coefficients(a.coefficients, precisions)
    try:
        rel = relative_costs(costs).tolist()
        cum = cumulative(probs)
        taus = cost_thresholds(cum, a.budgets, rel, weights)
    except ValueError as e:
        raise SystemExit(f"{a.run}: {e}") from None
    train = pl.read_parquet(a.train_scores)
    cols = [f"prob_{q}" for q in precisions]
    train_cum = cumulative(train.select(cols).rows()) if all(c in train.columns for c in cols) else None
    calib = decided["route_score"].to_numpy()
    cal = {"precisions": precisions, "costs": rel, "coefficients": dict(zip(precisions, costs)), "thresholds": taus,
           "steps": len(probs), "episodes": int(decided["task"].n_unique()),
           "realised_cost_share": {k: cost_share(cum, t, rel, weights) for k, t in taus.items()},
           "realised_precision_share": {k: precision_shares(cum, t, precisions) for k, t in taus.items()},
           "same_threshold_on_train": None if train_cum is None else
           {k: precision_shares(train_cum, t, precisions) for k, t in taus.items()},
           "default_0.5": {"cost_share": cost_share(cum, 0.5, rel, weights),
                           "precision_share": precision_shares(cum, 0.5, precisions)},
           "mean_score": {"train": float(train["score"].mean()), "calib": float(calib.mean())},
           "weights": weights, "probs": probs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(cal, indent=1))
    figure(train["score"].to_numpy(), calib, cal, f"router p_bf16: training vs calibration pool ({len(calib)} steps)",
           a.figure)
    for k, t in taus.items():
        shares = ", ".join(f"{q} {100 * f:.1f}%" for q, f in cal["realised_precision_share"][k].items())
        print(f"K={k} (share of bf16's cost): t_K={t:.4f}; cost on calib {100 * cal['realised_cost_share'][k]:.1f}%; "
              f"steps {shares}")
    print(f"threshold 0.5 spends {100 * cal['default_0.5']['cost_share']:.1f}% of bf16's cost on the calibration "
          f"steps -> {a.out}")


if __name__ == "__main__":
    main()
