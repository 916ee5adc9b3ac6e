"""Rollout throughput of the agent loop: episodes/s with 1 shard vs N batched shards.

Prints figures to compare as ratios (this machine is noisy); nothing is asserted. Besides wall-clock
rates it prints steps per CPU-second of this process, which a CPU shared with other jobs distorts
much less than wall time.

    python benchmarks/rollout_throughput.py --model results/household/tiny/bf16/model
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dmr import envs, llm
from dmr.agent import AgentConfig, run
from dmr.routing import make_router


def measure(backend, env_kwargs, n: int, shards: int, prompt: dict, constrained: bool) -> tuple[float, float, float]:
    tasks = envs.make("household", **env_kwargs).tasks("test", n, offset=10_000)
    cfg = AgentConfig(prompt=prompt, max_new_tokens=24, constrained=constrained, shards=shards)
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        rows = run(lambda: envs.make("household", **env_kwargs), tasks, {"bf16": backend},
                   make_router("full", ["bf16"]), cfg, Path(d), progress=False)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = sum(r["steps"] for r in rows)
    return len(rows) / elapsed, steps / elapsed, steps / cpu


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="tiny agent checkpoint (HF directory)")
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=json.loads, default={"style": "react"})
    p.add_argument("--constrained", action="store_true", help="decode only admissible actions")
    a = p.parse_args()
    backend = llm.load("hf", a.model, threads=a.threads)
    results = {}
    for shards in a.shards:
        eps, steps, per_cpu = measure(backend, {"max_steps": a.max_steps}, a.episodes, shards, a.prompt, a.constrained)
        results[shards] = (eps, per_cpu)
        print(f"shards={shards:3d}  episodes/s={eps:7.3f}  steps/s={steps:7.2f}  steps/cpu-s={per_cpu:7.2f}")
    base = results[a.shards[0]]
    for shards, (eps, per_cpu) in results.items():
        print(f"speedup {shards} vs {a.shards[0]} shards: {eps / base[0]:.2f}x wall, {per_cpu / base[1]:.2f}x per CPU-second")


if __name__ == "__main__":
    main()
