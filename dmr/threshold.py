"""The KL threshold tau that turns step-wise KL into router labels y = 1[KL > tau] (paper Sec. 4.2).

The rule, on the log10 KL of the router-eligible steps:
1. histogram with `bins_per_decade` bins per decade, smoothed by a 3-bin moving average; KL values
   below `floor` (identical distributions up to float noise) count as `floor`;
2. the low-divergence mass is the histogram's highest peak;
3. the search range runs from that peak to the largest KL that still leaves `min_positive` of the
   steps above it, so tau always labels some steps positive;
4. in that range, the sparse bins are those whose density is within `slack` (fraction of the peak)
   of the range's minimum; tau is the centre of the longest contiguous run of sparse bins.
So tau sits in the middle of the plateau between the dense low mode and the high-divergence tail,
where moving it a little flips few labels.
5. No plateau: when even the sparsest bin of the range is denser than `sparse` (10% of the peak),
   the KL distribution is not bimodal (e.g. a scheme so coarse that it diverges everywhere, where
   the range collapses to the last percentiles) and no threshold is robust. tau then falls back to
   the quantile that labels `fallback_positive` of the steps (default 0.2, the smallest budget),
   `plateau_found` is false in threshold.json and the figure says so.

The sensitivity sweep adds thresholds across sparse and dense regions (the paper's Fig. 5): the
far-left edge of the low mode (`low-edge`, the 5% quantile: only nearly identical outputs are
negative; the paper's tau_1), the left and right edges of the plateau (`plateau-right` is tau_3),
the median (`low-mass`), and the densest bin right of the low mode's shoulder (`dense`, tau_4),
each with its density and positive fraction.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dmr import plots


def log_kl(kl, floor: float = 1e-8) -> np.ndarray:
    return np.log10(np.maximum(np.asarray(kl, dtype=float), floor))


def histogram(x: np.ndarray, bins_per_decade: int = 10):
    lo, hi = np.floor(x.min() * bins_per_decade) / bins_per_decade, np.ceil(x.max() * bins_per_decade) / bins_per_decade
    edges = np.arange(lo, hi + 1.5 / bins_per_decade, 1.0 / bins_per_decade)
    counts, edges = np.histogram(x, bins=edges)
    smooth = np.convolve(counts, np.ones(3) / 3, mode="same")
    return counts, smooth, edges


def choose(kl, floor: float = 1e-8, bins_per_decade: int = 10, min_positive: float = 0.02,
           slack: float = 0.02, sparse: float = 0.1, fallback_positive: float = 0.2) -> dict:
    """tau and the plateau it was taken from (all in KL units, plus the log10 histogram)."""
    x = log_kl(kl, floor)
    if len(x) < 10:
        raise ValueError(f"need at least 10 KL values to place a threshold, got {len(x)}")
    counts, smooth, edges = histogram(x, bins_per_decade)
    peak = int(np.argmax(smooth))
    # The largest cut that leaves min_positive of the steps above it.
    limit = float(np.quantile(x, 1.0 - min_positive))
    last = max(peak + 1, int(np.searchsorted(edges, limit, side="right")) - 1)
    rng = np.arange(peak + 1, min(last, len(smooth) - 1) + 1)
    if len(rng) == 0:
        rng = np.array([min(peak + 1, len(smooth) - 1)])
    dens = smooth[rng] / smooth[peak]
    low = dens <= dens.min() + slack
    best, run, start = (0, 0), 0, 0
    for i, s in enumerate(low):
        if s:
            start = i if run == 0 else start
            run += 1
            if run > best[1] - best[0]:
                best = (start, start + run)
        else:
            run = 0
    left, right = edges[rng[best[0]]], edges[rng[best[1] - 1] + 1]
    found = bool(dens.min() <= sparse)
    tau_log = (left + right) / 2 if found else float(np.quantile(x, 1.0 - fallback_positive))
    kl = np.asarray(kl, dtype=float)
    return {"tau": float(10 ** tau_log), "log10_tau": float(tau_log), "plateau_found": found,
            "plateau": [float(10 ** left), float(10 ** right)], "plateau_density": float(dens.min()),
            "positive_fraction": float((kl > 10 ** tau_log).mean()), "steps": int(len(kl)),
            "rule": {"floor": floor, "bins_per_decade": bins_per_decade, "min_positive": min_positive, "slack": slack,
                     "sparse": sparse, "fallback_positive": fallback_positive},
            "hist": {"edges": edges.tolist(), "counts": counts.tolist()}}


def sweep(kl, chosen: dict) -> list[dict]:
    """Thresholds across sparse and dense regions for the sensitivity study."""
    kl = np.asarray(kl, dtype=float)
    edges = np.asarray(chosen["hist"]["edges"])
    counts = np.asarray(chosen["hist"]["counts"], dtype=float)
    peak = float(counts.max())
    lo, hi = np.log10(chosen["plateau"])
    # Dense: the fullest bin right of the plateau (the high mode) or, if none, left of it.
    right = [i for i in range(len(counts)) if edges[i] >= hi]
    left = [i for i in range(len(counts)) if edges[i + 1] <= lo]
    dense_i = max(right or left, key=lambda i: counts[i])
    x = np.log10(np.maximum(kl, chosen["rule"]["floor"]))
    # The paper's tau_1..tau_4 (Sec. 5.5, Fig. 5) are low-edge, auto, plateau-right and dense.
    points = [("low-edge", float(np.quantile(x, 0.05))), ("plateau-left", lo + 0.05), ("auto", chosen["log10_tau"]),
              ("plateau-right", hi - 0.05), ("low-mass", float(np.quantile(x, 0.5))),
              ("dense", (edges[dense_i] + edges[dense_i + 1]) / 2)]
    rows = []
    for name, t in points:
        b = int(np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(counts) - 1))
        rows.append({"name": name, "tau": float(10 ** t), "log10_tau": float(t),
                     "density": float(counts[b] / peak),
                     "region": "sparse" if counts[b] / peak <= chosen["rule"]["sparse"] else "dense",
                     "positive_fraction": float((kl > 10 ** t).mean())})
    return rows


def figure(kl, chosen: dict, rows: list[dict], title: str, path: Path) -> None:
    plt = plots.pyplot()

    edges = np.asarray(chosen["hist"]["edges"])
    counts = np.asarray(chosen["hist"]["counts"])
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#7a9cc6", edgecolor="none")
    if chosen.get("plateau_found", True):
        ax.axvspan(*np.log10(chosen["plateau"]), color="#f2d184", alpha=0.35, label="sparse plateau")
    else:
        ax.text(0.02, 0.95, "no sparse plateau: τ at the fallback quantile", transform=ax.transAxes,
                fontsize=7, va="top")
    for r in rows:
        if r["name"] != "auto":
            ax.axvline(r["log10_tau"], color="0.5", ls=":", lw=1)
    ax.axvline(chosen["log10_tau"], color="#c0392b", lw=1.5,
               label=f"τ = {chosen['tau']:.2e} ({100 * chosen['positive_fraction']:.1f}% positive)")
    ax.set_yscale("log")
    ax.set_xlabel("log10 step KL(p_bf16 ‖ p_low)")
    ax.set_ylabel("steps")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    plots.save(fig, path)


def eligible(df, step_types: list[str]):
    import polars as pl

    return df.filter(pl.col("step_type").is_in(step_types))


def main(argv=None):
    import polars as pl

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kl", required=True, type=Path, help="steps.parquet written by dmr.kl")
    p.add_argument("--step-types", nargs="+", default=["action"], help="router-eligible step types")
    p.add_argument("--tau", type=float, default=None, help="fixed tau instead of the automatic rule")
    p.add_argument("--min-positive", type=float, default=0.02)
    p.add_argument("--sparse", type=float, default=0.1, help="density (fraction of the peak) a plateau must reach")
    p.add_argument("--fallback-positive", type=float, default=0.2, help="positive fraction when there is no plateau")
    p.add_argument("--out", required=True, type=Path, help="threshold.json")
    p.add_argument("--sweep", required=True, type=Path, help="sweep.parquet for the sensitivity study")
    p.add_argument("--figure", required=True, type=Path, help="histogram figure (.png and .pdf)")
    a = p.parse_args(argv)
    df = eligible(pl.read_parquet(a.kl), a.step_types)
    if df.is_empty():
        raise SystemExit(f"{a.kl}: no steps of type {a.step_types}")
    kl = df["kl"].to_numpy()
    chosen = choose(kl, min_positive=a.min_positive, sparse=a.sparse, fallback_positive=a.fallback_positive)
    if a.tau is not None:
        chosen.update(tau=a.tau, log10_tau=float(np.log10(a.tau)), positive_fraction=float((kl > a.tau).mean()),
                      rule={**chosen["rule"], "fixed": a.tau})
    rows = sweep(kl, chosen)
    quant = df["quant"][0] if "quant" in df.columns else ""
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({**chosen, "quant": quant, "step_types": a.step_types}, indent=1))
    pl.DataFrame(rows).write_parquet(a.sweep)
    figure(kl, chosen, rows, f"{quant}: step KL on bf16 rollouts ({len(kl)} steps)", a.figure)
    if not chosen["plateau_found"]:
        print(f"no sparse plateau (sparsest bin {chosen['plateau_density']:.2f} of the peak > {a.sparse}): "
              f"tau falls back to the top {a.fallback_positive:.0%} of steps")
    print(f"tau = {chosen['tau']:.3e} (plateau {chosen['plateau'][0]:.2e}..{chosen['plateau'][1]:.2e}); "
          f"{100 * chosen['positive_fraction']:.1f}% of {len(kl)} steps positive")
    print(pl.DataFrame(rows))


if __name__ == "__main__":
    main()
