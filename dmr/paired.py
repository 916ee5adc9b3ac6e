"""Paired statistics on success: two methods played on the same tasks with the same seeds.

Every comparison in Table 1 pairs episodes by (seed, task). The difference of two methods is the
mean of the per-task differences, with a 95% percentile CI from a paired bootstrap (tasks resampled
with replacement, a fixed generator so the table is reproducible) and the exact two-sided McNemar
p-value on the discordant pairs. The recovered share of the Full - Quant gap,
(method - Quant) / (Full - Quant), resamples the same tasks for all three methods at once.
A difference whose CI contains 0 is a tie. A router over several precisions (a ladder scheme A+B)
is also paired with the better of the two-precision routers at the same cost budget (DMR-A@K,
DMR-B@K): the three-way router is worth its extra rung only if it is at least as good as both.
"""
from __future__ import annotations

import math

import numpy as np
import polars as pl

from dmr.policy_name import is_ladder, scheme_lows

BOOTSTRAP = 10_000
KEY = ("seed", "task")


def outcomes(episodes: list[pl.DataFrame] | pl.DataFrame) -> pl.DataFrame:
    """One row per (seed, task) with its success as 0/1, from a method's per-seed runs; a run that
    played a task twice is an error. Runs without a seed column are told apart by their position."""
    runs = episodes if isinstance(episodes, list) else [episodes]
    df = pl.concat([(e if "seed" in e.columns else e.with_columns(seed=pl.lit(i)))
                    .select(pl.col("seed").cast(pl.Int64), pl.col("task").cast(pl.Utf8), pl.col("won").cast(pl.Int8))
                    for i, e in enumerate(runs)])
    dup = df.group_by(KEY).len().filter(pl.col("len") > 1)
    if len(dup):
        raise ValueError(f"a run played {len(dup)} (seed, task) pairs twice, e.g. {dup.row(0)[:2]}")
    return df


def aligned(*runs: pl.DataFrame) -> np.ndarray:
    """Success of each run on the (seed, task) pairs they all played: an array (runs, tasks).
    Runs that share no task, or differ in what they played, are not paired: that is an error."""
    tables = [outcomes(r) for r in runs]
    keys = [set(t.select(KEY).iter_rows()) for t in tables]
    common = set.intersection(*keys)
    if any(k != common for k in keys):
        sizes = ", ".join(str(len(k)) for k in keys)
        raise ValueError(f"runs are not paired: they played different (seed, task) sets ({sizes} tasks, "
                         f"{len(common)} in common); compare runs of the same seeds and tasks")
    order = sorted(common)
    won = [dict(zip(t.select(KEY).iter_rows(), t["won"])) for t in tables]
    return np.array([[w[k] for k in order] for w in won], dtype=float)


def mcnemar(x: np.ndarray, y: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: the discordant pairs under Binomial(n, 1/2)."""
    b, c = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _resample(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))


def difference(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """x - y in success points over paired tasks, its 95% bootstrap CI and McNemar's p."""
    d = 100.0 * (x - y)
    boot = d[_resample(len(d), seed)].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"delta": float(d.mean()), "lo": float(lo), "hi": float(hi), "p": mcnemar(x, y), "n": len(d)}


def recovered(m: np.ndarray, full: np.ndarray, quant: np.ndarray, seed: int = 0) -> dict:
    """(m - Quant) / (Full - Quant) with its 95% bootstrap CI. Undefined (None) where Full does not
    beat Quant on the tasks: there is no gap to recover."""
    gap = full.mean() - quant.mean()
    if gap <= 0:
        return {"share": None, "lo": None, "hi": None}
    idx = _resample(len(m), seed)
    g = full[idx].mean(axis=1) - quant[idx].mean(axis=1)
    r = (m[idx].mean(axis=1) - quant[idx].mean(axis=1))
    shares = np.divide(r, g, out=np.full_like(r, np.nan), where=g > 0)
    lo, hi = np.nanpercentile(shares, [2.5, 97.5])
    return {"share": float((m.mean() - quant.mean()) / gap), "lo": float(lo), "hi": float(hi)}


def verdict(diff: dict) -> str:
    """win / loss where the 95% CI excludes 0, else tie."""
    if diff["lo"] > 0:
        return "win"
    if diff["hi"] < 0:
        return "loss"
    return "tie"


def against(me: pl.DataFrame, ref_runs: list[pl.DataFrame], prefix: str, n_as: str | None = None) -> dict:
    """The paired difference of outcomes `me` to a reference method's runs as PREFIX, PREFIX_lo,
    PREFIX_hi, PREFIX_p and PREFIX_verdict, plus the number of pairs used under `n_as` if given."""
    m, r = aligned(me, outcomes(ref_runs))
    dd = difference(m, r)
    out = {prefix: dd["delta"], f"{prefix}_lo": dd["lo"], f"{prefix}_hi": dd["hi"], f"{prefix}_p": dd["p"],
           f"{prefix}_verdict": verdict(dd)}
    return out | ({n_as: dd["n"]} if n_as else {})


def compare(runs: dict[str, list[pl.DataFrame]]) -> pl.DataFrame:
    """Paired columns of Table 1 for each routed method `QUANT/NAME@K`: the difference to the matched
    Random@K of its scheme (and to Full, Quant and, where the table has it, Forced), its CI, McNemar's
    p and the recovered share; Forced itself gets its recovered share and differences to Full and Quant."""
    rows = []
    for method, eps in runs.items():
        quant, _, name = method.rpartition("/")
        base, _, k = name.partition("@")
        if not quant or not (k or base == "Forced"):
            continue
        refs = {"full": runs.get("Full"), "quant": runs.get(f"{quant}/Quant"),
                "random": runs.get(f"{quant}/Random@{k}") if k and base != "Random" else None,
                "forced": runs.get(f"{quant}/Forced") if k else None}
        row = {"quant": quant, "method": base, "budget": float(k) if k else None}
        me = outcomes(eps)
        if refs["full"] is not None and refs["quant"] is not None:
            m, f, q = aligned(me, outcomes(refs["full"]), outcomes(refs["quant"]))
            rec = recovered(m, f, q)
            row.update(recovered=rec["share"], recovered_lo=rec["lo"], recovered_hi=rec["hi"])
            for ref, arr in (("full", f), ("quant", q)):
                dd = difference(m, arr)
                row.update({f"vs_{ref}": dd["delta"], f"vs_{ref}_lo": dd["lo"], f"vs_{ref}_hi": dd["hi"]})
        if refs["random"] is not None:
            row.update(against(me, refs["random"], "vs_random", n_as="paired_tasks"))
        if refs["forced"] is not None:  # what routing adds over forcing App. C.1's steps to bf16 alone
            row.update(against(me, refs["forced"], "vs_forced"))
        binaries = {n: runs[f"{quant}/{n}@{k}"] for n in (f"DMR-{low}" for low in scheme_lows(quant))
                    if f"{quant}/{n}@{k}" in runs} if is_ladder(quant) and base in ("DMR", "GRPO") else {}
        # The better two-precision router at the same cost budget, chosen by its success on these same
        # tasks: the comparison leans against the ladder router, never for it.
        if binaries:
            ref = max(binaries, key=lambda n: float(outcomes(binaries[n])["won"].mean()))
            row.update(against(me, binaries[ref], "vs_binary"), vs_binary_ref=ref)
        rows.append(row)
    schema = {"quant": pl.Utf8, "method": pl.Utf8, "budget": pl.Float64}
    for col in ("recovered", "vs_full", "vs_quant", "vs_random", "vs_forced", "vs_binary"):
        schema.update({col: pl.Float64, f"{col}_lo": pl.Float64, f"{col}_hi": pl.Float64})
    schema.update(vs_random_p=pl.Float64, vs_random_verdict=pl.Utf8, paired_tasks=pl.Int64,
                  vs_forced_p=pl.Float64, vs_forced_verdict=pl.Utf8,
                  vs_binary_p=pl.Float64, vs_binary_verdict=pl.Utf8, vs_binary_ref=pl.Utf8)
    return pl.DataFrame(rows, schema=schema)
