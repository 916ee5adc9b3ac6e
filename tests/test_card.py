"""Agent cards (dmr.card): a selected checkpoint with its card, and its install under agents/."""
from __future__ import annotations

import json

import polars as pl

from dmr import card


def _card(tmp_path, full_seeds, tasks_per_seed):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    metrics = tmp_path / "train_metrics.json"
    metrics.write_text(json.dumps({"params": 10, "steps": 3000, "planned_steps": 3000, "capped": False,
                                   "minutes": 40.0, "curve": [[1, 2.0]]}))
    select = tmp_path / "select.parquet"
    pl.DataFrame({"candidate": ["p0.50", "p1.00"], "success": [20.0, 45.0], "chosen": [False, True]}).write_parquet(select)
    full = []
    for seed in full_seeds:
        full.append(tmp_path / f"full{seed}.parquet")
        pl.DataFrame({"seed": [seed] * 4, "won": [True, False, True, True], "steps": [10, 50, 12, 14]}).write_parquet(full[-1])
    if tasks_per_seed == "same":  # a fixed split: the run records what `test` resolved to
        (tmp_path / "run.json").write_text(json.dumps({"split": "test", "env_splits": {"test": "valid_seen[1::2]"}}))
    recipe = {"model": {"source": "train"}, "benchmark": {"env": "alfworld", "tasks_per_seed": tasks_per_seed}}
    out = tmp_path / "card"
    card.main(["build", "--name", "tiny_alfworld", "--benchmark", "alfworld", "--model", str(model),
               "--train-metrics", str(metrics), "--select-table", str(select), "--full", *map(str, full),
               "--recipe", json.dumps(recipe), "--configs", "config/alfworld.yaml", "config/alfworld-agent.yaml",
               "--out", str(out)])
    return out


def test_card_names_the_configs_that_built_it(tmp_path):
    out = _card(tmp_path, [0], "same")
    text = (out / "README.md").read_text()
    meta = json.loads((out / card.CARD).read_text())
    assert meta["configs"] == ["config/alfworld.yaml", "config/alfworld-agent.yaml"] and "curve" not in meta["training"]
    assert text.startswith("# tiny_alfworld: a tiny alfworld agent")
    assert "`snakemake agents --configfile config/alfworld.yaml config/alfworld-agent.yaml`" in text
    assert "(`config/alfworld.yaml config/alfworld-agent.yaml`):" in text and "config/config.yaml" not in text
    assert "over 1 seed: **75.0%**" in text and "every seed the same test tasks" in text
    assert "| p1.00 | 45.0 |" in text and "**p1.00**" in text and "Test split: valid_seen[1::2]." in text
    card.main(["install", str(out), "--to", str(tmp_path / "agents")])
    assert (tmp_path / "agents/tiny_alfworld/config.json").exists()


def test_card_of_seeds_with_their_own_tasks(tmp_path):
    text = (_card(tmp_path, [0, 1], "distinct") / "README.md").read_text()
    assert "over 2 seeds: **75.0%**" in text and "each seed its own test tasks" in text and "Test split" not in text
