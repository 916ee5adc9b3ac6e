"""Agent cards: a trained tiny agent as a shippable artefact (`make agents`).

`build` copies the selected bf16 checkpoint (weights and tokenizer) into a card directory beside
`card.json` and a Markdown model card: the recipe and config that made it, its training data and
validation loss, whether the safety cap cut its training, the selection table, its Full success
per test seed, and the commit and library versions that built it. `install` copies card
directories into the project's `agents/` folder, where the default config starts from them.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
from pathlib import Path

import polars as pl

from dmr.evaluate import env_splits

CARD = "card.json"


def commit() -> str:
    """The commit that built the agent, marked `+dirty` when the work tree had changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.machine()}


def full_success(runs: list[Path]) -> list[dict]:
    """Per Full run: its seed, test tasks, success and mean steps, and the split the environment
    resolved `test` to where the run records it (ALFWorld: valid_unseen or half of valid_seen)."""
    out = []
    for path in runs:
        eps = pl.read_parquet(path)
        split = env_splits({"full": [path]}).get("test")
        out.append({"seed": int(eps["seed"][0]) if "seed" in eps.columns and len(eps) else None,
                    "tasks": len(eps), "success": 100.0 * float(eps["won"].mean()), "steps": float(eps["steps"].mean()),
                    "split": split})
    return out


def card_markdown(c: dict) -> str:
    t, sel = c["training"], c["selection"]
    configs = " ".join(c.get("configs") or ["config/config.yaml"])
    lines = [f"# {c['name']}: a tiny {c['benchmark']} agent", "",
             "A tiny Qwen3-architecture agent trained by behaviour cloning on expert episodes of the "
             f"`{c['benchmark']}` benchmark (`snakemake agents --configfile {configs}`). Weights in bf16 with "
             "their tokenizer.", "",
             "## Result", "",
             "| seed | test tasks | Full success (%) | mean steps |", "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['tasks']} | {r['success']:.1f} | {r['steps']:.1f} |" for r in c["full"]]
    if splits := sorted({r["split"] for r in c["full"] if r.get("split")}):
        lines += ["", f"Test split: {', '.join(splits)}."]
    if c["full"]:
        mean = sum(r["success"] for r in c["full"]) / len(c["full"])
        same = c["recipe"].get("benchmark", {}).get("tasks_per_seed") == "same"
        lines += ["", f"Mean Full success over {len(c['full'])} seed{'s' * (len(c['full']) > 1)}: **{mean:.1f}%** "
                  "(greedy as configured, " + ("every seed the same test tasks)." if same else
                                               "each seed its own test tasks).")]
    lines += ["", "## Training", "",
              f"- parameters: {t.get('params')}",
              f"- optimizer steps: {t.get('steps')} of {t.get('planned_steps', t.get('steps'))} planned"
              + (" (**cut by the safety cap**)" if t.get("capped") else ""),
              f"- wall time: {t.get('minutes', 0):.1f} minutes",
              f"- training sequences: {t.get('train_sequences')}, validation sequences: {t.get('val_sequences')}",
              f"- validation answer loss: {t.get('val_answer_loss', float('nan')):.4f}",
              f"- supervised answer tokens: {t.get('supervised_tokens')}, context weight {t.get('context_weight')}, "
              f"noise weight {t.get('noise_weight', t.get('context_weight'))}",
              "", "## Selection", "",
              f"Candidates played the first calibration tasks; the most successful was kept: **{sel['chosen']}**.", "",
              "| candidate | calibration success (%) |", "|---|---|"]
    lines += [f"| {r['candidate']} | " + ("–" if r["success"] is None else f"{r['success']:.1f}") + " |"
              for r in sel["table"]]
    lines += ["", "## Recipe", "", f"The model and benchmark config that made it (`{configs}`):", "",
              "```json", json.dumps(c["recipe"], indent=1), "```", "",
              "## Provenance", "",
              f"- built at commit `{c['commit']}`",
              "- " + ", ".join(f"{k} {v}" for k, v in c["versions"].items()),
              "", "Retraining runs the same recipe and seed. The training loop is "
              "seeded and stops by steps, not time, so the same machine and library versions give the same "
              "optimisation path; bitwise-equal weights across machines or thread counts are not promised "
              "(CPU matmul kernels may sum in another order), and greedy success can move by a few points "
              "between checkpoints that close."]
    return "\n".join(lines) + "\n"


def build(a) -> dict:
    model, out = Path(a.model), Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model, out)
    train_metrics = json.loads(Path(a.train_metrics).read_text())
    train_metrics.pop("curve", None)
    sel = pl.read_parquet(a.select_table) if a.select_table else None
    rows = list(sel.iter_rows(named=True)) if sel is not None else []
    c = {"name": a.name, "benchmark": a.benchmark, "recipe": json.loads(a.recipe), "training": train_metrics,
         "selection": {"chosen": next((r["candidate"] for r in rows if r["chosen"]), "p1.00"),
                       "table": [{"candidate": r["candidate"], "success": r["success"]} for r in rows]},
         "full": full_success([Path(p) for p in a.full]), "configs": a.configs, "commit": commit(),
         "versions": versions()}
    (out / CARD).write_text(json.dumps(c, indent=1) + "\n")
    (out / "README.md").write_text(card_markdown(c))
    return c


def install(cards: list[Path], to: Path) -> None:
    for card in cards:
        meta = json.loads((card / CARD).read_text())
        dest = to / meta["name"]
        if dest.exists():
            shutil.rmtree(dest)
        # Snakemake's marker of a directory output is not part of the artefact.
        shutil.copytree(card, dest, ignore=shutil.ignore_patterns(".snakemake_timestamp"))
        print(f"installed {card} -> {dest}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="a card directory from a selected checkpoint")
    b.add_argument("--name", required=True, help="the agent's config name (models.NAME)")
    b.add_argument("--benchmark", required=True)
    b.add_argument("--model", required=True, help="the selected bf16 checkpoint directory")
    b.add_argument("--train-metrics", required=True, help="train_metrics.json of the final training run")
    b.add_argument("--select-table", default=None, help="select.parquet (dmr.select)")
    b.add_argument("--full", nargs="*", default=[], help="episodes.parquet of the Full runs, one per seed")
    b.add_argument("--recipe", required=True, help="JSON: the model and benchmark config")
    b.add_argument("--configs", nargs="*", default=[], help="the config files of the run that built it")
    b.add_argument("--out", required=True)
    i = sub.add_parser("install", help="copy card directories into the agents folder")
    i.add_argument("cards", nargs="+", type=Path)
    i.add_argument("--to", type=Path, default=Path("agents"))
    a = p.parse_args(argv)
    if a.cmd == "build":
        c = build(a)
        print(json.dumps({k: c[k] for k in ("name", "full", "commit")}))
    else:
        install(a.cards, a.to)


if __name__ == "__main__":
    main()
