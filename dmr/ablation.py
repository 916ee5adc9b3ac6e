"""Router ablations (paper Sec. 5.4, 5.5, Table 5): depth L, KL threshold tau, action-only vs all-step,
and the step encoder.

Each variant is a KL-ST router trained by `dmr.klst` with one setting changed (`depthL`: L encoder
layers; `tau-NAME`: the threshold of `dmr.threshold`'s sweep point NAME; `steps-as`: every step
type eligible (`--step-types all`) instead of the benchmark's router steps; `encoder-text`: the
paper's router, the sentence encoder over the last 50 step texts, and `encoder-proposal`: the low
model's proposal at the current step (dmr.router.ProposalEncoder); workflow rule `klst_variant`).
This module compares them offline, on
the validation episodes of the KL pool that no variant trained on (the split is by episode and
seeded, so it is the same for every variant with the same eligible steps):

- `val_bacc`: balanced accuracy against the variant's own labels (what KL-ST optimised);
Every variant is scored on the held-out steps of the cell's router step types (an all-step router
is judged on the steps the action-only one decides):

- `recall@K`: route the top K of the validation steps by score to high precision, and count the
  share of the *reference* positives (KL above the cell's chosen tau) that land there. Random
  routing gets K, the KL oracle min(1, K / positive share). Labels differ between tau variants,
  so this common yardstick is what makes them comparable;
- `kl_mass@K`: the share of the total step KL that the top-K steps carry.

Online, as the paper judges them (Sec. 5.4, Fig. 5 right, Table 5): each variant's router is
calibrated as the cell's is and plays the ordinary `dmr` policy at each budget K on the cell's test
tasks and evaluation seeds (workflow rules calibrate_variant, rollout_variant). Per variant and K:

- `success`: the mean over seeds of each seed's success rate (%), as Table 1;
- `delta`, `delta_lo`, `delta_hi`, `delta_p`: the variant minus the cell's main DMR@K in success
  points on the same (seed, task) pairs, its paired-bootstrap 95% CI and McNemar's p (dmr.paired);
  a variant that is the cell's own router plays the cell's runs (`cell_router`, delta 0);
- `high_frac`: the realised share of LLM calls at bf16, mean over seeds;
- `dmr_success`: the cell's DMR@K success on the same seeds, the reference of `delta`.

The table has a row per variant and budget K: the online columns (null where K was not run online),
then the offline ones, `recall`, `kl_mass` and `oracle_recall` at that K.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dmr import paired, plots
from dmr.rundir import high_fraction

if TYPE_CHECKING:
    import polars as pl

ORDER = {"depth": 0, "tau": 1, "steps": 2, "encoder": 3}
# The online columns, per variant and budget (null where the budget was not run online).
ONLINE = dict.fromkeys(["success", "success_std", "high_frac", "dmr_success", "delta", "delta_lo", "delta_hi", "delta_p"], "f8")
ONLINE |= dict.fromkeys(["seeds", "episodes", "paired_tasks"], "i8") | {"cell_router": "bool"}
VARIANT = re.compile(r"depth(\d+)|tau-([a-z-]+)|steps-(ao|as)|encoder-(text|proposal)")


def parse(variant: str) -> tuple[str, str]:
    """'depth4' -> ('depth', '4'); 'tau-dense' -> ('tau', 'dense'); 'steps-as' -> ('steps', 'as');
    'encoder-text' -> ('encoder', 'text')."""
    m = VARIANT.fullmatch(variant)
    if not m:
        raise ValueError(f"unknown ablation variant {variant!r}: expected depthL, tau-NAME, steps-ao/steps-as "
                         "or encoder-text/encoder-proposal")
    depth, tau, steps, encoder = m.groups()
    return ("depth", depth) if depth else ("tau", tau) if tau else ("steps", steps) if steps else ("encoder", encoder)


def top_k(scores, k: float) -> np.ndarray:
    """Mask of the ceil(k * n) highest scores (ties broken by order, so the budget is exact)."""
    scores = np.asarray(scores, dtype=float)
    n = int(np.ceil(k * len(scores)))
    mask = np.zeros(len(scores), dtype=bool)
    mask[np.argsort(-scores, kind="stable")[:n]] = True
    return mask


def offline(scores, kl, tau_ref: float, budgets) -> dict:
    """recall@K of the reference positives and the KL mass in the top K, on one set of steps."""
    scores, kl = np.asarray(scores, dtype=float), np.asarray(kl, dtype=float)
    positive = kl > tau_ref
    out = {"val_steps": int(len(kl)), "val_positive": float(positive.mean()) if len(kl) else float("nan")}
    for k in budgets:
        high = top_k(scores, k)
        out[f"recall@{k:g}"] = float(positive[high].sum() / max(1, positive.sum()))
        out[f"kl_mass@{k:g}"] = float(kl[high].sum() / max(1e-30, kl.sum()))
        out[f"oracle_recall@{k:g}"] = float(min(1.0, k / max(1e-12, positive.mean()))) if len(kl) else float("nan")
    return out


def summarise(routers: dict[str, Path], tau_ref: float, budgets, step_types: list[str] | None = None) -> pl.DataFrame:
    """Every variant scored on the same held-out steps: those of `step_types` (the cell's router
    steps), so an all-step router is judged where the action-only one is."""
    import polars as pl

    rows = []
    for variant, d in routers.items():
        kind, value = parse(variant)
        metrics = json.loads((d / "metrics.json").read_text())
        scores = pl.read_parquet(d / "train_scores.parquet").filter(pl.col("split") == "val")
        if step_types and "step_type" in scores.columns:
            scores = scores.filter(pl.col("step_type").is_in(step_types))
        if scores.height == 0:
            raise ValueError(f"{d}: no validation steps; the ablation compares routers on held-out episodes")
        rows.append({"variant": variant, "kind": kind, "value": value, "layers": metrics["arch"].get("layers"),
                     "tau": metrics["tau"], "positive_fraction": metrics["positive_fraction"],
                     "params": metrics["params"]["router"], "val_bacc": metrics["val_bacc"],
                     "best_epoch": metrics["best_epoch"],
                     **offline(scores["score"].to_numpy(), scores["kl"].to_numpy(), tau_ref, budgets)})
    return pl.DataFrame(rows).sort(pl.col("kind").replace_strict(ORDER, return_dtype=pl.Int32), "layers", "tau")


def online(runs: dict[tuple[str, float], list[pl.DataFrame]], reference: dict[float, list[pl.DataFrame]],
           own: set[tuple[str, float]] = frozenset()) -> pl.DataFrame:
    """The online columns per (variant, K): `runs[variant, K]` are the variant's per-seed episodes at
    budget K, `reference[K]` the cell's DMR@K on the same seeds; `own` the pairs that are the cell's
    runs themselves. Runs that did not play the reference's (seed, task) pairs are an error."""
    import polars as pl

    rows = []
    for (variant, k), eps in runs.items():
        if k not in reference:
            raise ValueError(f"variant {variant} at K={k:g}: no DMR@{k:g} run of the cell to pair it with")
        won = paired.aligned(eps, reference[k])
        diff = paired.difference(won[0], won[1])
        success = [100.0 * float(e["won"].mean()) for e in eps]
        dmr_success = float(np.mean([100.0 * float(e["won"].mean()) for e in reference[k]]))
        rows.append({"variant": variant, "budget": float(k), "success": float(np.mean(success)),
                     "success_std": float(np.std(success, ddof=1)) if len(eps) > 1 else 0.0,
                     "seeds": len(eps), "episodes": int(sum(len(e) for e in eps)),
                     "high_frac": float(np.mean([high_fraction(e) for e in eps])), "dmr_success": dmr_success,
                     "delta": diff["delta"], "delta_lo": diff["lo"], "delta_hi": diff["hi"], "delta_p": diff["p"],
                     "paired_tasks": diff["n"], "cell_router": (variant, k) in own})
    schema = {"variant": pl.Utf8, "budget": pl.Float64} | {c: {"f8": pl.Float64, "i8": pl.Int64, "bool": pl.Boolean}[t]
                                                           for c, t in ONLINE.items()}
    return pl.DataFrame(rows, schema=schema)


def table(offline_df: pl.DataFrame, online_df: pl.DataFrame | None, budgets) -> pl.DataFrame:
    """One row per variant and budget K: the online columns (null where K was not run online), then the
    variant's offline ones, with recall, kl_mass and oracle_recall at that K."""
    import polars as pl

    per_k = [f"{m}@{k:g}" for m in ("recall", "kl_mass", "oracle_recall") for k in budgets]
    base = offline_df.drop([c for c in offline_df.columns if c in per_k])
    long = pl.concat([base.with_columns(budget=pl.lit(float(k)),
                                        **{m: offline_df[f"{m}@{k:g}"] for m in ("recall", "kl_mass", "oracle_recall")})
                      for k in budgets])
    if online_df is None:
        online_df = online({}, {})
    if extra := sorted(set(online_df["variant"]) - set(base["variant"])):
        raise ValueError(f"online runs of variants {extra} that have no router in the table")
    if extra := sorted(set(online_df["budget"]) - {float(k) for k in budgets}):
        raise ValueError(f"online runs at budgets {extra} that are not among --budgets")
    df = long.join(online_df, on=["variant", "budget"], how="left")
    order = ["variant", "kind", "value", "budget", *ONLINE]
    return df.select(order + [c for c in df.columns if c not in order]).sort(
        pl.col("kind").replace_strict(ORDER, return_dtype=pl.Int32), "layers", "tau", "variant", "budget")


def markdown(df, budgets, title: str) -> str:
    """A row per variant and K: success and its paired difference to the cell's DMR@K where run online,
    then the offline yardsticks at K and the variant's training figures."""
    cols = ["variant", "K", "success", "DMR@K", "Δ vs DMR@K (95% CI)", "bf16 share", "recall", "kl_mass", "val_bacc", "tau",
            "layers", "params"]

    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    def row(r):
        if r["success"] is None:
            succ = dmr = delta = share = "–"
        else:
            succ = f"{r['success']:.1f}" + (f" ± {r['success_std']:.1f}" if r["seeds"] > 1 else "")
            dmr = f"{r['dmr_success']:.1f}"
            delta = ("0 (the cell's router)" if r["cell_router"] else
                     f"{r['delta']:+.1f} [{r['delta_lo']:+.1f}, {r['delta_hi']:+.1f}]")
            share = f"{100 * r['high_frac']:.0f}%"
        return [r["variant"], f"{r['budget']:g}", succ, dmr, delta, share, num(r["recall"], ".3f"), num(r["kl_mass"], ".3f"),
                num(r["val_bacc"], ".3f"), num(r["tau"], ".3g"), num(r["layers"], "d"), num(r["params"], ",")]

    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in df.iter_rows(named=True)]
    ref = df.row(0, named=True)
    chance = ", ".join(f"K={k:g}: random {k:.2f}, oracle {df.filter(df['budget'] == float(k))['oracle_recall'][0]:.2f}"
                       for k in budgets)
    ran = df.filter(df["success"].is_not_null())
    if len(ran):
        lines += ["", f"Online: each variant's routed runs at budget K on the cell's test tasks, {ran['seeds'].max()} "
                  f"seed(s), {ran['paired_tasks'].max()} (seed, task) pairs per K. success: mean over seeds (± std over "
                  "seeds); DMR@K: the cell's router on the same seeds; Δ: variant minus the cell's DMR@K in success "
                  "points on the same pairs, paired-bootstrap 95% CI; bf16 share: realised share of LLM calls at bf16."]
    else:
        lines += ["", "Online: not run (route.ablation.online.seeds: 0)."]
    lines += ["", f"Offline, on {ref['val_steps']} held-out steps of the KL pool. recall: share of the steps with "
              f"KL above the cell's tau that the router's top K sends to high precision ({chance}). "
              "kl_mass: share of the total step KL in those steps. val_bacc: balanced accuracy on the variant's own "
              "labels."]
    return "\n".join(lines) + "\n"


def figure(df, budgets, title: str, path: Path) -> None:
    """Online: success against K, a line per variant, a panel per kind of variant. Offline only: the
    held-out recall at the middle K and the balanced accuracy, per variant."""
    import polars as pl

    plt = plots.pyplot()
    kinds = [kd for kd in ORDER if kd in set(df["kind"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.0), squeeze=False)
    run = df.filter(df["success"].is_not_null())
    k = budgets[len(budgets) // 2]
    for ax, kind in zip(axes[0], kinds):
        if len(run):
            ref = run.group_by("budget").agg(pl.col("dmr_success").first()).sort("budget")
            ax.plot(ref["budget"].to_list(), ref["dmr_success"].to_list(), color="0.5", ls=":", marker="s",
                    label="DMR (cell)")
            for variant in dict.fromkeys(run.filter(run["kind"] == kind)["variant"]):
                sub = run.filter(run["variant"] == variant).sort("budget")
                ax.plot(sub["budget"].to_list(), sub["success"].to_list(), marker="o", label=variant,
                        ls="--" if sub["cell_router"][0] else "-")
            ax.set_xlabel("budget K")
            ax.set_ylim(-2, 102)
            ax.legend(fontsize=7)
            continue
        sub = df.filter((df["kind"] == kind) & (df["budget"] == float(k)))
        x = sub["layers"].to_list() if kind == "depth" else sub["tau"].to_list() if kind == "tau" else sub["value"].to_list()
        if kind in ("steps", "encoder"):
            ax.bar(x, sub["recall"].to_list(), color="#7a9cc6")
        else:
            ax.plot(x, sub["recall"].to_list(), "o-", color="#7a9cc6", label=f"recall@{k:g}")
            ax.plot(x, sub["val_bacc"].to_list(), "s--", color="#e39b5b", label="val balanced acc.")
            ax.set_xscale("log", base=2 if kind == "depth" else 10)
            ax.legend(fontsize=7)
        ax.axhline(k, color="0.5", ls=":", lw=1)
        ax.set_xlabel({"depth": "router layers L", "tau": "KL threshold tau", "steps": "eligible steps",
                       "encoder": "step encoder"}[kind])
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("success (%)" if len(run) else "held-out score")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plots.save(fig, path)


def episodes_of(dirs: list[str]) -> list:
    import polars as pl

    missing = [d for d in dirs if not (Path(d) / "episodes.parquet").exists()]
    if missing:
        raise SystemExit(f"no episodes.parquet in {missing}: not a finished rollout")
    return [pl.read_parquet(Path(d) / "episodes.parquet") for d in dirs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", nargs=2, action="append", metavar=("VARIANT", "DIR"), required=True,
                   help="a variant's name and its KL-ST router directory (repeat)")
    p.add_argument("--threshold", required=True, type=Path, help="the cell's threshold.json (the reference tau)")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.4, 0.7])
    p.add_argument("--step-types", nargs="+", default=None,
                   help="score every variant on these held-out step types (the cell's router steps)")
    p.add_argument("--online", nargs="+", action="append", default=[], metavar="VARIANT K RUN",
                   help="VARIANT K RUN_DIR...: a variant's routed runs at budget K, one per seed (repeat)")
    p.add_argument("--reference", nargs="+", action="append", default=[], metavar="K RUN",
                   help="K RUN_DIR...: the cell's DMR@K runs on the same seeds, the online runs' pair (repeat)")
    p.add_argument("--title", default="Router ablations")
    p.add_argument("--out", required=True, type=Path, help="table .parquet (a .md is written beside it)")
    p.add_argument("--figure", type=Path, help="figure path (.png; a .pdf is written beside it)")
    a = p.parse_args(argv)
    routers = {v: Path(d) for v, d in a.router}
    for v, d in routers.items():
        parse(v)
        if not (d / "metrics.json").exists():
            raise SystemExit(f"variant {v}: {d} holds no KL-ST router (metrics.json missing)")
    tau_ref = json.loads(a.threshold.read_text())["tau"]
    for spec, n in [(o, 3) for o in a.online] + [(r, 2) for r in a.reference]:
        if len(spec) < n:
            raise SystemExit(f"{' '.join(spec)}: expected {'VARIANT K' if n == 3 else 'K'} and at least one run directory")
    refs = {float(k): dirs for k, *dirs in a.reference}
    runs = {(v, float(k)): dirs for v, k, *dirs in a.online}
    own = {key for key, dirs in runs.items() if dirs == refs.get(key[1])}
    on = online({key: episodes_of(d) for key, d in runs.items()}, {k: episodes_of(d) for k, d in refs.items()}, own)
    df = table(summarise(routers, tau_ref, a.budgets, a.step_types), on, a.budgets)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.out)
    a.out.with_suffix(".md").write_text(markdown(df, a.budgets, a.title))
    if a.figure:
        figure(df, a.budgets, a.title, a.figure)
    print(markdown(df, a.budgets, a.title))


if __name__ == "__main__":
    main()
