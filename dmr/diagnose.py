"""Where is the routing signal? The KL-ST router's ranking against trivial rankers, offline.

On the KL pool's held-out episodes (the router's validation split, never trained on), every ranker
orders the router-eligible steps, and each budget K sends its top K to high precision. Scored:

- `recall@K`: share of the steps with KL above the cell's tau that the top K catches (random: K);
- `kl_mass@K`: share of the total step KL in the top K;
- `mismatch@K`: share of the steps where the two precisions' greedy tokens disagree that the top
  K catches (the other label kind: a disagreement, not a divergence);
- `spearman`: rank correlation of the ranker with the step KL.

Rankers: the router; the step index; the observation's length; whether the observation is
"Nothing happens." (a failed action); the previous action's verb (its mean KL on the training
episodes); the low model's own uncertainty at the step (entropy over the action block, its max,
and minus the first token's top-1 margin; one prefill of the model the step runs on anyway); and
the KL itself (the oracle). If a trivial ranker matches the router, the router has learnt
nothing beyond it; if the low model's uncertainty beats it, the signal is in the model, not in
the state text.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from dmr.ablation import top_k


def spearman(x, y) -> float:
    x, y = pl.Series(np.asarray(x, dtype=float)).rank(), pl.Series(np.asarray(y, dtype=float)).rank()
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x.to_numpy(), y.to_numpy())[0, 1])


def verb(action) -> str:
    return (action or "").split(" ", 1)[0] or "<start>"


def rankers(steps: pl.DataFrame, train: pl.DataFrame) -> dict[str, np.ndarray]:
    """Scores of each ranker on `steps` (higher = send to bf16); `train` fits the verb table."""
    mean_kl = dict(train.with_columns(v=pl.col("prev_action").map_elements(verb, return_dtype=pl.Utf8))
                   .group_by("v").agg(pl.col("kl").mean()).iter_rows())
    prior = float(train["kl"].mean()) if train.height else 0.0
    out = {"router": steps["score"].to_numpy(),
           "step index": steps["step"].to_numpy().astype(float),
           "observation length": steps["observation"].str.len_chars().to_numpy().astype(float),
           "Nothing happens.": steps["observation"].str.contains("Nothing happens.", literal=True).to_numpy().astype(float),
           "previous verb": np.array([mean_kl.get(verb(a), prior) for a in steps["prev_action"].to_list()])}
    if "low_entropy" in steps.columns and steps["low_entropy"].null_count() == 0:
        out["low-model entropy"] = steps["low_entropy"].to_numpy()
        out["low-model max entropy"] = steps["low_entropy_max"].to_numpy()
        out["low-model margin (−)"] = -steps["low_margin"].to_numpy()
    out["KL oracle"] = steps["kl"].to_numpy()
    return out


def diagnose(kl_steps: pl.DataFrame, scores: pl.DataFrame, tau: float, budgets) -> pl.DataFrame:
    """One row per ranker on the held-out steps of `scores` (the router's train_scores.parquet)."""
    keep = [c for c in kl_steps.columns if c not in ("kl", "step_type")]
    joined = scores.join(kl_steps.select(keep), on=["task", "step"], how="inner")
    val, train = joined.filter(pl.col("split") == "val"), joined.filter(pl.col("split") == "train")
    if val.height == 0:
        raise ValueError("no held-out steps: the router's train_scores.parquet has no split == 'val' rows")
    kl = val["kl"].to_numpy()
    positive = kl > tau
    mismatch = val["greedy_mismatch"].to_numpy().astype(bool) if "greedy_mismatch" in val.columns \
        and val["greedy_mismatch"].null_count() == 0 else None
    rows = []
    for name, s in rankers(val, train).items():
        row = {"ranker": name, "spearman": spearman(s, kl)}
        for k in budgets:
            high = top_k(s, k)
            row[f"recall@{k:g}"] = float(positive[high].sum() / max(1, positive.sum()))
            row[f"kl_mass@{k:g}"] = float(kl[high].sum() / max(1e-30, kl.sum()))
            if mismatch is not None:
                row[f"mismatch@{k:g}"] = float(mismatch[high].sum() / max(1, mismatch.sum()))
        rows.append(row)
    df = pl.DataFrame(rows)
    return df.with_columns(val_steps=pl.lit(len(kl)), positive_share=pl.lit(float(positive.mean())),
                           mismatch_share=pl.lit(None if mismatch is None else float(mismatch.mean())))


def online(steps: pl.DataFrame, episodes: pl.DataFrame, tau: float, step_types=None, high: str = "bf16") -> dict:
    """The DMR router at work (a probe run: dmr.agent --probe-kl): how its scores rank the true step
    KL of the states it meets, how many of the steps above tau it sent to bf16, against the share a
    random router with the same realised fraction would catch, and where its bf16 calls land."""
    s = steps.filter(pl.col("route_score").is_not_null() & pl.col("true_kl").is_not_null())
    if step_types:
        s = s.filter(pl.col("step_type").is_in(list(step_types)))
    if s.height == 0:
        raise ValueError("the probe run has no routed steps with a measured true_kl (run dmr.agent with --probe-kl)")
    won = dict(episodes.select("task", "won").iter_rows())
    s = s.with_columns(ep_won=pl.col("task").replace_strict(won, return_dtype=pl.Boolean),
                       is_high=pl.col("precision") == high, positive=pl.col("true_kl") > tau,
                       lost_step=pl.col("observation").str.contains("Nothing happens.", literal=True))
    pos = s.filter(pl.col("positive"))
    hi = s.filter(pl.col("is_high"))
    return {"online_steps": s.height, "online_spearman": spearman(s["route_score"], s["true_kl"]),
            "online_high_fraction": float(s["is_high"].mean()),
            "online_positive_share": float(s["positive"].mean()),
            "online_recall": float(pos["is_high"].mean()) if pos.height else None,
            "online_kl_mass": float(hi["true_kl"].sum() / max(1e-30, s["true_kl"].sum())),
            "online_high_in_lost_episodes": float((~hi["ep_won"]).mean()) if hi.height else None,
            "online_steps_in_lost_episodes": float((~s["ep_won"]).mean()),
            "online_high_after_failed_action": float(hi["lost_step"].mean()) if hi.height else None,
            "online_steps_after_failed_action": float(s["lost_step"].mean())}


def online_markdown(o: dict) -> list[str]:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}%"
    return ["", f"Online, on a DMR run with each step's true KL measured ({o['online_steps']} routed steps, "
            f"{pct(o['online_high_fraction'])} sent to bf16):", "",
            "| measure | router | random at the same fraction |", "|---|---|---|",
            f"| Spearman(score, true KL) | {o['online_spearman']:.3f} | 0 |",
            f"| steps above tau sent to bf16 | {pct(o['online_recall'])} | {pct(o['online_high_fraction'])} |",
            f"| share of the true KL on bf16 steps | {pct(o['online_kl_mass'])} | {pct(o['online_high_fraction'])} |",
            f"| bf16 calls in lost episodes | {pct(o['online_high_in_lost_episodes'])} | "
            f"{pct(o['online_steps_in_lost_episodes'])} |",
            f"| bf16 calls right after a failed action | {pct(o['online_high_after_failed_action'])} | "
            f"{pct(o['online_steps_after_failed_action'])} |",
            "", f"Steps above tau: {pct(o['online_positive_share'])} of the routed steps online."]


def markdown(df: pl.DataFrame, budgets, title: str) -> str:
    metrics = [c for c in df.columns if "@" in c] + ["spearman"]
    lines = [f"# {title}", "", "| ranker | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for r in df.iter_rows(named=True):
        lines.append(f"| {r['ranker']} | " + " | ".join("–" if r[m] is None else f"{r[m]:.3f}" for m in metrics) + " |")
    r0 = df.row(0, named=True)
    mism = "" if r0["mismatch_share"] is None else f", {100 * r0['mismatch_share']:.1f}% with a greedy mismatch"
    lines += ["", f"Offline, on {r0['val_steps']} held-out steps of the KL pool ({100 * r0['positive_share']:.1f}% "
              f"above tau{mism}). Random routing scores K on recall@K, kl_mass@K and mismatch@K "
              f"({', '.join(f'{k:g}' for k in budgets)})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kl", required=True, type=Path, help="the scheme's kl/steps.parquet (dmr.kl)")
    p.add_argument("--router", required=True, type=Path, help="the KL-ST router directory (train_scores.parquet)")
    p.add_argument("--threshold", required=True, type=Path, help="threshold.json (tau)")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.4, 0.7])
    p.add_argument("--online", type=Path, default=None,
                   help="steps.parquet of a DMR probe run (dmr.agent --probe-kl), episodes.parquet beside it")
    p.add_argument("--step-types", nargs="+", default=None, help="routed step types (online part)")
    p.add_argument("--title", default="Routing signal, offline")
    p.add_argument("--out", required=True, type=Path, help="table .parquet (a .md is written beside it)")
    a = p.parse_args(argv)
    tau = json.loads(a.threshold.read_text())["tau"]
    df = diagnose(pl.read_parquet(a.kl), pl.read_parquet(a.router / "train_scores.parquet"), tau, a.budgets)
    text = markdown(df, a.budgets, a.title)
    if a.online:
        o = online(pl.read_parquet(a.online), pl.read_parquet(a.online.parent / "episodes.parquet"), tau, a.step_types)
        df = df.with_columns(**{k: pl.lit(v) for k, v in o.items()})
        text += "\n".join(online_markdown(o)) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.out)
    a.out.with_suffix(".md").write_text(text)
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
