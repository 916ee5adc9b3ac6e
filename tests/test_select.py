"""Agent selection (dmr.select) and the training snapshots it chooses among (dmr.tiny_agent)."""
from __future__ import annotations

import json
import shutil

import polars as pl
import pytest

from dmr import select, tiny_agent


def _candidate(tmp_path, tiny_world, name):
    d = tmp_path / "train" / name
    shutil.copytree(tiny_world[2], d)
    return d


def _run(tmp_path, name, won):
    d = tmp_path / "select" / name
    d.mkdir(parents=True)
    pl.DataFrame({"won": won, "score": [float(w) for w in won], "steps": [10] * len(won)}).write_parquet(
        d / "episodes.parquet")
    return d


def test_selects_the_most_successful_candidate_and_copies_it(tmp_path, tiny_world):
    cands = {n: _candidate(tmp_path, tiny_world, n) for n in ("p0.60", "p0.80", "p1.00")}
    (cands["p0.80"] / "marker").write_text("p0.80")
    runs = {"p0.60": _run(tmp_path, "p0.60", [True, False, False, False]),
            "p0.80": _run(tmp_path, "p0.80", [True, True, True, False]),
            "p1.00": _run(tmp_path, "p1.00", [True, True, False, False])}
    out, table = tmp_path / "bf16/model", tmp_path / "tables/select.parquet"
    select.main([*sum((["--candidate", f"{n}={p}"] for n, p in cands.items()), []),
                 *sum((["--run", f"{n}={p}"] for n, p in runs.items()), []),
                 "--out", str(out), "--table", str(table)])
    df = pl.read_parquet(table)
    assert df["success"].to_list() == [25.0, 75.0, 50.0]
    assert df.filter(pl.col("chosen"))["candidate"].to_list() == ["p0.80"]
    assert (out / "marker").read_text() == "p0.80"
    assert json.loads((out / "selection.json").read_text())["chosen"] == "p0.80"
    assert "| p0.80 |" in table.with_suffix(".md").read_text()


def test_ties_go_to_the_later_candidate_and_one_candidate_needs_no_run(tmp_path, tiny_world):
    cands = {n: _candidate(tmp_path, tiny_world, n) for n in ("p0.50", "p1.00")}
    runs = {n: _run(tmp_path, n, [True, False]) for n in cands}
    assert select.rank(cands, runs).filter(pl.col("chosen"))["candidate"].to_list() == ["p1.00"]
    only = select.rank({"p1.00": cands["p1.00"]}, {})
    assert only["chosen"].to_list() == [True] and only["episodes"].to_list() == [0]
    with pytest.raises(SystemExit, match="no --run"):
        select.rank(cands, {"p1.00": runs["p1.00"]})
    with pytest.raises(SystemExit, match="not a model directory"):
        select.rank({"p1.00": tmp_path}, {})


def test_training_snapshots_at_fractions_of_its_steps(tmp_path, tiny_world):
    from transformers import AutoTokenizer

    from dmr import prompts
    from dmr.expert import read_episodes

    eps, tok, _ = tiny_world

    def train(out, **kw):
        return tiny_agent.train(read_episodes(eps), AutoTokenizer.from_pretrained(tok), out / "p1.00",
                                style=prompts.get("react"), arch={"hidden_size": 128, "intermediate_size": 256,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "head_dim": 64}, batch_tokens=2048, lr=1e-3, warmup=1, seed=0, threads=1,
                                snapshots=out, **kw)

    # A run cut short by its time cap still leaves every configured snapshot (of its end).
    m = train(tmp_path / "capped", steps=1000, max_minutes=1e-4, snapshot_at=(0.5, 0.9))
    assert m["steps"] < 1000 and m["capped"] and m["planned_steps"] == 1000
    assert {p.name for p in (tmp_path / "capped").iterdir()} == {"p0.50", "p0.90", "p1.00"}
    m = train(tmp_path, steps=4, max_minutes=5, snapshot_at=(0.5, 0.75))
    assert m["steps"] == 4 and not m["capped"]
    assert json.loads((tmp_path / "p0.50/snapshot.json").read_text())["step"] == 2
    assert json.loads((tmp_path / "p0.75/snapshot.json").read_text())["step"] == 3
    snap = (tmp_path / "p0.50/model.safetensors").read_bytes()
    assert snap != (tmp_path / "p1.00/model.safetensors").read_bytes()  # trained on after the snapshot
    assert json.loads((tmp_path / "p0.50/config.json").read_text())["dtype"] == "bfloat16"
