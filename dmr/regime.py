"""Is a cell in the paper's regime? One row per quant scheme, from what the workflow built.

The paper's effect needs a low-precision model that agrees with bf16 at most steps and fails at a
few critical ones. A cell is in that regime when (docs/regime.md):

- (a) quantization hurts: Full - Quant >= 15 success points;
- (b) the log-KL histogram has a sparse plateau between a dense low mode and a high-divergence
  mode: `dmr.threshold` finds one (`plateau_found`, not the fallback quantile), the histogram has
  two modes, and the plateau labels more than the rule's `min_positive` share (a "plateau" at that
  cap is only the falling edge of a tail, not a valley between two modes);
- (c) the step-KL oracle at K = 0.4 recovers >= 80% of the Full - Quant gap.

Per scheme: the top-1 agreement of the two precisions on the KL pool (the share of steps where
their argmax token agrees at every position of bf16's action), bf16's own entropy on the pool
(routine steps against decision points),
step-KL percentiles, the histogram's shape (its modes and the depth of the valley between them),
the plateau rule's verdict, Full and Quant success on the same tasks, and, where the scheme was
routed, the oracle at K = 0.4 (its realised bf16 share matched to DMR's). Missing runs leave their
columns empty; a scheme without a KL pool is skipped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from dmr import paired

GAP = 15.0       # (a): Full - Quant in success points
RECOVERED = 0.8  # (c): the oracle's share of the gap at K = 0.4


def shape(counts) -> tuple[str, float | None]:
    """The histogram's modes: 'one mode', or 'two modes' with the valley between the main mode and
    the next one as a share of the smaller mode (smoothed over 3 bins, modes above 5% of the peak).
    A valley of 0.8 or more counts as one mode with a shoulder."""
    c = np.convolve(np.asarray(counts, dtype=float), np.ones(3) / 3, mode="same")
    top = int(np.argmax(c))
    peaks = [i for i in range(1, len(c) - 1) if c[i] >= c[i - 1] and c[i] >= c[i + 1] and c[i] > 0.05 * c[top]]
    valleys = [c[min(i, top):max(i, top) + 1].min() / min(c[i], c[top]) for i in peaks if i != top]
    valley = min(valleys, default=None)
    if valley is None or valley >= 0.8:
        return "one mode", valley
    return "two modes", float(valley)


def _success(runs: list[Path]) -> pl.DataFrame | None:
    present = [r / "episodes.parquet" for r in runs if (r / "episodes.parquet").exists()]
    return paired.outcomes([pl.read_parquet(p) for p in present]) if present and len(present) == len(runs) else None


def row(cell: Path, scheme: str, seeds: list[int], step_types: list[str] | None) -> dict | None:
    kl_dir = cell / scheme / "kl"
    if not (kl_dir / "threshold.json").exists():
        return None
    th = json.loads((kl_dir / "threshold.json").read_text())
    kl = pl.read_parquet(kl_dir / "steps.parquet")
    if step_types:
        kl = kl.filter(pl.col("step_type").is_in(step_types))
    form, valley = shape(th["hist"]["counts"])
    out = {"scheme": scheme, "steps": kl.height,
           "top1_agreement": 1.0 - float(kl["greedy_mismatch"].mean()) if "greedy_mismatch" in kl.columns else None,
           **{f"kl_p{q}": float(kl["kl"].quantile(q / 100)) for q in (50, 90, 99)},
           # bf16's own confidence on its pool (mean token entropy of its action, nats), at the
           # routine steps (p50) and the decision points (p90): a step's KL can only collapse where
           # the agent is near-deterministic, so a high p50 leaves no low mode to separate.
           **{f"bf16_entropy_p{q}": (float(kl["high_entropy"].quantile(q / 100))
                                     if "high_entropy" in kl.columns and kl["high_entropy"].null_count() < kl.height
                                     else None) for q in (50, 90)},
           "shape": form, "valley": valley, "plateau_found": bool(th["plateau_found"]),
           "plateau_density": float(th["plateau_density"]), "tau": float(th["tau"]),
           "positive_fraction": float(th["positive_fraction"])}
    # (b): a plateau at the min_positive cap, or in a histogram of one mode, is the edge of a tail,
    # not a valley between modes.
    cap = th["rule"]["min_positive"] + 0.005
    out["sparse_plateau"] = bool(out["plateau_found"] and form == "two modes" and out["positive_fraction"] > cap)
    runs = {name: [cell / prec / "rollouts" / name / f"seed{s}" for s in seeds]
            for name, prec in (("full", "bf16"), ("quant", scheme), ("oracle-k0.4", scheme))}
    got = {k: _success(v) for k, v in runs.items()}
    full, quant = got["full"], got["quant"]
    out |= {"full": None, "quant": None, "gap": None, "oracle_k0.4": None, "oracle_recovered": None}
    if full is not None and quant is not None:
        f, q = paired.aligned(full, quant)
        out |= {"full": 100 * f.mean(), "quant": 100 * q.mean(), "gap": 100 * (f.mean() - q.mean()),
                "tasks": len(f)}
        if got["oracle-k0.4"] is not None:
            f, q, o = paired.aligned(full, quant, got["oracle-k0.4"])
            out["oracle_k0.4"] = 100 * o.mean()
            out["oracle_recovered"] = paired.recovered(o, f, q)["share"] if f.mean() > q.mean() else None
    out["a_gap"] = bool(out["gap"] is not None and out["gap"] >= GAP)
    out["b_plateau"] = bool(out["sparse_plateau"])
    out["c_oracle"] = bool(out["oracle_recovered"] is not None and out["oracle_recovered"] >= RECOVERED)
    return out


def table(cell: Path, schemes: list[str], seeds: list[int], step_types: list[str] | None = None) -> pl.DataFrame:
    rows = [r for s in schemes if (r := row(cell, s, seeds, step_types)) is not None]
    if not rows:
        raise ValueError(f"{cell}: none of {schemes} has a KL pool (kl/threshold.json); build them first")
    return pl.DataFrame(rows, infer_schema_length=None)


def _fmt(v, pct=False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if pct:
        return f"{v:.1f}"
    return f"{v:.2g}" if isinstance(v, float) else str(v)


def markdown(df: pl.DataFrame, title: str) -> str:
    head = ["scheme", "top-1 agree", "bf16 entropy p50 / p90", "KL p50 / p90 / p99", "histogram",
            "plateau (density, positives)", "Full", "Quant", "oracle@0.4 (recovered)", "(a) (b) (c)"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in df.iter_rows(named=True):
        hist = r["shape"] + (f", valley {r['valley']:.0%}" if r["valley"] is not None else "")
        plateau = ("found" if r["plateau_found"] else "fallback") + \
            f" ({r['plateau_density']:.2f}, {r['positive_fraction']:.1%})"
        oracle = "–" if r["oracle_k0.4"] is None else \
            f"{r['oracle_k0.4']:.1f} ({_fmt(None if r['oracle_recovered'] is None else 100 * r['oracle_recovered'], True)}%)"
        lines.append("| " + " | ".join([
            r["scheme"], _fmt(r["top1_agreement"]), f"{_fmt(r['bf16_entropy_p50'])} / {_fmt(r['bf16_entropy_p90'])}",
            f"{r['kl_p50']:.2g} / {r['kl_p90']:.2g} / {r['kl_p99']:.2g}", hist,
            plateau, _fmt(r["full"], True), _fmt(r["quant"], True), oracle,
            " ".join(_fmt(r[k]) for k in ("a_gap", "b_plateau", "c_oracle"))]) + " |")
    lines += ["", f"(a) Full − Quant ≥ {GAP:g} points; (b) a sparse plateau: the plateau rule finds one, the histogram has "
              "two modes, and the plateau labels more than the rule's min_positive cap (a plateau at the cap is the "
              "edge of a tail); (c) the KL oracle "
              f"at K = 0.4 recovers ≥ {RECOVERED:.0%} of the gap (routed schemes only). Success in % on the same "
              "(seed, task) pairs; top-1 agree: share of the KL pool's steps where the two precisions' argmax "
              "tokens agree at every position of bf16's action; bf16 entropy: its mean token entropy over its action at each "
              "step of the pool, in nats.",
              ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", required=True, type=Path, help="results/{benchmark}/{model}")
    p.add_argument("--schemes", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--step-types", nargs="+", default=None, help="the routed step types (the KL pool's rows)")
    p.add_argument("--out", required=True, type=Path, help="table .parquet (a .md is written beside it)")
    a = p.parse_args(argv)
    df = table(a.cell, a.schemes, a.seeds, a.step_types)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.out)
    a.out.with_suffix(".md").write_text(markdown(df, f"The paper's regime: {a.cell.parent.name}/{a.cell.name}"))
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
