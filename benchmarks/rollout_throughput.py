"""Rollout throughput of the agent loop: episodes/s with 1 shard vs N batched shards.

Prints figures to compare as ratios (this machine is noisy); nothing is asserted. Besides wall-clock
rates it prints steps per CPU-second of this process, which a CPU shared with other jobs distorts
much less than wall time.

    python benchmarks/rollout_throughput.py --model results/household/tiny/bf16/model

`--breakdown` also times every forward of the HF model and prints, per agent step, the wall time in
prefills (a step's new tokens), in decodes (one generated token for every row) and outside the
model, with how much of each batch is real tokens rather than padding. That splits a batched step
into what batching amortises (per-call work) and what it cannot (per-row compute).
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

from dmr import envs, llm
from dmr.agent import AgentConfig, run
from dmr.policies import make_router


class ForwardTimer:
    """Times the HF model's forwards by kind: a prefill feeds several tokens per row, a decode one."""

    def __init__(self, backend):
        self.model, self.forward = backend.model, backend.model.forward
        self.model.forward = self
        self.reset()

    def reset(self):
        # kind -> [calls, seconds, rows, real new tokens, new-token slots, real KV tokens, KV slots]
        self.stats = collections.defaultdict(lambda: [0, 0.0, 0, 0, 0, 0, 0])

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.forward(*args, **kwargs)
        dt = time.perf_counter() - t0
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        B, w = ids.shape
        s = self.stats["prefill" if w > 1 else "decode"]
        s[0] += 1
        s[1] += dt
        s[2] += B
        s[3] += int(mask[:, -w:].sum())
        s[4] += B * w
        s[5] += int(mask.sum())
        s[6] += mask.numel()
        return out

    def report(self, steps: int, elapsed: float) -> str:
        lines, inside = [], 0.0
        for kind, (calls, sec, rows, new, new_slots, kv, kv_slots) in sorted(self.stats.items()):
            inside += sec
            lines.append(f"    {kind:7s} {sec / steps * 1e3:6.2f} ms/step  {calls / steps:5.2f} calls/step  "
                         f"{sec / calls * 1e3:6.2f} ms/call  rows/call {rows / calls:5.1f}  "
                         f"new tokens real {new / new_slots:4.0%}  KV real {kv / kv_slots:4.0%}")
        lines.append(f"    outside the model {(elapsed - inside) / steps * 1e3:6.2f} ms/step")
        return "\n".join(lines)


def measure(backend, env_kwargs, n: int, shards: int, prompt: dict, constrained: bool,
            timer: ForwardTimer | None = None) -> tuple[float, float, float]:
    tasks = envs.make("household", **env_kwargs).tasks("test", n, offset=10_000)
    cfg = AgentConfig(prompt=prompt, max_new_tokens=24, constrained=constrained, shards=shards)
    if timer is not None:
        timer.reset()
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        rows = run(lambda: envs.make("household", **env_kwargs), tasks, {"bf16": backend},
                   make_router("full", ["bf16"]), cfg, Path(d), progress=False)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = sum(r["steps"] for r in rows)
    if timer is not None:
        print(f"shards={shards:3d}  {elapsed / steps * 1e3:.2f} ms/step:")
        print(timer.report(steps, elapsed))
    return len(rows) / elapsed, steps / elapsed, steps / cpu


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="tiny agent checkpoint (HF directory)")
    p.add_argument("--episodes", type=int, default=100, help="held-out tasks; 100 as the evaluate rule")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=json.loads, default={"style": "react"})
    p.add_argument("--constrained", action="store_true", help="decode only admissible actions")
    p.add_argument("--breakdown", action="store_true", help="time the model's forwards per step (see above)")
    a = p.parse_args()
    backend = llm.load("hf", a.model, threads=a.threads)
    timer = ForwardTimer(backend) if a.breakdown else None
    results = {}
    for shards in a.shards:
        eps, steps, per_cpu = measure(backend, {"max_steps": a.max_steps}, a.episodes, shards, a.prompt, a.constrained,
                                      timer)
        results[shards] = (eps, per_cpu)
        print(f"shards={shards:3d}  episodes/s={eps:7.3f}  steps/s={steps:7.2f}  steps/cpu-s={per_cpu:7.2f}")
    base = results[a.shards[0]]
    for shards, (eps, per_cpu) in results.items():
        print(f"speedup {shards} vs {a.shards[0]} shards: {eps / base[0]:.2f}x wall, {per_cpu / base[1]:.2f}x per CPU-second")


if __name__ == "__main__":
    main()
