"""Average-rank analysis of the RL refinement (paper Sec. 5.3, Fig. 4, 8-10).

Per benchmark-model-quantization cell the ranking pool has eight operating points: the three KL-ST
budget points (DMR@K), the three GRPO budget points (GRPO@K), Full (bf16) and Quant. Every point is
ranked by success (descending) and by episode time (ascending), ties sharing the mean rank; its
average rank is the mean of the two, lower is better. Full and Quant only anchor the ranking: the
best-ranked of the six router points is attributed to KL-ST or GRPO.

Time is the modelled episode time of Eq. 9 (`cost`, dmr.latency) when the table has it, else the
measured EP time; the output says which.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

from dmr import plots
from dmr.latency import describe

ROUTERS = {"DMR": "KL-ST", "GRPO": "GRPO"}


def pool(table: pl.DataFrame, quant: str) -> pl.DataFrame:
    """Full, Quant and the router points of one scheme."""
    return table.filter((pl.col("method") == "Full")
                        | ((pl.col("quant") == quant) & pl.col("method").is_in(["Quant", *ROUTERS])))


def average_ranks(points: pl.DataFrame, time: str) -> pl.DataFrame:
    """Success rank (high first) and time rank (low first), ties averaged; a point without a time
    (no successful episode) ranks last on time."""
    t = pl.col(time).fill_null(float("inf"))
    return points.with_columns(
        success_rank=(-pl.col("success")).rank("average"), time_rank=t.rank("average"),
    ).with_columns(avg_rank=(pl.col("success_rank") + pl.col("time_rank")) / 2)


def best_router(ranked: pl.DataFrame) -> dict:
    """The best-ranked router point (ties: higher success, then lower rank of time) and its method."""
    routers = ranked.filter(pl.col("method").is_in(list(ROUTERS))).sort(["avg_rank", "success_rank", "time_rank"])
    if routers.is_empty():
        raise ValueError("no router points (DMR@K or GRPO@K) in the ranking pool")
    best = routers.row(0, named=True)
    tied = routers.filter(pl.col("avg_rank") == best["avg_rank"])["method"].unique().to_list()
    return {**best, "winner": ROUTERS[best["method"]] if len(tied) == 1 else "tie"}


def analyse(table: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(every point with its ranks, one summary row per scheme)."""
    time = "cost" if "cost" in table.columns else "ep_time"
    ranked, summary = [], []
    for q in [q for q in dict.fromkeys(table["quant"].to_list()) if q != "bf16"]:
        points = pool(table, q)
        if points.filter(pl.col("method").is_in(list(ROUTERS))).is_empty():
            continue
        r = average_ranks(points, time).with_columns(scheme=pl.lit(q), time_axis=pl.lit(time))
        ranked.append(r)
        b = best_router(r)
        grpo = r.filter(pl.col("method") == "GRPO").sort("avg_rank")
        summary.append({"cell": b["cell"], "quant": q, "points": r.height, "time_axis": time,
                        "best_method": b["method"], "best_budget": b["budget"], "best_avg_rank": b["avg_rank"],
                        "best_success": b["success"], "best_time": b[time], "winner": b["winner"],
                        "best_grpo_budget": grpo["budget"][0] if len(grpo) else None,
                        "best_grpo_avg_rank": grpo["avg_rank"][0] if len(grpo) else None})
    if not ranked:
        raise ValueError("no scheme of the table has router points to rank")
    return pl.concat(ranked, how="diagonal_relaxed"), pl.DataFrame(summary)


def markdown(ranked: pl.DataFrame, summary: pl.DataFrame, cell: str, latency: str | None) -> str:
    time = summary["time_axis"][0]
    axis = "modelled episode time (Eq. 9)" if time == "cost" else "measured EP time"
    lines = [f"# Average rank (Sec. 5.3): {cell}", "",
             f"Ranked by success (descending) and {axis} (ascending) of successful episodes.", "",
             "| Quant | best router point | K | avg rank | success (%) | time (s) | attributed to | best GRPO K (rank) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary.iter_rows(named=True):
        g = "–" if r["best_grpo_budget"] is None else f"{r['best_grpo_budget']:g} ({r['best_grpo_avg_rank']:.1f})"
        t = "–" if r["best_time"] is None else f"{r['best_time']:.2f}"
        lines.append(f"| {r['quant']} | {r['best_method']} | {r['best_budget']:g} | {r['best_avg_rank']:.1f} | "
                     f"{r['best_success']:.1f} | {t} | {r['winner']} | {g} |")
    wins = summary["winner"].value_counts().sort("winner")
    lines += ["", "Wins: " + ", ".join(f"{w} {n}" for w, n in wins.iter_rows()) + f" of {summary.height} cells.", "",
              "| Quant | Method | K | success rank | time rank | avg rank |", "|---|---|---|---|---|---|"]
    for r in ranked.sort("scheme", "avg_rank").iter_rows(named=True):
        k = "–" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"| {r['scheme']} | {r['method']} | {k} | {r['success_rank']:.1f} | {r['time_rank']:.1f} | "
                     f"{r['avg_rank']:.2f} |")
    if latency and time == "cost":
        lines += ["", latency]
    return "\n".join(lines) + "\n"


def figure(ranked: pl.DataFrame, summary: pl.DataFrame, title: str, path: Path) -> None:
    """Fig. 4's convention: bf16 (blue square), Quant (orange square), KL-ST sweep (green circles),
    GRPO sweep (red), and the best-ranked GRPO point as a filled red triangle."""
    plt = plots.pyplot()
    time = summary["time_axis"][0]
    schemes = summary["quant"].to_list()
    fig, axes = plt.subplots(1, len(schemes), figsize=(3.8 * len(schemes), 3.3), squeeze=False)
    style = {"Full": ("s", "#1f77b4"), "Quant": ("s", "#ff7f0e"), "DMR": ("o", "#2ca02c"), "GRPO": ("v", "#d62728")}
    for ax, q, s in zip(axes[0], schemes, summary.iter_rows(named=True)):
        r = ranked.filter((pl.col("scheme") == q) & pl.col(time).is_not_null())
        for method, (m, c) in style.items():
            pts = r.filter(pl.col("method") == method).sort("budget")
            if pts.is_empty():
                continue
            ax.plot(pts[time], pts["success"], marker=m, color=c, ls="-" if len(pts) > 1 else "none", lw=1,
                    mfc="none" if method == "GRPO" else c, label={"DMR": "KL-ST", "Full": "bf16"}.get(method, method))
        best = r.filter((pl.col("method") == "GRPO") & (pl.col("budget") == s["best_grpo_budget"])) \
            if s["best_grpo_budget"] is not None else r.clear()
        if len(best):
            ax.plot(best[time], best["success"], marker="^", ms=11, color="#d62728", ls="none", label="best GRPO")
        ax.set_title(f"{q}: best router {s['winner']}", fontsize=9)
        ax.set_xlabel("modelled episode time (s)" if time == "cost" else "EP time (s)")
        ax.set_ylabel("success (%)")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plots.save(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, type=Path, help="main.parquet written by dmr.evaluate")
    p.add_argument("--latency", type=Path, default=None, help="coefficients.json the table's modelled time used")
    p.add_argument("--out", required=True, type=Path, help="ranks parquet (every point)")
    p.add_argument("--markdown", required=True, type=Path)
    p.add_argument("--figure", required=True, type=Path, help="Pareto figure with the best GRPO point (.png, .pdf)")
    a = p.parse_args(argv)
    table = pl.read_parquet(a.table)
    ranked, summary = analyse(table)
    cell = table["cell"][0]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    ranked.write_parquet(a.out)
    summary.write_parquet(a.out.with_name(a.out.stem + "_summary.parquet"))
    latency = describe(json.loads(a.latency.read_text())) if a.latency else None
    a.markdown.write_text(markdown(ranked, summary, cell, latency))
    figure(ranked, summary, cell, a.figure)
    print(a.markdown.read_text())


if __name__ == "__main__":
    main()
