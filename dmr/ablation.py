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

Online routed evaluation of a variant is the ordinary `dmr` policy on its router directory; it
costs a routed rollout per variant, budget and seed, so the embedded default reports the offline
figures only.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dmr import plots

if TYPE_CHECKING:
    import polars as pl

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
    order = {"depth": 0, "tau": 1, "steps": 2, "encoder": 3}
    return pl.DataFrame(rows).sort(pl.col("kind").replace_strict(order, return_dtype=pl.Int32), "layers", "tau")


def markdown(df, budgets, title: str) -> str:
    cols = ["variant", "layers", "tau", "positive_fraction", "params", "val_bacc"] + [f"recall@{k:g}" for k in budgets] \
        + [f"kl_mass@{k:g}" for k in budgets]

    def fmt(c, v):
        if v is None:
            return "–"
        if c == "tau":
            return f"{v:.3g}"
        if c == "params":
            return f"{v:,}"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r[c]) for c in cols) + " |" for r in df.iter_rows(named=True)]
    ref = df.row(0, named=True)
    chance = ", ".join(f"K={k:g}: random {k:.2f}, oracle {ref[f'oracle_recall@{k:g}']:.2f}" for k in budgets)
    lines += ["", f"Offline, on {ref['val_steps']} held-out steps of the KL pool. recall@K: share of the steps with "
              f"KL above the cell's tau that the router's top K sends to high precision ({chance}). "
              "kl_mass@K: share of the total step KL in those steps."]
    return "\n".join(lines) + "\n"


def figure(df, budgets, title: str, path: Path) -> None:
    plt = plots.pyplot()
    k = budgets[len(budgets) // 2]
    kinds = [kd for kd in ("depth", "tau", "steps", "encoder") if kd in set(df["kind"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sub = df.filter(df["kind"] == kind)
        x = sub["layers"].to_list() if kind == "depth" else sub["tau"].to_list() if kind == "tau" else sub["value"].to_list()
        if kind in ("steps", "encoder"):
            ax.bar(x, sub[f"recall@{k:g}"].to_list(), color="#7a9cc6")
        else:
            ax.plot(x, sub[f"recall@{k:g}"].to_list(), "o-", color="#7a9cc6", label=f"recall@{k:g}")
            ax.plot(x, sub["val_bacc"].to_list(), "s--", color="#e39b5b", label="val balanced acc.")
            ax.set_xscale("log", base=2 if kind == "depth" else 10)
            ax.legend(fontsize=7)
        ax.axhline(k, color="0.5", ls=":", lw=1)
        ax.set_xlabel({"depth": "router layers L", "tau": "KL threshold tau", "steps": "eligible steps",
                       "encoder": "step encoder"}[kind])
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("held-out score")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plots.save(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", nargs=2, action="append", metavar=("VARIANT", "DIR"), required=True,
                   help="a variant's name and its KL-ST router directory (repeat)")
    p.add_argument("--threshold", required=True, type=Path, help="the cell's threshold.json (the reference tau)")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.4, 0.7])
    p.add_argument("--step-types", nargs="+", default=None,
                   help="score every variant on these held-out step types (the cell's router steps)")
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
    df = summarise(routers, tau_ref, a.budgets, a.step_types)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.out)
    a.out.with_suffix(".md").write_text(markdown(df, a.budgets, a.title))
    if a.figure:
        figure(df, a.budgets, a.title, a.figure)
    print(markdown(df, a.budgets, a.title))


if __name__ == "__main__":
    main()
