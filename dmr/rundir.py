"""A run directory of the agent loop (dmr.agent): its files, how a killed run resumes, and what is
read off a finished one.

Layout: steps.jsonl and episodes.jsonl, appended as the run goes; spec.json, the spec the run was
started with (a directory resumes only a run of the same spec); once finished, steps.parquet,
episodes.parquet and run.json (the run's metadata).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

STEPS, EPISODES = "steps.jsonl", "episodes.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line from a killed writer is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def rewrite(path: Path, rows: list[dict]) -> None:
    """Replace a JSONL file by `rows`, atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def fingerprint(path: str) -> dict:
    """Identity of a checkpoint directory (or file) without hashing gigabytes: sizes and mtimes."""
    p = Path(path)
    if p.is_file():
        return {"path": str(path), "file": [p.stat().st_size, int(p.stat().st_mtime)]}
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    return {"path": str(path), "files": {str(f.relative_to(p)): [f.stat().st_size, int(f.stat().st_mtime)] for f in files}}


def claim(out: Path, spec: dict) -> None:
    """Resume only a run of the same spec (models, policy, tasks, decoding). A run directory left by
    a different spec (e.g. a retrained model) is moved aside, never mixed in and never deleted."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "spec.json"
    if path.exists() and json.loads(path.read_text()) != spec:
        stale = out / f"stale-{time.strftime('%Y%m%d-%H%M%S')}"
        stale.mkdir()
        for name in (STEPS, EPISODES, "spec.json", "run.json", "steps.parquet", "episodes.parquet"):
            if (out / name).exists():
                os.replace(out / name, stale / name)
        print(f"{out}: the previous run had another spec; moved it to {stale}")
    path.write_text(json.dumps(spec, indent=1, sort_keys=True))


def resume(out: Path) -> set[str]:
    """Keys of finished episodes; drops every trace of unfinished ones from disk."""
    episodes = read_jsonl(out / EPISODES)
    done = {e["task"] for e in episodes}
    rewrite(out / EPISODES, episodes)
    rewrite(out / STEPS, [s for s in read_jsonl(out / STEPS) if s["task"] in done])
    return done


def finalize(out: Path, meta: dict) -> None:
    """Parquet copies of the finished run, plus the run's metadata."""
    import polars as pl

    pl.DataFrame(read_jsonl(out / STEPS), infer_schema_length=None).write_parquet(out / "steps.parquet")
    pl.DataFrame(read_jsonl(out / EPISODES), infer_schema_length=None).write_parquet(out / "episodes.parquet")
    (out / "run.json").write_text(json.dumps(meta, indent=1))


def announced_steps(steps: pl.DataFrame, types) -> pl.DataFrame:
    """The steps announced as one of `types` before generation (what a step-type gate saw; runs
    recorded before `announced_type` existed fall back to the recorded step type)."""
    import polars as pl

    col = "announced_type" if "announced_type" in steps.columns else "step_type"
    return steps.filter(pl.col(col).is_in(list(types)))


def high_fraction(episodes: pl.DataFrame) -> float:
    """Share of a run's LLM calls that went to the high precision (`episodes`: its episodes table)."""
    return float(episodes["high_calls"].sum() / max(1, episodes["calls"].sum()))
