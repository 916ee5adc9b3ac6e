"""The agent loop: N episodes as concurrent shards, each step of all shards batched into one
backend call per precision.

Every step and every episode is appended to JSONL as it happens. A killed run resumes: finished
episodes are kept, the steps of the unfinished ones are dropped, and only unfinished tasks rerun,
so nothing is lost or repeated. The finished run is also written as parquet.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from dmr import envs, llm, prompts
from dmr.llm import Backend, Sampling
from dmr.prompts import Episode, constraint
from dmr.policies import KLProbe, OracleRouter, make_router
from dmr.routing import StepContext
from dmr.rundir import EPISODES, STEPS, claim, finalize, fingerprint, read_jsonl, resume


@dataclass
class AgentConfig:
    prompt: dict = field(default_factory=lambda: {"style": "react"})  # dmr.prompts.get(**prompt)
    max_new_tokens: int = 24
    temperature: float = 0.0
    top_p: float = 1.0
    constrained: bool = False  # decode only admissible actions (a protocol choice; stated in results)
    shards: int = 16
    seed: int = 0


@dataclass
class _Shard:
    env: object
    task: object = None
    ep: Episode | None = None
    step: int = 0
    time: float = 0.0
    tokens: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    step_type: str = "action"  # the upcoming step's type, as the environment announced it


def run(env_factory, tasks, backends: dict[str, Backend], router, cfg: AgentConfig, out: Path,
        progress: bool = True, high: str | None = "") -> list[dict]:
    """Run `tasks`, appending to out/steps.jsonl and out/episodes.jsonl. Returns the episode rows.

    `high` names the high-precision backend (default: the first); None when there is none."""
    out.mkdir(parents=True, exist_ok=True)
    done = resume(out)
    pending = deque(t for t in tasks if t.key not in done)
    shards = [_Shard(env_factory()) for _ in range(min(cfg.shards, len(pending)))]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc="episodes", disable=not progress)
    high = next(iter(backends)) if high == "" else high
    style = prompts.get(**cfg.prompt)
    call = 0
    with (out / STEPS).open("a") as steps_f, (out / EPISODES).open("a") as eps_f:
        while True:
            for s in shards:
                if s.task is None and pending:
                    s.task = pending.popleft()
                    first = s.env.reset(s.task)
                    s.ep = Episode(first.goal, first.text, [], first.admissible)
                    s.step_type = first.info.get("next_step_type", "action")
                    s.step, s.time, s.tokens, s.calls = 0, 0.0, {}, {}
            active = [s for s in shards if s.task is not None]
            if not active:
                break
            # The step type is known before generation (WebShop: a search page asks for a query), so
            # routing can force types it does not decide (App. C.1) to the high precision.
            contexts = [StepContext(s.task.key, s.step, s.ep.goal, s.ep.history, s.ep.observation, s.ep.admissible,
                                    step_type=s.step_type, first=s.ep.first) for s in active]
            t0 = time.perf_counter()
            decisions = router.decide(contexts)
            router_time = (time.perf_counter() - t0) / len(active)
            scores = getattr(router, "last_scores", None)
            probed = getattr(router, "last_kl", None)  # dmr.policies.KLProbe: measured, not acted on
            # A router that already decoded a step (the KL oracle's bf16 proposal) hands it over.
            ready = getattr(router, "generations", None) or {}
            outputs, call_time = {}, {}
            for i, c in enumerate(contexts):
                if (c.episode, c.step) in ready:
                    outputs[i], call_time[i] = ready[(c.episode, c.step)], 0.0
            for precision in dict.fromkeys(decisions):
                group = [i for i, d in enumerate(decisions) if d == precision and i not in outputs]
                if not group:
                    continue
                backend = backends[precision]
                texts = [style.render(backend.tokenizer, active[i].ep) for i in group]
                allowed = [constraint(style, active[i].ep.admissible) for i in group] if cfg.constrained else None
                sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=cfg.seed * 1_000_003 + call,
                                    stop=style.stop)
                call += 1
                t0 = time.perf_counter()
                gens = backend.generate(texts, sampling, allowed, sessions=[active[i].task.key for i in group])
                elapsed = time.perf_counter() - t0
                for i, g in zip(group, gens):
                    outputs[i], call_time[i] = g, elapsed
            for i, s in enumerate(active):
                g, precision = outputs[i], decisions[i]
                parsed = style.parse(g.text)
                t0 = time.perf_counter()
                # A malformed answer is sent as-is: the environment answers "Nothing happens.".
                tr = s.env.step(parsed if parsed is not None else g.text.strip())
                env_time = time.perf_counter() - t0
                step_time = call_time[i] + router_time + env_time
                s.time += step_time
                s.tokens[precision] = s.tokens.get(precision, 0) + g.completion_tokens
                s.calls[precision] = s.calls.get(precision, 0) + 1
                steps_f.write(json.dumps({
                    "task": s.task.key, "step": s.step, "precision": precision,
                    "prev_action": s.ep.history[-1][0] if s.ep.history else "", "observation": s.ep.observation,
                    "admissible": s.ep.admissible,
                    "output": g.text, "action": parsed, "malformed": parsed is None, "valid": tr.valid,
                    "step_type": tr.info.get("step_type", s.step_type),
                    "route_score": None if scores is None else scores[i],
                    "true_kl": None if probed is None else probed[i],
                    "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                    "llm_time": call_time[i], "router_time": router_time, "env_time": env_time,
                    "step_time": step_time, "done": tr.done, "won": tr.won}) + "\n")
                s.ep.history.append((parsed if parsed is not None else g.text.strip(), tr.text))
                s.ep.admissible, s.step = tr.admissible, s.step + 1
                s.step_type = tr.info.get("next_step_type", "action")
                if tr.done:
                    steps_f.flush()
                    eps_f.write(json.dumps({
                        "task": s.task.key, "split": s.task.split, "index": s.task.index,
                        "task_type": s.task.task_type, "goal": s.ep.goal, "seed": cfg.seed, "won": tr.won,
                        "score": tr.score,
                        "steps": s.step, "time": s.time,
                        "high_calls": s.calls.get(high, 0), "calls": sum(s.calls.values()),
                        "high_tokens": s.tokens.get(high, 0), "tokens": sum(s.tokens.values())}) + "\n")
                    eps_f.flush()
                    for b in backends.values():
                        b.end_session(s.task.key)
                    if hasattr(router, "end_session"):
                        router.end_session(s.task.key)
                    s.task = None
                    bar.update(1)
            steps_f.flush()
    bar.close()
    return read_jsonl(out / EPISODES)


def parse_models(items: list[str]) -> dict[str, str]:
    """Repeated `--model PRECISION=PATH` arguments as {precision: path}, in the order given."""
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model expects PRECISION=PATH, got {item!r}")
        models[name] = path
    return models


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--env", required=True)
    p.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments of the environment")
    p.add_argument("--split", default="test", choices=envs.SPLITS)
    p.add_argument("--n", type=int, required=True, help="number of tasks")
    p.add_argument("--offset", type=int, default=0, help="index of the first task of the split")
    p.add_argument("--model", action="append", required=True, metavar="PRECISION=PATH",
                   help="repeatable; the first is the high-precision reference")
    p.add_argument("--policy", default="full", help="full | quant | random[:P] | dmr | oracle (see dmr.policies.make_router)")
    p.add_argument("--p", type=float, default=None, help="random: probability of high precision")
    p.add_argument("--match", default=None, help="random, oracle: match the realised high fraction of this episodes.parquet")
    p.add_argument("--router", default=None, help="dmr: trained router directory (dmr.klst)")
    p.add_argument("--threshold", type=float, default=None, help="dmr: fixed score threshold")
    p.add_argument("--calibration", default=None, help="dmr: calibration.json (dmr.calibrate), with --budget")
    p.add_argument("--budget", type=float, default=None, help="dmr: high-precision budget K")
    p.add_argument("--kl", default=None, help="oracle: KL pool steps.parquet (dmr.kl)")
    p.add_argument("--pace", type=float, default=None,
                   help="dmr: per-episode budget; a step goes high only while the episode's high steps stay "
                        "within PACE x its routed steps so far + --burst, and the threshold is capped at the router's "
                        "decision boundary 0.5 (dmr.router.Router.set_pace)")
    p.add_argument("--burst", type=float, default=0.0, help="dmr with --pace: high steps allowed ahead of the pace")
    p.add_argument("--router-steps", nargs="+", default=None, metavar="TYPE",
                   help="step types routed policies decide (e.g. click); other steps are forced to the first "
                        "--model (paper App. C.1: WebShop search steps run bf16). Default: every step")
    p.add_argument("--backend", default="hf")
    p.add_argument("--backend-kwargs", default="{}", help="JSON keyword arguments of the backend")
    p.add_argument("--prompt", type=json.loads, default={"style": "react"},
                   help='JSON prompt spec, e.g. \'{"style": "instruct", "window": 4}\'')
    p.add_argument("--max-new-tokens", type=int, default=AgentConfig.max_new_tokens)
    p.add_argument("--temperature", type=float, default=AgentConfig.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=AgentConfig.top_p)
    p.add_argument("--constrained", action="store_true", help="decode only admissible actions")
    p.add_argument("--shards", type=int, default=AgentConfig.shards, help="concurrent episodes")
    p.add_argument("--seed", type=int, default=AgentConfig.seed)
    p.add_argument("--out", required=True, type=Path, help="run directory (resumed if it exists)")
    p.add_argument("--probe-kl", action="store_true",
                   help="diagnostics: measure each step's true KL as the KL oracle does (bf16 proposes, both "
                        "precisions score), store it as true_kl, never act on it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = AgentConfig(**{k: getattr(a, k) for k in AgentConfig.__dataclass_fields__})
    models = parse_models(a.model)
    env_kwargs = json.loads(a.env_kwargs)
    env = envs.make(a.env, **env_kwargs)
    tasks = env.tasks(a.split, a.n, a.offset)
    backend_kwargs = json.loads(a.backend_kwargs)
    backends = {name: llm.load(a.backend, path, **backend_kwargs) for name, path in models.items()}
    style = prompts.get(**cfg.prompt)
    router = make_router(a.policy, list(models), a.seed, p=a.p, match=a.match, router=a.router,
                         threshold=a.threshold, calibration=a.calibration, budget=a.budget, kl=a.kl,
                         router_steps=a.router_steps, backends=backends, style=style,
                         sampling=Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=cfg.seed, stop=style.stop),
                         constrained=cfg.constrained, pace=a.pace, burst=a.burst)
    if a.probe_kl:
        if len(models) < 2:
            raise SystemExit("--probe-kl needs a high and a low --model")
        names = list(models)
        router = KLProbe(router, OracleRouter(backends, names[0], names[1], style, Sampling(
            cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=cfg.seed, stop=style.stop), float("inf"), cfg.constrained))
    # An always-low run loads only the low model: it has no high-precision steps.
    high = None if a.policy == "quant" else next(iter(models))
    spec = {"env": a.env, "env_kwargs": env_kwargs, "split": a.split, "n": a.n, "offset": a.offset,
            "models": {k: fingerprint(v) for k, v in models.items()}, "policy": a.policy, "backend": a.backend,
            "backend_kwargs": backend_kwargs, "agent": asdict(cfg), "probe_kl": a.probe_kl,
            "routing": {k: getattr(a, k) for k in ("p", "threshold", "budget")}
            | ({"pace": a.pace, "burst": a.burst} if a.pace is not None else {})
            | ({"router_steps": a.router_steps} if a.router_steps else {})
            | {k: fingerprint(getattr(a, k)) if getattr(a, k) else None for k in ("match", "router", "calibration", "kl")}
            | {"effective": {k: getattr(router, k) for k in ("p", "threshold", "tau") if hasattr(router, k)}}}
    if getattr(env, "versions", None):
        # The game package's version is part of what a result is (ALFWorld 0.3 and 0.4 differ in grammar).
        spec["env_versions"] = env.versions
    claim(a.out, spec)
    rows = run(lambda: envs.make(a.env, **env_kwargs), tasks, backends, router, cfg, a.out, not a.quiet, high)
    finalize(a.out, {**spec, "models": models})
    won = sum(r["won"] for r in rows)
    print(f"{won}/{len(rows)} won ({100 * won / max(1, len(rows)):.1f}%) -> {a.out}")


if __name__ == "__main__":
    main()
