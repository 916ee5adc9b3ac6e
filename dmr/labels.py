"""Action-only (AO) vs all-step (AS) KL labels, for the calibration ablation (paper Table 5).

The KL pool holds every step the bf16 agent took, each with its step type: ALFWorld's `think:`
steps next to its actions. AO calibration places tau (dmr.threshold's rule) on the action steps'
KL only and labels only actions; AS calibration places it on all steps and labels them all. Both
label sets come out of one pool, so the ablation trains routers on the same rollouts:

- labels.parquet: one row per pool step (task, step, step_type, kl) with `label_ao` (null for
  steps that are not actions), `label_as`, and the two taus;
- labels.json: per set its step types, tau, whether a sparse plateau was found, the positive
  fraction and the number of steps.
On a benchmark without think steps (household) both sets are the same steps and the same labels.

`precision_labels` is the label rule of KL-ST itself, for any number of precisions (dmr.klst): a
step's class is the cheapest low precision whose step KL to bf16 stays at or below that precision's
tau, else bf16 (class 0). With one low precision it is the paper's y = 1[KL > tau], class 0 = 1.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dmr.threshold import choose

ACTION = "action"


def precision_labels(kl, taus) -> np.ndarray:
    """Class per step for precisions [bf16, low_1, .., low_L] ordered by falling cost: the largest j
    with KL_j <= tau_j (low_j suffices), else 0 (bf16). `kl`: [N, L] step KLs (or [N] for L = 1),
    `taus`: L thresholds, each from its own pool's histogram (dmr.threshold). "KL_j <= tau_j" is
    taken as "not KL_j > tau_j", the paper's negative label, so the binary case is y = 1[KL > tau]
    to the last step (a NaN KL included)."""
    kl = np.asarray(kl, dtype=float)
    kl = kl[:, None] if kl.ndim == 1 else kl
    taus = np.asarray(taus, dtype=float).reshape(-1)
    if kl.ndim != 2 or kl.shape[1] != len(taus):
        raise ValueError(f"{kl.shape[-1] if kl.ndim else 0} KL columns but {len(taus)} taus: one tau per low precision")
    label = np.zeros(len(kl), dtype=np.int64)
    for j in range(kl.shape[1]):  # cheaper precisions later: the cheapest one that suffices wins
        label[~(kl[:, j] > taus[j])] = j + 1
    return label


def label_sets(df, action_types: list[str], **rule) -> tuple[object, dict]:
    """The pool with AO and AS label columns, and each set's threshold summary."""
    import polars as pl

    sets = {"ao": sorted(action_types), "as": sorted(set(df["step_type"].unique().to_list()))}
    summary, out = {}, df.sort("task", "step")
    fixed = rule.pop("tau", None)
    for name, types in sets.items():
        kl = out.filter(pl.col("step_type").is_in(types))["kl"].to_numpy()
        if len(kl) == 0:
            raise SystemExit(f"no steps of type {types} in the KL pool: cannot place the {name.upper()} threshold")
        chosen = choose(kl, **rule)
        tau = chosen["tau"] if fixed is None else fixed
        summary[name] = {"step_types": types, "tau": tau, "plateau_found": chosen["plateau_found"] and fixed is None,
                         "positive_fraction": float((kl > tau).mean()), "steps": int(len(kl))}
        out = out.with_columns(
            pl.when(pl.col("step_type").is_in(types)).then(pl.col("kl") > tau).otherwise(None).alias(f"label_{name}"),
            pl.lit(tau).alias(f"tau_{name}"))
    counts = out.group_by("step_type").len().sort("step_type")
    summary["step_types"] = dict(zip(counts["step_type"].to_list(), counts["len"].to_list()))
    summary["agreement"] = float(out.filter(pl.col("label_ao").is_not_null())
                                 .select((pl.col("label_ao") == pl.col("label_as")).mean()).item())
    return out, summary


def main(argv=None):
    import polars as pl

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kl", required=True, type=Path, help="steps.parquet written by dmr.kl")
    p.add_argument("--action-types", nargs="+", default=[ACTION], help="the step types of the AO set")
    p.add_argument("--tau", type=float, default=None, help="fixed tau for both sets instead of the rule")
    p.add_argument("--min-positive", type=float, default=0.02)
    p.add_argument("--sparse", type=float, default=0.1)
    p.add_argument("--fallback-positive", type=float, default=0.2)
    p.add_argument("--out", required=True, type=Path, help="labels.parquet")
    p.add_argument("--summary", required=True, type=Path, help="labels.json")
    a = p.parse_args(argv)
    df = pl.read_parquet(a.kl)
    keep = [c for c in ("task", "step", "step_type", "quant", "kl") if c in df.columns]
    out, summary = label_sets(df.select(keep), a.action_types, tau=a.tau, min_positive=a.min_positive,
                              sparse=a.sparse, fallback_positive=a.fallback_positive)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    out.write_parquet(a.out)
    a.summary.write_text(json.dumps(summary, indent=1))
    for name in ("ao", "as"):
        s = summary[name]
        print(f"{name.upper()}: {s['steps']} steps of {s['step_types']}, tau = {s['tau']:.3e}, "
              f"{100 * s['positive_fraction']:.1f}% positive")
    print(f"step types {summary['step_types']}; AO and AS agree on {100 * summary['agreement']:.1f}% of actions")


if __name__ == "__main__":
    main()
