"""Agent selection on the calibration split: of the trained agent's candidates (snapshots taken
during behaviour cloning, and the final model), keep the one that wins most calibration episodes.

Why: greedy success of a ~1M-parameter cloned agent varies far more between training runs, and
between nearby checkpoints, than its validation loss shows (two runs of one recipe: 70% and 40%
test success at similar loss), while success on the calibration split ranks agents as test success
does. Selecting on calibration episodes is ordinary model selection on held-out data; the test
split is never looked at. Ties go to the later candidate (more training).

    python -m dmr.select --candidate p0.80=results/household/tiny/train/p0.80 \\
        --run p0.80=results/household/tiny/select/p0.80 ... --out results/household/tiny/bf16/model \\
        --table results/household/tiny/tables/select.parquet
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import polars as pl


def _pairs(items: list[str], flag: str) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} {item!r}: expected NAME=PATH")
        out[name] = Path(path)
    return out


def rank(candidates: dict[str, Path], runs: dict[str, Path]) -> pl.DataFrame:
    """One row per candidate: calibration success, score and steps, with the chosen one marked.
    A single candidate needs no run."""
    if not candidates:
        raise SystemExit("dmr.select: no --candidate given")
    missing = sorted(set(runs) - set(candidates))
    if missing:
        raise SystemExit(f"--run {missing}: no --candidate of that name")
    rows = []
    for order, (name, path) in enumerate(candidates.items()):
        if not (path / "config.json").exists():
            raise SystemExit(f"--candidate {name}={path}: not a model directory (no config.json)")
        row = {"candidate": name, "order": order, "path": str(path), "episodes": 0,
               "success": None, "score": None, "steps": None}
        meta = path / "snapshot.json"
        row["step"] = json.loads(meta.read_text())["step"] if meta.exists() else None
        if name in runs:
            eps = pl.read_parquet(runs[name] / "episodes.parquet")
            row.update(episodes=len(eps), success=100.0 * eps["won"].mean(), score=eps["score"].mean(),
                       steps=eps["steps"].mean())
        elif len(candidates) > 1:
            raise SystemExit(f"--candidate {name}: no --run of its calibration episodes to select on")
        rows.append(row)
    df = pl.DataFrame(rows, schema_overrides={"success": pl.Float64, "score": pl.Float64, "steps": pl.Float64,
                                              "step": pl.Int64})
    best = df.sort(["success", "order"], descending=True, nulls_last=True).row(0, named=True)["candidate"]
    return df.with_columns(chosen=pl.col("candidate") == best)


def markdown(df: pl.DataFrame) -> str:
    lines = ["| candidate | step | calibration episodes | success % | score | steps | chosen |",
             "|---|---|---|---|---|---|---|"]
    for r in df.iter_rows(named=True):
        def f(x, p=1):
            return "" if x is None else f"{x:.{p}f}"
        lines.append(f"| {r['candidate']} | {'' if r['step'] is None else r['step']} | {r['episodes']} | "
                     f"{f(r['success'])} | {f(r['score'], 3)} | {f(r['steps'])} | {'yes' if r['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", action="append", default=[], help="NAME=MODEL_DIR, in training order")
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR: calibration episodes of a candidate")
    p.add_argument("--out", required=True, type=Path, help="where the chosen model is copied (bf16 checkpoint)")
    p.add_argument("--table", required=True, type=Path, help="selection table (.parquet; a .md beside it)")
    a = p.parse_args(argv)
    df = rank(_pairs(a.candidate, "--candidate"), _pairs(a.run, "--run"))
    chosen = df.filter(pl.col("chosen")).row(0, named=True)
    if a.out.exists():
        shutil.rmtree(a.out)
    shutil.copytree(chosen["path"], a.out)
    (a.out / "selection.json").write_text(json.dumps({"chosen": chosen["candidate"], "from": chosen["path"],
                                                      "candidates": df.to_dicts()}, indent=1, default=str))
    a.table.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.table)
    a.table.with_suffix(".md").write_text(markdown(df))
    print(markdown(df))


if __name__ == "__main__":
    main()
