"""Evaluation tables (paper Table 1 style): success, mean steps and episode time of successful
episodes, averaged over seeds, with the speedup relative to the Full (bf16) baseline.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl


def seed_metrics(episodes: pl.DataFrame) -> dict:
    won = episodes.filter(pl.col("won"))
    return {"success": 100.0 * episodes["won"].mean(), "score": episodes["score"].mean(),
            "steps": episodes["steps"].mean(), "ep_time": won["time"].mean() if len(won) else None,
            "high_frac": episodes["high_calls"].sum() / max(1, episodes["calls"].sum()),
            "episodes": len(episodes)}


def summarize(runs: dict[str, list[Path]], cell: str) -> pl.DataFrame:
    """One row per method: mean and std over its seed runs."""
    rows = []
    for method, paths in runs.items():
        per_seed = pl.DataFrame([seed_metrics(pl.read_parquet(p)) for p in paths])
        quant, _, name = method.rpartition("/")
        row = {"cell": cell, "quant": quant or "bf16", "method": name, "seeds": len(paths)}
        for col in ("success", "score", "steps", "ep_time", "high_frac"):
            row[col] = per_seed[col].mean()
            row[f"{col}_std"] = per_seed[col].std() if len(paths) > 1 else 0.0
        row["episodes"] = int(per_seed["episodes"].sum())
        rows.append(row)
    df = pl.DataFrame(rows)
    full = df.filter(pl.col("method") == "Full")["ep_time"]
    base = full[0] if len(full) else None
    return df.with_columns(speedup=(pl.lit(base) / pl.col("ep_time")) if base else pl.lit(None, pl.Float64))


def markdown(df: pl.DataFrame, title: str) -> str:
    def fmt(v, std, digits=1):
        return "–" if v is None else f"{v:.{digits}f} ± {std:.{digits}f}"

    lines = [f"# {title}", "",
             "| Quant | Method | Success (%) | Steps | EP Time (s) | Speedup | high-precision steps | episodes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in df.iter_rows(named=True):
        speed = "–" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['quant']} | {r['method']} | {fmt(r['success'], r['success_std'])} | {fmt(r['steps'], r['steps_std'])} | "
                     f"{fmt(r['ep_time'], r['ep_time_std'], 2)} | {speed} | {100 * r['high_frac']:.0f}% | {r['episodes']} |")
    lines += ["", f"Mean ± std over {int(df['seeds'].max())} seeds. EP Time: mean wall time of successful episodes."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cell", required=True, help="cell name for the table, e.g. household/tiny")
    p.add_argument("--method", action="append", nargs="+", required=True, metavar=("NAME", "EPISODES"),
                   help="[QUANT/]NAME followed by its episodes.parquet files, one per seed (repeatable); "
                        "the method named Full is the speedup reference")
    p.add_argument("--out", required=True, type=Path, help="output parquet")
    p.add_argument("--markdown", required=True, type=Path, help="output Markdown table")
    a = p.parse_args(argv)
    runs = {}
    for name, *paths in a.method:
        if not paths:
            raise SystemExit(f"--method {name}: give at least one episodes.parquet")
        runs[name] = [Path(x) for x in paths]
    df = summarize(runs, a.cell)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.out)
    a.markdown.write_text(markdown(df, a.cell))
    print(a.markdown.read_text())


if __name__ == "__main__":
    main()
