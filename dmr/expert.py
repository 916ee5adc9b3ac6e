"""Behaviour-cloning data: expert episodes on the train split, with DAgger-style noise.

With probability `noise` the executed action is a random admissible one, but every recorded step
is labelled with the expert's action from the state actually reached, so the agent sees how to
recover from states off the expert path. A share `repeat` of the noise instead repeats the previous
action, the mistake a cloned agent makes most (in ALFWorld's grammar mostly "go to X" on arriving at
X, which the environment answers "Nothing happens."): admissible noise alone never shows the agent
an invalid step, so it never learns to leave one and loops on it until the step limit.

A fixed benchmark split smaller than `--episodes` (ALFWorld's 200 valid_train games) is played
in passes: episode i plays game i mod the split size, each pass with fresh noise.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from tqdm import tqdm

from dmr import envs


def episode(env, task, noise: float, rng: random.Random, repeat: float = 0.0, invalid: float = 0.0,
            foreign: list[str] | None = None) -> dict:
    """One expert episode with noise. `foreign`: actions admissible in another episode, the pool of
    the `invalid` noise (well-formed actions naming things that are not here, as a cloned agent's
    hallucinated ids are)."""
    first = env.reset(task)
    steps, obs, admissible = [], first.text, first.admissible
    while True:
        label = env.expert_action()
        source = getattr(env, "expert_source", None)
        action = label
        if rng.random() < noise:
            u = rng.random() if repeat or invalid else 1.0
            elsewhere = [a for a in foreign or () if a not in admissible] if u >= repeat else []
            if u < repeat and steps:
                action = steps[-1]["action"]
            elif u < repeat + invalid and elsewhere:
                action = rng.choice(elsewhere)
            elif admissible:
                action = rng.choice(admissible)
        tr = env.step(action)
        steps.append({"obs": obs, "admissible": admissible, "label": label, "action": action,
                      "next_obs": tr.text} | ({"source": source} if source else {}))
        obs, admissible = tr.text, tr.admissible
        if tr.done:
            return {"task": task.key, "task_type": task.task_type, "goal": first.goal, "first": first.text,
                    "won": tr.won, "steps": steps}


def help_report(episodes: list[dict], seconds: float) -> str:
    """Which expert labelled the episodes, where the environment says (`expert_source`: real ALFWorld's
    handcoded expert with the planner taking over when it fails), and the time per episode."""
    n = len(episodes)
    line = f"{n} expert episodes in {seconds:.0f} s ({seconds / max(n, 1):.2f} s each)"
    sourced = [ep for ep in episodes if any("source" in s for s in ep["steps"])]
    if not sourced:
        return line
    helped = sum(any(s.get("source") in ("walkthrough", "planner") for s in ep["steps"]) for ep in sourced)
    steps = [s.get("source") for ep in sourced for s in ep["steps"]]
    shares = ", ".join(f"{k} {steps.count(k) / len(steps):.1%}" for k in sorted(set(steps), key=str))
    return (f"{line}; the walkthrough or planner labelled steps of {helped} of {len(sourced)} episodes "
            f"({helped / len(sourced):.1%}); labels by source: {shares}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--env", required=True, help="environment name, e.g. household")
    p.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments of the environment")
    p.add_argument("--episodes", type=int, required=True, help="number of train-split tasks")
    p.add_argument("--noise", type=float, default=0.0, help="probability of a random executed action")
    p.add_argument("--repeat", type=float, default=0.0,
                   help="share of the noisy actions that repeat the previous action instead (invalid steps)")
    p.add_argument("--invalid", type=float, default=0.0,
                   help="share of the noisy actions that are admissible elsewhere but not here (invalid steps)")
    p.add_argument("--clean-fraction", type=float, default=0.5,
                   help="fraction of episodes run without noise (pure expert trajectories)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="output JSONL, one episode per line")
    a = p.parse_args(argv)
    env = envs.make(a.env, **json.loads(a.env_kwargs))
    rng = random.Random(a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    won = 0
    size = env.split_size("train") if hasattr(env, "split_size") else None
    pool = env.tasks("train", a.episodes if size is None else min(a.episodes, size))
    foreign: list[str] = []
    start, episodes, skipped = time.perf_counter(), [], []
    with tmp.open("w") as f:
        for i in tqdm(range(a.episodes), desc="expert episodes"):
            task = pool[i % len(pool)]
            noise = 0.0 if i < a.clean_fraction * a.episodes else a.noise
            try:
                ep = episode(env, task, noise, rng, a.repeat, a.invalid, foreign)
            except envs.ExpertFailed as e:  # one unplannable state must not cost the whole run
                skipped.append(task.key)
                tqdm.write(f"skipped episode {i} ({task.key}): {e}")
                continue
            foreign = sorted({x for s in ep["steps"] for x in s["admissible"] if "<" not in x})
            won += ep["won"]
            # what help_report reads: each step's expert, not the episode's text
            episodes.append({"steps": [{"source": s["source"]} for s in ep["steps"] if "source" in s]})
            f.write(json.dumps(ep) + "\n")
    if not episodes:
        raise SystemExit(f"the expert failed on all {a.episodes} episodes; nothing written to {a.out}")
    tmp.rename(a.out)
    print(help_report(episodes, time.perf_counter() - start))
    if skipped:
        print(f"skipped {len(skipped)} of {a.episodes} episodes where the expert failed: {', '.join(skipped)}")
    print(f"{won}/{len(episodes)} expert episodes won -> {a.out}")


if __name__ == "__main__":
    main()


def sequences(ep: dict, style, tokenizer):
    """Behaviour-cloning sequences of one recorded episode, in the prompt style the agent runs with."""
    return style.segments(tokenizer, ep["goal"], ep["first"], ep["steps"])


def read_episodes(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
