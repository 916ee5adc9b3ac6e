"""Router latency per decision (paper App. A.2): the whole decide() with the per-episode cache, and
the Transformer pass alone, at batch 1 and 16.

Like the paper, times a randomly initialized default router (8 layers, d_model 128, window 50):
latency does not depend on the weights. Per decision = call time / batch. Prints figures; nothing
is asserted.

    python benchmarks/router_latency.py --steps 50 --episodes 2
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from dmr.router import Router, RouterNet, StepEncoder, pad_windows, param_count
from dmr.routing import StepContext

PLACES = ["countertop 1", "countertop 2", "fridge 1", "cabinet 3", "sinkbasin 1", "microwave 1", "drawer 2",
          "shelf 1", "diningtable 1", "stoveburner 2", "garbagecan 1", "coffeemachine 1"]
THINGS = ["apple", "knife", "mug", "plate", "egg", "bread", "spatula", "cup", "potato", "lettuce", "fork", "pan"]


def simulate(rng: random.Random, k: int, steps: int):
    """(goal, first observation, [(action, observation)]) of a household-like episode."""
    goal = f"Your task is to: put a clean {rng.choice(THINGS)} in {rng.choice(PLACES)}."
    first = ("You are in the middle of a room. Looking quickly around you, you see "
             + ", ".join(f"a {p}" for p in rng.sample(PLACES, 6)) + ".")
    moves = []
    for _ in range(steps):
        place = rng.choice(PLACES)
        seen = [f"a {t} {rng.randint(1, 3)}" for t in rng.sample(THINGS, rng.randint(1, 4))]
        obs = f"On the {place}, you see {', '.join(seen[:-1]) + ', and ' if len(seen) > 1 else ''}{seen[-1]}."
        moves.append((f"go to {place}", obs))
    return goal, first, moves


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def run(router: Router, batch: int, steps: int, rounds: int, repeats: int, seed: int):
    """(per-decision decide() times, per-decision Transformer-pass times), seconds."""
    rng = random.Random(seed)
    decide, net_pass = [], []
    for r in range(rounds):
        eps = [simulate(rng, k, steps) for k in range(batch)]
        for t in range(steps):
            contexts = [StepContext(f"r{r}/e{k}", t, g, m[:t], m[t - 1][1] if t else f, [], first=f)
                        for k, (g, f, m) in enumerate(eps)]
            t0 = time.perf_counter()
            router.decide(contexts)
            decide.append((time.perf_counter() - t0) / batch)
            embs = [router.cache[c.episode][2] for c in contexts]
            with torch.inference_mode():
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    router.net.probs(*pad_windows(embs, router.net.window))
                    net_pass.append((time.perf_counter() - t0) / batch)
        for k in range(batch):
            router.end_session(f"r{r}/e{k}")
    return decide, net_pass


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=50, help="steps per episode (the window is 50)")
    p.add_argument("--episodes", type=int, default=2, help="rounds of `batch` concurrent episodes per batch size")
    p.add_argument("--repeats", type=int, default=5, help="timed Transformer passes per step")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    router = Router(RouterNet(), StepEncoder(), ["bf16", "int4"])
    run(router, 1, 3, 1, 1, a.seed + 1)  # warm-up: first calls allocate
    print(f"router: {param_count(router.net):,} parameters (8 layers, d_model 128, window 50; random init); "
          f"torch threads {torch.get_num_threads()}; {a.steps} steps per episode")
    print(f"{'per decision, ms':<26}{'batch':>6}{'p50':>8}{'p95':>8}{'n':>7}")
    for batch in a.batches:
        decide, net_pass = run(router, batch, a.steps, a.episodes, a.repeats, a.seed)
        for name, xs in (("decide (encoder + cache)", decide), ("Transformer pass alone", net_pass)):
            print(f"{name:<26}{batch:>6}{1e3 * statistics.median(xs):>8.2f}{1e3 * pct(xs, 0.95):>8.2f}{len(xs):>7}")


if __name__ == "__main__":
    main()
