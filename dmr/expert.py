"""Behaviour-cloning data: expert episodes on the train split, with DAgger-style noise.

With probability `noise` the executed action is a random admissible one, but every recorded step
is labelled with the expert's action from the state actually reached, so the agent sees how to
recover from states off the expert path. A share `repeat` of the noise instead repeats the previous
action, the mistake a cloned agent makes most (in ALFWorld's grammar mostly "go to X" on arriving at
X, which the environment answers "Nothing happens."): admissible noise alone never shows the agent
an invalid step, so it never learns to leave one and loops on it until the step limit.

A fixed benchmark split smaller than `--episodes` (ALFWorld's 200 valid_train games) is played
in passes: episode i plays game i mod the split size, each pass with fresh noise.

`--block B` cuts the episodes into blocks of B, each with its own noise stream (the first seeded
as the single stream is, the others by the seed and the block's index), so `--workers` processes
can play blocks side by side and the data do not depend on how many there are. Without a block
the episodes are one stream (the shipped agents' data). Real ALFWorld needs blocks: its expert
takes about 3 s a game.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import ProcessPoolExecutor
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


_ENV = None  # one environment per worker process, built once by _init


def _init(name: str, kwargs: dict):
    global _ENV
    _ENV = envs.make(name, **kwargs)


def play(env, tasks: list, noises: list[float], rng: random.Random, repeat: float, invalid: float):
    """One noise stream: the episodes of `tasks` in order (each one's `foreign` pool is the actions of
    the episode before it), with the tasks the expert failed on. Yields (episode or None, task)."""
    foreign: list[str] = []
    for task, noise in zip(tasks, noises):
        try:
            ep = episode(env, task, noise, rng, repeat, invalid, foreign)
        except envs.ExpertFailed as e:  # one unplannable state must not cost the whole run
            yield None, f"{task.key}: {e}"
            continue
        foreign = sorted({x for s in ep["steps"] for x in s["admissible"] if "<" not in x})
        yield ep, task.key


def _worker_block(job):
    """A block played in a worker process, whole (its episodes cross back to the parent)."""
    tasks, noises, seed, repeat, invalid = job
    return list(play(_ENV, tasks, noises, random.Random(seed), repeat, invalid))


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
    p.add_argument("--block", type=int, default=None,
                   help="episodes per noise stream (default: one stream); the data depend on it, not on --workers")
    p.add_argument("--workers", type=int, default=1, help="processes playing blocks side by side (needs --block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="output JSONL, one episode per line")
    a = p.parse_args(argv)
    if a.block is not None and a.block < 1 or a.workers < 1:
        p.error(f"--block and --workers must be at least 1 (got {a.block}, {a.workers})")
    if a.workers > 1 and a.block is None:
        p.error("--workers needs --block: one noise stream plays in one process")
    kwargs = json.loads(a.env_kwargs)
    env = envs.make(a.env, **kwargs)
    size = env.split_size("train") if hasattr(env, "split_size") else None
    pool = env.tasks("train", a.episodes if size is None else min(a.episodes, size))
    tasks = [pool[i % len(pool)] for i in range(a.episodes)]
    noises = [0.0 if i < a.clean_fraction * a.episodes else a.noise for i in range(a.episodes)]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    start, won, episodes, skipped = time.perf_counter(), 0, [], []
    bar, executor = tqdm(total=a.episodes, desc="expert episodes"), None
    block = a.block or a.episodes  # no block: one stream, the first block's seed
    seeds = [a.seed] + [f"{a.seed}:{k}" for k in range(1, -(-a.episodes // block))]
    jobs = [(tasks[i:i + block], noises[i:i + block], seed, a.repeat, a.invalid)
            for seed, i in zip(seeds, range(0, a.episodes, block))]
    if a.workers == 1:  # in this process, episode by episode on its environment
        results = (play(env, t, n, random.Random(seed), rep, inv) for t, n, seed, rep, inv in jobs)
    else:
        executor = ProcessPoolExecutor(a.workers, initializer=_init, initargs=(a.env, kwargs))
        results = executor.map(_worker_block, jobs)  # in block order: the file does not depend on timing
    with tmp.open("w") as f:
        for block in results:
            for ep, key in block:
                bar.update()
                if ep is None:
                    skipped.append(key)
                    tqdm.write(f"skipped {key}")
                    continue
                won += ep["won"]
                # what help_report reads: each step's expert, not the episode's text
                episodes.append({"steps": [{"source": s["source"]} for s in ep["steps"] if "source" in s]})
                f.write(json.dumps(ep) + "\n")
    bar.close()
    if executor:
        executor.shutdown()
    if not episodes:
        raise SystemExit(f"the expert failed on all {a.episodes} episodes; nothing written to {a.out}")
    tmp.rename(a.out)
    print(help_report(episodes, time.perf_counter() - start))
    if skipped:
        print(f"skipped {len(skipped)} of {a.episodes} episodes where the expert failed: {'; '.join(skipped)}")
    print(f"{won}/{len(episodes)} expert episodes won -> {a.out}")


if __name__ == "__main__":
    main()


def sequences(ep: dict, style, tokenizer):
    """Behaviour-cloning sequences of one recorded episode, in the prompt style the agent runs with."""
    return style.segments(tokenizer, ep["goal"], ep["first"], ep["steps"])


def read_episodes(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
