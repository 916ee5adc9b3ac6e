"""The results summary of a workflow run (`results/summary.md`): what the README quotes.

Per cell: the claim at each budget (DMR against matched Random on the same tasks, with the paired
95% CI, and the share of the Full - Quant gap that DMR and the KL oracle recover), whether the
threshold rule found its plateau, Table 1 as generated, and links to the figures. Then where the
time went: every job's wall time and peak memory from Snakemake's `benchmark:` files, summed per
rule. Every number here is read from a file the workflow wrote.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import polars as pl

from dmr.policy_name import LADDER


def _ci(v, lo, hi, scale=1.0, digits=1, unit=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{scale * v:+.{digits}f}{unit} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


ROUTED = ("DMR", "GRPO", "Oracle", "Uncertainty")


def claim(table: pl.DataFrame) -> list[str]:
    """Per routed scheme and budget: each routed method against the matched Random@K on the same
    tasks (paired difference, its 95% CI, the verdict) and the share of the Full - Quant gap it
    recovers, beside Full, Quant and Random."""
    routed = table.filter(pl.col("method").is_in(ROUTED) & ~pl.col("quant").str.contains(LADDER, literal=True))
    if not len(routed):
        return ["No routed scheme in this cell."]

    def f(v, digits=1):
        return "–" if v is None else f"{v:.{digits}f}"

    def one(q, method, k=None, col="success"):
        rows = table.filter((pl.col("quant") == q) & (pl.col("method") == method)
                            & (pl.col("budget").is_null() if k is None else pl.col("budget") == k))
        return rows[col][0] if len(rows) else None

    full = table.filter(pl.col("method") == "Full")["success"][0]
    # Where some steps are forced to bf16 (App. C.1), routing is also paired with the rule alone (Forced).
    forced = "vs_forced" in routed.columns and routed["vs_forced"].null_count() < len(routed)
    lines = ["| scheme | K | method | success | Random@K | Δ vs Random (95% CI) | verdict | recovered gap (95% CI) "
             "| bf16 steps |" + (" Δ vs Forced (95% CI) |" if forced else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if forced else "")]
    order = {m: i for i, m in enumerate(ROUTED)}
    by_method = pl.col("method").replace_strict(order, return_dtype=pl.Int32)
    for r in routed.sort(["quant", "budget", by_method]).iter_rows(named=True):
        q, k = r["quant"], r["budget"]
        lines.append(f"| {q} | {k:g} | {r['method']} | {f(r['success'])} | {f(one(q, 'Random', k))} | "
                     f"{_ci(r.get('vs_random'), r.get('vs_random_lo'), r.get('vs_random_hi'))} | "
                     f"{r.get('vs_random_verdict') or '–'} | "
                     f"{_ci(r.get('recovered'), r.get('recovered_lo'), r.get('recovered_hi'), 100, 0, '%')} | "
                     f"{100 * r['high_frac']:.0f}% |"
                     + (f" {_ci(r.get('vs_forced'), r.get('vs_forced_lo'), r.get('vs_forced_hi'))} "
                        f"{r.get('vs_forced_verdict') or ''} |" if forced else ""))
    quants = list(dict.fromkeys(routed["quant"].to_list()))
    lines += ["", "Full " + f(full) + "%; Quant " + ", ".join(f"{q} {f(one(q, 'Quant'))}%" for q in quants) + "."]
    for q in quants if forced else []:
        row = table.filter((pl.col("quant") == q) & (pl.col("method") == "Forced"))
        if len(row):
            r = row.row(0, named=True)
            lines += ["", f"Forced ({q}): {f(r['success'])}%, recovering "
                      f"{_ci(r.get('recovered'), r.get('recovered_lo'), r.get('recovered_hi'), 100, 0, '%')} of the gap "
                      "with no step routed: the steps no router decides (App. C.1) at bf16, every other step at "
                      f"{q}. Δ vs Forced: what routing adds on top of that rule, on the same tasks (a router "
                      "that also decides the forced steps, as GRPO may, trades them against the rest)."]
    return lines


def three_precisions(table: pl.DataFrame) -> list[str]:
    """Per ladder scheme (A+B: one router over bf16, A and B) and cost budget K: the three-way router,
    its GRPO refinement, the two binary routers bf16-A and bf16-B at the same cost budget, and random
    routing matched to the three-way run's shares, each with its success, paired Δ vs that random,
    the three-way routers' paired Δ vs the better binary router, modelled time and share of steps at
    each precision."""
    rows = table.filter(pl.col("quant").str.contains(LADDER, literal=True))
    if not len(rows):
        return []
    cost = "cost" in rows.columns
    lines = ["| scheme | K | method | success | Δ vs Random (95% CI) | Δ vs better binary (95% CI) | "
             + ("modelled time (s) | " if cost else "") + "precision shares |",
             "|---|---|---|---|---|---|" + ("---|" if cost else "") + "---|"]
    for r in rows.sort(["quant", "budget", "method"]).iter_rows(named=True):
        t = f"{r['cost']:.2f} | " if cost and r["cost"] is not None else ("– | " if cost else "")
        vs_random = _ci(r.get("vs_random"), r.get("vs_random_lo"), r.get("vs_random_hi"))
        vs_binary = "–" if r.get("vs_binary") is None else (
            f"{_ci(r['vs_binary'], r['vs_binary_lo'], r['vs_binary_hi'])} {r['vs_binary_verdict']} "
            f"({r['vs_binary_ref']})")
        lines.append(f"| {r['quant']} | {r['budget']:g} | {r['method']} | {r['success']:.1f} | "
                     f"{vs_random} {r.get('vs_random_verdict') or ''} | {vs_binary} | {t}{r['shares']} |")
    return lines + ["", "K is a share of bf16's modelled cost (Eq. 9) for every row: DMR and GRPO route among all "
                    "three precisions, DMR-A and DMR-B are the two-precision routers calibrated to the same cost "
                    "budget, Random matches the three-way run's share of each precision on the same tasks. "
                    "Δ vs better binary: the three-way router against the binary router with the higher success "
                    "at that K (named), paired on the same tasks."]


def compact_diagnose(text: str) -> list[str]:
    """The diagnose table with its recall@K and Spearman columns only (the rest stays in the file),
    then its notes and online part as written."""
    out, keep = [], None
    for ln in text.splitlines():
        if ln.startswith("# "):
            continue
        if ln.startswith("| ranker"):
            header = [c.strip() for c in ln.strip("|").split("|")]
            keep = [i for i, c in enumerate(header) if i == 0 or c.startswith("recall@") or c == "spearman"]
        elif keep is not None and not ln.startswith("|"):
            keep = None  # the offline table ended
        if keep is not None:
            cells = [c.strip() for c in ln.strip("|").split("|")]
            ln = "| " + " | ".join(cells[i] for i in keep) + " |"
        out.append(ln)
    return out


def thresholds(cell: Path) -> list[str]:
    out = []
    for path in sorted(cell.glob("*/kl/threshold.json")):
        t = json.loads(path.read_text())
        out.append(f"- {path.parent.parent.name}: τ = {t['tau']:.3g}, plateau found: "
                   f"**{str(t['plateau_found']).lower()}**, positive fraction {t.get('positive_fraction', float('nan')):.3f}")
    return out


def timing(root: Path) -> pl.DataFrame:
    """Every benchmark file under root (results/**/benchmarks/RULE/JOB.tsv), summed per rule."""
    rows = []
    for path in root.glob("**/benchmarks/*/*.tsv"):
        df = pl.read_csv(path, separator="\t", null_values=["-", "NA"])
        for r in df.iter_rows(named=True):
            rows.append({"rule": path.parent.name, "job": path.stem, "s": float(r["s"]),
                         "max_rss_mb": float(r["max_rss"]) if r.get("max_rss") is not None else None})
    if not rows:
        return pl.DataFrame(schema={"rule": pl.Utf8, "jobs": pl.UInt32, "minutes": pl.Float64,
                                    "longest_job_min": pl.Float64, "peak_rss_mb": pl.Float64})
    return (pl.DataFrame(rows).group_by("rule")
            .agg(jobs=pl.len(), minutes=pl.col("s").sum() / 60, longest_job_min=pl.col("s").max() / 60,
                 peak_rss_mb=pl.col("max_rss_mb").max())
            .sort("minutes", descending=True))


def critical_path(metadata: Path, targets: list[str] | None = None) -> list[dict]:
    """The chain of jobs whose summed wall time is longest along the DAG's dependencies, from
    Snakemake's provenance records (.snakemake/metadata: each output's rule, inputs, start and end).
    However many cores, a run takes at least this long. With `targets`, the longest chain that ends
    in a job producing one of them (records of other runs in the same directory, e.g. `make
    agents`, then count only where the targets depend on them)."""
    import base64

    jobs: dict[int, dict] = {}
    for f in metadata.glob("*") if metadata.exists() else []:
        try:
            rec = json.loads(f.read_text())
            out = base64.urlsafe_b64decode(f.name + "=" * (-len(f.name) % 4)).decode()
        except (ValueError, UnicodeDecodeError, OSError):
            continue
        if rec.get("incomplete") or rec.get("starttime") is None or rec.get("endtime") is None:
            continue
        job = jobs.setdefault(rec["job_hash"], {"rule": rec["rule"], "outputs": [], "inputs": set(rec.get("input", [])),
                                                "s": rec["endtime"] - rec["starttime"], "end": rec["endtime"]})
        job["outputs"].append(out)
    producer = {o: h for h, j in jobs.items() for o in j["outputs"]}
    best: dict[int, tuple[float, int | None]] = {}

    def longest(h: int) -> float:
        if h not in best:
            deps = [producer[i] for i in jobs[h]["inputs"] if i in producer and producer[i] != h]
            prev = max(deps, key=longest, default=None)
            best[h] = (jobs[h]["s"] + (longest(prev) if prev is not None else 0.0), prev)
        return best[h][0]

    ends = [producer[t] for t in targets if t in producer] if targets else list(jobs)
    if not ends:
        return []
    end = max(ends, key=longest)
    chain, h = [], end
    while h is not None:
        chain.append({"rule": jobs[h]["rule"], "output": sorted(jobs[h]["outputs"])[0], "minutes": jobs[h]["s"] / 60})
        h = best[h][1]
    return chain[::-1]


def critical_markdown(chain: list[dict]) -> list[str]:
    if not chain:
        return []
    total = sum(c["minutes"] for c in chain)
    return ["", f"Critical path ({total:.1f} minutes: no number of cores makes the run shorter):", "",
            "| rule | output | minutes |", "|---|---|---|"] + [
            f"| {c['rule']} | `{c['output']}` | {c['minutes']:.1f} |" for c in chain]


def timing_markdown(df: pl.DataFrame) -> list[str]:
    if not len(df):
        return ["No benchmark files yet."]
    lines = ["| rule | jobs | job minutes (sum) | longest job (min) | peak RSS (MB) |", "|---|---|---|---|---|"]
    small = df.filter(pl.col("minutes") < 0.1)
    for r in df.filter(pl.col("minutes") >= 0.1).iter_rows(named=True):
        rss = "–" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        lines.append(f"| {r['rule']} | {r['jobs']} | {r['minutes']:.1f} | {r['longest_job_min']:.1f} | {rss} |")
    if len(small):
        lines.append(f"| {len(small)} other rules | {int(small['jobs'].sum())} | {small['minutes'].sum():.1f} | – | – |")
    lines += ["", f"Sum over all jobs: {df['minutes'].sum():.1f} job-minutes. Jobs run side by side where "
              "cores allow, so wall time is lower."]
    return lines


def build(results: Path, cells: list[str], commit: str | None = None, metadata: Path | None = None) -> str:
    out = ["# Results summary", "",
           "Generated by `python -m dmr.summary` at the end of the workflow; every number is read from "
           "a file under `results/`." + (f" Commit `{commit}`." if commit else ""), ""]
    for cell in cells:
        d = results / cell
        out += [f"## {cell}", ""]
        main = d / "tables" / "main.parquet"
        if not main.exists():
            out += ["Table 1 not built.", ""]
            continue
        table = pl.read_parquet(main)
        out += ["### The claim: DMR against matched random routing", ""] + claim(table)
        out += ["", "Success in %, mean over seeds. Each routed method is paired with Random@K (random routing "
                "matched to DMR's realised bf16 share at K) on the same (seed, task) pairs; a CI that holds 0 is a "
                "tie. Recovered: (method − Quant) / (Full − Quant) on the same tasks. Oracle: the step-KL oracle; "
                "Uncertainty: the low model's own entropy (both matched to DMR's share).", ""]
        ladder = three_precisions(table)
        if ladder:
            out += ["### Three precisions at equal cost", ""] + ladder + [""]
        taus = thresholds(d)
        if taus:
            out += ["Thresholds (Sec. 4.2):", ""] + taus + [""]
        for diag in sorted((d / "tables").glob("diagnose_*.md")):
            out += [f"### Routing signal ({diag.stem.removeprefix('diagnose_')}; full table: "
                    f"`{diag.relative_to(results)}`)", ""] + compact_diagnose(diag.read_text()) + [""]
        # Table 1 itself stays in its files (the claim tables above carry its routed rows): a link, not a copy.
        main_md, wall = (str((d / "tables" / f).relative_to(results)) for f in ("main.md", "wall_time.md"))
        out += [f"Table 1: [`{main_md}`]({main_md}); measured wall time: [`{wall}`]({wall})", ""]
        figures = sorted(p.relative_to(results) for p in (d / "figures").glob("*.png")) if (d / "figures").exists() else []
        if figures:
            out += ["Figures: " + ", ".join(f"[{p.stem}]({p})" for p in figures), ""]
    out += ["## Where the time goes", ""] + timing_markdown(timing(results))
    ends = [str(results / cell / "tables" / "main.md") for cell in cells]
    out += critical_markdown(critical_path(metadata, ends)) if metadata else []
    out += [""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--cell", action="append", required=True, help="BENCHMARK/MODEL (repeatable)")
    p.add_argument("--commit", default=None, help="the commit the results were built at")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timing", type=Path, default=None, help="per-rule timing table (parquet)")
    p.add_argument("--metadata", type=Path, default=None,
                   help="Snakemake's provenance records (.snakemake/metadata), for the critical path")
    a = p.parse_args(argv)
    a.out.write_text(build(a.results, a.cell, a.commit, a.metadata))
    if a.timing:
        timing(a.results).write_parquet(a.timing)
    print(a.out.read_text())


if __name__ == "__main__":
    main()
