"""Step KL by step type (paper App. C.1: Table 4 and Fig. 6).

On WebShop the KL pool's click and search steps have sharply different KL distributions, which is
why KL-ST routers are trained on click steps only and search steps are forced to bf16. This stage
shows the split for a cell: per step type the number of steps, the mean and median KL, the share
below 0.01 and the share above tau (the cell's threshold), plus one row over all steps; and the
log-KL histograms of the step types overlaid, with tau marked.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from dmr import plots
from dmr.threshold import log_kl

LOW = 0.01  # Table 4's "% steps with KL < 0.01"


def table(df: pl.DataFrame, tau: float) -> pl.DataFrame:
    """One row per step type (sorted), then `all`."""
    def row(name, kl):
        return {"step_type": name, "steps": len(kl), "mean_kl": float(kl.mean()), "median_kl": float(np.median(kl)),
                "pct_below_0.01": 100.0 * float((kl < LOW).mean()), "pct_above_tau": 100.0 * float((kl > tau).mean())}

    rows = [row(t, df.filter(pl.col("step_type") == t)["kl"].to_numpy()) for t in sorted(df["step_type"].unique())]
    rows.append(row("all", df["kl"].to_numpy()))
    return pl.DataFrame(rows).with_columns(tau=pl.lit(tau))


def markdown(t: pl.DataFrame, title: str, router_steps: list[str]) -> str:
    tau = t["tau"][0]
    lines = [f"# {title}", "", f"Step KL by step type (paper Table 4); tau = {tau:.3g}; the router decides "
             f"{', '.join(router_steps)} steps, the others run at bf16.", "",
             "| step type | steps | mean KL | median KL | % KL < 0.01 | % KL > tau |", "|---|---|---|---|---|---|"]
    for r in t.iter_rows(named=True):
        lines.append(f"| {r['step_type']} | {r['steps']} | {r['mean_kl']:.3g} | {r['median_kl']:.3g} | "
                     f"{r['pct_below_0.01']:.1f} | {r['pct_above_tau']:.1f} |")
    return "\n".join(lines) + "\n"


def figure(df: pl.DataFrame, tau: float, title: str, path: Path) -> None:
    """Fig. 6: log10 KL histograms of the step types on shared bins, tau as a vertical line."""
    plt = plots.pyplot()
    x_all = log_kl(df["kl"].to_numpy())
    edges = np.linspace(x_all.min(), max(x_all.max(), x_all.min() + 1e-6), 41)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in sorted(df["step_type"].unique()):
        x = log_kl(df.filter(pl.col("step_type") == t)["kl"].to_numpy())
        ax.hist(x, bins=edges, alpha=0.55, label=f"{t} ({len(x)})", density=True)
    ax.axvline(np.log10(tau), color="k", ls="--", lw=1, label=f"tau = {tau:.3g}")
    ax.set_xlabel("log10 step KL (bf16 || quant)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    plots.save(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kl", required=True, type=Path, help="KL pool steps.parquet (dmr.kl)")
    p.add_argument("--threshold", required=True, type=Path, help="threshold.json (dmr.threshold)")
    p.add_argument("--title", default="", help="figure and table title, e.g. the cell and scheme")
    p.add_argument("--out", required=True, type=Path, help="output table parquet")
    p.add_argument("--markdown", required=True, type=Path)
    p.add_argument("--figure", required=True, type=Path, help="figure path (.png; a .pdf is written beside it)")
    a = p.parse_args(argv)
    df = pl.read_parquet(a.kl)
    if df.height == 0:
        raise SystemExit(f"{a.kl}: no KL rows")
    thr = json.loads(a.threshold.read_text())
    t = table(df, float(thr["tau"]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    t.write_parquet(a.out)
    a.markdown.write_text(markdown(t, a.title or str(a.kl), thr.get("step_types", [])))
    figure(df, float(thr["tau"]), a.title, a.figure)
    print(t)


if __name__ == "__main__":
    main()
