"""Evaluation tables (paper Table 1): success, score, steps and episode time of successful episodes,
averaged over seeds, the realised high-precision fraction, and the speedup relative to Full (bf16).

Measured wall time (EP Time and its speedup) differs between any two runs of the same episodes, so
with `--wall-time` it goes to a table of its own and Table 1 keeps only what the episodes and the
latency coefficients determine: its time is Eq. 9's modelled time and its speedup the modelled one.
Two runs of the same agents and seeds then write byte-identical Table 1 files.

Methods are named `[QUANT/]NAME[@K]`: Full, Quant, DMR@K (the KL-ST router at budget K), GRPO@K
(the GRPO-refined router at budget K), and the matched baselines Random@K, Oracle@K and Uncertainty@K.
Outputs: parquet, Markdown, LaTeX and a Pareto figure (success vs episode time) with one panel
per scheme.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

from dmr import paired, plots
from dmr.latency import describe, episodes_cost
from dmr.policy_name import is_ladder, scheme_lows
from dmr.rundir import announced_steps, high_fraction


def seed_metrics(episodes: pl.DataFrame, cost: pl.Series | None = None) -> dict:
    """`cost`: the modelled time (Eq. 9) of each episode, when latency coefficients are given."""
    won = episodes.filter(pl.col("won"))
    out = {"success": 100.0 * episodes["won"].mean(), "score": episodes["score"].mean(),
           "steps": episodes["steps"].mean(), "ep_time": won["time"].mean() if len(won) else None,
           "high_frac": high_fraction(episodes),
           "episodes": len(episodes)}
    if cost is not None:
        out["cost"] = cost.filter(episodes["won"]).mean() if len(won) else None
    return out


def precision_shares(steps: pl.DataFrame, precisions: list[str]) -> str:
    """Each precision's share of a run's steps, in the ladder's order (bf16 first, then by falling
    cost), e.g. 'bf16 20% · gptq_w4a16 30% · rtn_w2a16 50%'."""
    n = max(1, steps.height)
    return " · ".join(f"{q} {100 * (steps['precision'] == q).sum() / n:.0f}%" for q in precisions)


def run_steps(episodes_parquet: Path) -> pl.DataFrame:
    """The steps table beside a run's episodes.parquet, for Eq. 9's router calls. A random run
    recorded before random routing recorded its score has none on its routed steps: its router calls
    cannot be counted, so it is refused by name."""
    d = Path(episodes_parquet).parent
    steps = pl.read_parquet(d / "steps.parquet")
    spec = json.loads((d / "spec.json").read_text()) if (d / "spec.json").exists() else {}
    if str(spec.get("policy", "")).startswith("random") and steps.height:
        types = (spec.get("routing") or {}).get("router_steps")
        routed = steps if not types else announced_steps(steps, types)
        if routed.height and routed["route_score"].null_count() == routed.height:
            raise ValueError(f"{d}: a random run whose routed steps have no route_score (recorded before random "
                             "routing recorded its probability); its router calls (Eq. 9) cannot be counted: rerun it")
    return steps


def summarize(runs: dict[str, list[Path]], cell: str, coef: dict | None = None) -> pl.DataFrame:
    """One row per method: mean and std over its seed runs. With latency coefficients (dmr.latency)
    also `cost`, the modelled EP time of successful episodes (Eq. 9; its router calls counted from
    each run's steps.parquet beside the episodes, dmr.latency.router_calls)."""
    rows, episodes = [], {}
    for method, paths in runs.items():
        quant, _, name = method.rpartition("/")
        name, _, k = name.partition("@")
        eps = episodes[method] = [pl.read_parquet(p) for p in paths]
        # The steps, where Eq. 9 or a ladder scheme's precision shares need them.
        steps = [run_steps(p) if coef or is_ladder(quant) else None for p in paths]
        if name == "Forced" and coef:  # a fixed rule (random:0 under the router steps): no router call to charge
            steps = [st.with_columns(route_score=pl.lit(None, pl.Float64)) for st in steps]
        per_seed = pl.DataFrame([seed_metrics(e, episodes_cost(e, st, coef, quant or "bf16") if coef else None)
                                 for e, st in zip(eps, steps)])
        row = {"cell": cell, "quant": quant or "bf16", "method": name, "budget": float(k) if k else None,
               "seeds": len(paths)}
        for col in ("success", "score", "steps", "ep_time", "high_frac") + (("cost",) if coef else ()):
            row[col] = per_seed[col].mean()
            row[f"{col}_std"] = per_seed[col].std() if len(paths) > 1 else 0.0
        row["episodes"] = int(per_seed["episodes"].sum())
        if is_ladder(quant):  # a ladder scheme's rows: each precision's share of the steps, over all seeds
            row["shares"] = precision_shares(pl.concat([st.select("precision") for st in steps]),
                                             ["bf16", *scheme_lows(quant)])
        rows.append(row)
    df = pl.DataFrame(rows).with_columns(pl.col("budget").cast(pl.Float64))
    full = df.filter(pl.col("method") == "Full")["ep_time"]
    base = full[0] if len(full) else None
    df = df.with_columns(speedup=(pl.lit(base) / pl.col("ep_time")) if base else pl.lit(None, pl.Float64))
    if coef:  # the speedup of Eq. 9's modelled time, which no wall clock moves
        full_cost = df.filter(pl.col("method") == "Full")["cost"]
        base = full_cost[0] if len(full_cost) else None
        df = df.with_columns(cost_speedup=(pl.lit(base) / pl.col("cost")) if base else pl.lit(None, pl.Float64))
    # Paired columns (dmr.paired): each routed method against matched random, Full and Quant.
    return df.join(paired.compare(episodes), on=["quant", "method", "budget"], how="left", nulls_equal=True)


WALL_TIME = ("ep_time", "ep_time_std", "speedup")


def split_wall_time(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(Table 1 without the measured wall-time columns, those columns with the rows' keys)."""
    keys = ["cell", "quant", "method", "budget", "seeds", "episodes"]
    return df.drop(*WALL_TIME), df.select(*keys, *WALL_TIME)


def wall_time_markdown(df: pl.DataFrame, title: str) -> str:
    lines = [f"# {title}: measured wall time", "", "| Quant | Method | K | EP Time (s) | Speedup | episodes |",
             "|---|---|---|---|---|---|"]
    for r in df.iter_rows(named=True):
        t = "–" if r["ep_time"] is None else f"{r['ep_time']:.2f}" + (
            "" if r["ep_time_std"] is None else f" ± {r['ep_time_std']:.2f}")
        sp = "–" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        k = "–" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"| {r['quant']} | {r['method']} | {k} | {t} | {sp} | {r['episodes']} |")
    lines += ["", "EP Time: mean wall time of successful episodes over the seeds that won any (no ± where only "
              "one did); Speedup: Full's EP Time over the method's. Wall time is this machine's at that hour: two "
              "runs of the same episodes measure different times, so it is kept out of Table 1 (tables/main.*), "
              "whose time is the modelled one of Eq. 9."]
    return "\n".join(lines) + "\n"


def markdown(df: pl.DataFrame, title: str, latency: str | None = None) -> str:
    def fmt(v, std, digits=1):
        # EP time has no std where a single seed won anything (the others have no successful episode).
        if v is None:
            return "–"
        return f"{v:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")

    # A graded benchmark (WebShop) gets a Score column; where score is just success it adds nothing.
    modelled = "cost" in df.columns
    measured = "ep_time" in df.columns  # else in the wall-time table of its own (split_wall_time)
    ladders = "shares" in df.columns  # a scheme of several low precisions (A+B) is in the table
    graded = any(r["score"] is not None and abs(100 * r["score"] - r["success"]) > 1e-9 for r in df.iter_rows(named=True))
    def ci(r, col, digits=1, scale=1.0, unit=""):
        if r.get(col) is None:
            return "–"
        v, lo, hi = (scale * r[c] for c in (col, f"{col}_lo", f"{col}_hi"))
        return f"{v:+.{digits}f}{unit} [{lo:+.{digits}f}, {hi:+.{digits}f}]"

    lines = [f"# {title}", "",
             "| Quant | Method | K | Success (%) |" + (" Score |" if graded else "")
             + " Steps |" + (" EP Time (s) | Speedup |" if measured else "")
             + (" Modelled time (s) |" if modelled else "") + (" Modelled speedup |" if modelled and not measured else "")
             + " high-precision steps |" + (" precision shares |" if ladders else "")
             + " episodes | Δ vs Random (95% CI) | Recovered gap (95% CI) |",
             "|---|---|---|---|" + ("---|" if graded else "") + ("---|---|" if measured else "")
             + ("---|" if modelled else "") + ("---|" if modelled and not measured else "") + ("---|" if ladders else "")
             + "---|---|---|---|---|"]
    for r in df.iter_rows(named=True):
        def speed(v):
            return "–" if v is None else f"{v:.2f}x"
        k = "–" if r["budget"] is None else f"{r['budget']:g}"
        score = f" {fmt(r['score'], r['score_std'], 3)} |" if graded else ""
        lines.append(f"| {r['quant']} | {r['method']} | {k} | {fmt(r['success'], r['success_std'])} |{score} "
                     f"{fmt(r['steps'], r['steps_std'])} | "
                     + (f"{fmt(r['ep_time'], r['ep_time_std'], 2)} | {speed(r['speedup'])} | " if measured else "")
                     + (f"{fmt(r['cost'], r['cost_std'], 2)} | " if modelled else "")
                     + (f"{speed(r['cost_speedup'])} | " if modelled and not measured else "")
                     + f"{100 * r['high_frac']:.0f}% | " + (f"{r['shares'] or '–'} | " if ladders else "")
                     + f"{r['episodes']} | "
                     + (f"{ci(r, 'vs_random')} {r['vs_random_verdict']} |" if r.get("vs_random") is not None else "– |")
                     + f" {ci(r, 'recovered', 0, 100, '%')} |")
    lines += ["", f"Mean ± std over {int(df['seeds'].max())} seeds. "
              + ("EP Time: mean wall time of successful episodes, over the seeds that won any (no ± where only one did)."
                 if measured else "Measured wall time (EP Time) is in the wall-time table beside this one."),
              "Δ vs Random: success points over the matched Random@K on the same (seed, task) pairs, with the "
              "paired-bootstrap 95% CI; a CI that holds 0 is a tie. Recovered gap: (method − Quant) / "
              "(Full − Quant) on the same tasks, with its bootstrap 95% CI (dmr.paired)."]
    if modelled:
        lines.append("Modelled time: Eq. 9 over the same successful episodes"
                     + ("" if measured else "; modelled speedup: Full's modelled time over the method's")
                     + f". {latency or ''}".rstrip())
    if "Forced" in df["method"].to_list():
        lines.append("Forced: the steps no router decides (App. C.1's forced steps) at bf16, every other step at "
                     "the scheme, with no router call: what the rule alone recovers.")
    if ladders:
        lines.append("A scheme A+B routes bf16, A and B with one router; its K is a share of bf16's modelled cost "
                     "(Eq. 9), as for DMR-A@K and DMR-B@K, the two-precision routers bf16-A and bf16-B calibrated "
                     "to the same cost budget. Precision shares: each precision's share of the steps.")
    return "\n".join(lines) + "\n"


def html(md: str) -> str:
    """The Markdown table as an HTML page (the Snakemake report shows HTML inline, Markdown only as a file)."""
    import html as h

    out, in_table = ["<html><body>"], False
    for line in md.splitlines():
        if line.startswith("|"):
            if line.startswith("|---"):
                continue
            tag = "td" if in_table else "th"
            if not in_table:
                out.append('<table border="1" cellpadding="3" style="border-collapse: collapse">')
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{h.escape(c.strip())}</{tag}>" for c in line.strip("|").split("|")) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("# "):
            out.append(f"<h3>{h.escape(line[2:])}</h3>")
        elif line.strip():
            out.append(f"<p>{h.escape(line)}</p>")
    return "\n".join(out + (["</table>"] if in_table else []) + ["</body></html>"]) + "\n"


def latex(df: pl.DataFrame, title: str) -> str:
    """Table 1 as a LaTeX tabular (booktabs); the best success among each scheme's routers in bold."""
    def esc(x):
        return str(x).replace("_", r"\_").replace("%", r"\%")

    best = {}
    for r in df.filter(pl.col("budget").is_not_null()).iter_rows(named=True):
        best[r["quant"]] = max(best.get(r["quant"], -1.0), r["success"])
    # Measured EP Time where the table has it, else Eq. 9's modelled time (split_wall_time).
    time, speedup, head = (("ep_time", "speedup", "EP Time (s)") if "ep_time" in df.columns
                           else ("cost", "cost_speedup", "Modelled time (s)"))
    speed_head = "Speedup" if time == "ep_time" else "Modelled speedup"
    out = [r"\begin{tabular}{llrrrrr}", r"\toprule",
           rf"Quant & Method & $K$ & Success (\%) & {head} & {speed_head} & High (\%) \\", r"\midrule"]
    prev = None
    for r in df.iter_rows(named=True):
        if prev is not None and r["quant"] != prev:
            out.append(r"\midrule")
        prev = r["quant"]
        succ = f"{r['success']:.1f} $\\pm$ {r['success_std']:.1f}"
        if r["budget"] is not None and r["success"] == best.get(r["quant"]):
            succ = rf"\textbf{{{succ}}}"
        t = "--" if r.get(time) is None else f"{r[time]:.2f}"
        sp = "--" if r.get(speedup) is None else f"{r[speedup]:.2f}$\\times$"
        k = "--" if r["budget"] is None else f"{r['budget']:g}"
        out.append(f"{esc(r['quant'])} & {esc(r['method'])} & {k} & {succ} & {t} & {sp} & {100 * r['high_frac']:.0f} \\\\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return f"% {esc(title)}: mean $\\pm$ std over {int(df['seeds'].max())} seeds\n" + "\n".join(out) + "\n"


def pareto(df: pl.DataFrame, title: str, path: Path) -> None:
    """Success vs episode time per scheme: Full, Quant, the DMR budget sweep, matched baselines."""
    plt = plots.pyplot()

    quants = [q for q in dict.fromkeys(df["quant"].to_list()) if q != "bf16"] or ["bf16"]
    fig, axes = plt.subplots(1, len(quants), figsize=(3.6 * len(quants), 3.2), squeeze=False)
    full = df.filter(pl.col("method") == "Full")
    style = {"Full": ("s", "#1f77b4"), "Quant": ("s", "#ff7f0e"), "DMR": ("o", "#2ca02c"),
             "Random": ("x", "0.4"), "Oracle": ("^", "#9467bd"), "GRPO": ("^", "#d62728"),
             "Uncertainty": ("D", "#8c564b")}
    for ax, q in zip(axes[0], quants):
        sub = pl.concat([full, df.filter((pl.col("quant") == q) & (pl.col("method") != "Full"))], how="diagonal_relaxed")
        # A ladder scheme's routers meet at equal modelled cost: its panel's axis is Eq. 9's time, as
        # is every panel's where the measured wall time is in a table of its own.
        x = "cost" if "cost" in df.columns and (is_ladder(q) or "ep_time" not in df.columns) else "ep_time"
        for r in sub.iter_rows(named=True):
            if r[x] is None:
                continue
            m, c = style.get(r["method"], ("o", "k"))
            ax.errorbar(r[x], r["success"], yerr=r["success_std"], fmt=m, color=c, ms=6, capsize=2)
            label = r["method"] + ("" if r["budget"] is None else f" {r['budget']:g}")
            ax.annotate(label, (r[x], r["success"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        sweeps = [m for m in dict.fromkeys(sub["method"].to_list()) if m in ("DMR", "GRPO") or m.startswith("DMR-")]
        for method in sweeps:
            sweep = sub.filter((pl.col("method") == method) & pl.col(x).is_not_null()).sort("budget")
            if len(sweep):
                ax.plot(sweep[x], sweep["success"], color=style.get(method, ("o", "k"))[1], lw=1, alpha=0.6)
        ax.set_title(q, fontsize=9)
        ax.set_xlabel("modelled time of successful episodes (s, Eq. 9)" if x == "cost"
                      else "EP time of successful episodes (s)")
        ax.set_ylabel("success (%)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plots.save(fig, path)


def env_versions(runs: dict[str, list[Path]]) -> dict:
    """The game package versions the runs were played with (`env_versions` of the run.json beside
    each episodes.parquet). One table never mixes versions: ALFWorld 0.3 and 0.4 differ in grammar."""
    seen: dict[str, list[str]] = {}
    for paths in runs.values():
        for path in paths:
            meta = Path(path).parent / "run.json"
            versions = json.loads(meta.read_text()).get("env_versions") if meta.exists() else None
            if versions:
                seen.setdefault(json.dumps(versions, sort_keys=True), []).append(str(path))
    if len(seen) > 1:
        raise SystemExit("runs of different game versions in one table: "
                         + "; ".join(f"{v} ({paths[0]} ...)" for v, paths in seen.items()))
    return json.loads(next(iter(seen))) if seen else {}


def env_splits(runs: dict[str, list[Path]]) -> dict[str, str]:
    """The benchmark split each protocol split of the runs resolved to (`env_splits` and `split` of
    the run.json beside each episodes.parquet; ALFWorld's test split is valid_unseen where the data
    has it, else part of valid_seen). One table never mixes two resolutions of one split."""
    seen: dict[str, dict[str, str]] = {}
    for paths in runs.values():
        for path in paths:
            meta = Path(path).parent / "run.json"
            run = json.loads(meta.read_text()) if meta.exists() else {}
            split, resolved = run.get("split"), run.get("env_splits") or {}
            if split in resolved:
                seen.setdefault(split, {}).setdefault(resolved[split], str(path))
    mixed = {k: v for k, v in seen.items() if len(v) > 1}
    if mixed:
        raise SystemExit("runs of different benchmark splits in one table: "
                         + "; ".join(f"{k}: " + ", ".join(f"{s} ({p})" for s, p in v.items()) for k, v in mixed.items()))
    return {k: next(iter(v)) for k, v in seen.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cell", required=True, help="cell name for the table, e.g. household/tiny")
    p.add_argument("--method", action="append", nargs="+", required=True, metavar=("NAME", "EPISODES"),
                   help="[QUANT/]NAME followed by its episodes.parquet files, one per seed (repeatable); "
                        "the method named Full is the speedup reference")
    p.add_argument("--out", required=True, type=Path, help="output parquet")
    p.add_argument("--markdown", required=True, type=Path, help="output Markdown table")
    p.add_argument("--latex", type=Path, default=None, help="output LaTeX table")
    p.add_argument("--pareto", type=Path, default=None, help="output Pareto figure (.png and .pdf)")
    p.add_argument("--html", type=Path, default=None, help="output HTML table (for the Snakemake report)")
    p.add_argument("--wall-time", type=Path, default=None,
                   help="output parquet (and .md beside it) of the measured wall time (EP Time, speedup); "
                        "Table 1 then keeps only the modelled time, so two runs of the same episodes write it "
                        "byte for byte (needs --latency)")
    p.add_argument("--latency", type=Path, default=None,
                   help="coefficients.json (dmr.latency): adds the modelled time of Eq. 9 and names the coefficients")
    a = p.parse_args(argv)
    runs = {}
    for name, *paths in a.method:
        if not paths:
            raise SystemExit(f"--method {name}: give at least one episodes.parquet")
        runs[name] = [Path(x) for x in paths]
    if a.wall_time and not a.latency:
        raise SystemExit("--wall-time takes the measured time out of Table 1: give --latency for the modelled one")
    coef = json.loads(a.latency.read_text()) if a.latency else None
    df = summarize(runs, a.cell, coef)
    versions, splits = env_versions(runs), env_splits(runs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.wall_time:
        a.wall_time.parent.mkdir(parents=True, exist_ok=True)
        df, wall = split_wall_time(df)
        wall.write_parquet(a.wall_time)
        a.wall_time.with_suffix(".md").write_text(wall_time_markdown(wall, a.cell))
    df.write_parquet(a.out)
    text = markdown(df, a.cell, describe(coef) if coef else None)
    if versions:
        text += "Game versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".\n"
    if splits:
        text += "Benchmark splits: " + ", ".join(f"{k} = {v}" for k, v in splits.items()) + ".\n"
    a.markdown.write_text(text)
    if a.latex:
        a.latex.write_text(latex(df, a.cell))
    if a.html:
        a.html.write_text(html(a.markdown.read_text()))
    if a.pareto:
        pareto(df, a.cell, a.pareto)
    print(a.markdown.read_text())


if __name__ == "__main__":
    main()
