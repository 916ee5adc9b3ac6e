"""Inference-time calibration of the router's deployment threshold (paper Sec. 4.2, App. D).

The KL-ST router was trained on states of bf16 trajectories; deployed, its own mixed-precision
choices lead to other states and its scores shift. So the router runs once, at the default
threshold 0.5, on a calibration pool disjoint from train and test (a `dmr` rollout on the calib
split), and its high-precision scores s on the router-eligible steps are kept. For a budget K the
deployment threshold is tau_K = quantile_{1-K}(s): routing the steps with s >= tau_K to high
precision sends a fraction K of the calibration steps there. Any K can be derived later from the
stored scores without rerunning anything.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dmr import plots


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
    return thresholds(cal["scores"], [budget])[f"{budget:g}"]


def high_fraction(scores, tau: float) -> float:
    return float((np.asarray(scores) >= tau).mean())


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
    p.add_argument("--out", required=True, type=Path, help="calibration.json")
    p.add_argument("--figure", required=True, type=Path, help="score distributions figure (.png and .pdf)")
    a = p.parse_args(argv)
    steps = pl.read_parquet(a.run / "steps.parquet")
    if "route_score" not in steps.columns or steps["route_score"].null_count() == len(steps):
        raise SystemExit(f"{a.run}: no router scores in steps.parquet (was it a dmr rollout?)")
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


if __name__ == "__main__":
    main()
