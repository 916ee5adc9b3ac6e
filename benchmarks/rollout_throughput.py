"""Rollout throughput of the agent loop: episodes/s with 1 shard vs N batched shards.

Prints figures to compare as ratios (this machine is noisy); nothing is asserted.

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


def measure(backend, env_kwargs, n: int, shards: int, prompt: dict) -> tuple[float, float]:
    tasks = envs.make("household", **env_kwargs).tasks("test", n, offset=10_000)
    cfg = AgentConfig(prompt=prompt, max_new_tokens=24, constrained=True, shards=shards)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        rows = run(lambda: envs.make("household", **env_kwargs), tasks, {"bf16": backend},
                   make_router("full", ["bf16"]), cfg, Path(d), progress=False)
        elapsed = time.perf_counter() - t0
    return len(rows) / elapsed, sum(r["steps"] for r in rows) / elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="tiny agent checkpoint (HF directory)")
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=json.loads, default={"style": "react"})
    a = p.parse_args()
    backend = llm.load("hf", a.model, threads=a.threads)
    results = {}
    for shards in a.shards:
        eps, steps = measure(backend, {"max_steps": a.max_steps}, a.episodes, shards, a.prompt)
        results[shards] = eps
        print(f"shards={shards:3d}  episodes/s={eps:7.3f}  steps/s={steps:7.2f}")
    base = results[a.shards[0]]
    for shards, eps in results.items():
        print(f"speedup {shards} vs {a.shards[0]} shards: {eps / base:.2f}x")


if __name__ == "__main__":
    main()
