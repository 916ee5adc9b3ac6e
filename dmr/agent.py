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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from dmr import cli, envs, llm, prompts
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


class _Scheduler:
    """Which episode each shard plays: the unfinished tasks, handed to shards as they free up."""

    def __init__(self, env_factory, tasks, done: set, shards: int, progress: bool):
        self.pending = deque(t for t in tasks if t.key not in done)
        self.shards = [_Shard(env_factory()) for _ in range(min(shards, len(self.pending)))]
        self.bar = tqdm(total=len(tasks), initial=len(tasks) - len(self.pending), desc="episodes", disable=not progress)

    def active(self) -> list[_Shard]:
        """The shards with an episode this step, after free ones have started the next pending task."""
        for s in self.shards:
            if s.task is None and self.pending:
                s.task = self.pending.popleft()
                first = s.env.reset(s.task)
                s.ep = Episode(first.goal, first.text, [], first.admissible)
                s.step_type = first.info.get("next_step_type", "action")
                s.step, s.time, s.tokens, s.calls = 0, 0.0, {}, {}
        return [s for s in self.shards if s.task is not None]

    def finish(self, s: _Shard) -> None:
        s.task = None
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Step:
    """One shard's step as executed: what the recorder writes."""
    precision: str
    gen: object  # llm.Generation
    parsed: str | None
    tr: object  # the environment's transition
    route_score: float | None
    true_kl: float | None
    llm_time: float
    router_time: float
    env_time: float
    route_probs: list | None = None  # a router over > 2 precisions: its distribution (dmr.routing)

    @property
    def action(self) -> str:
        # A malformed answer is sent as-is: the environment answers "Nothing happens.".
        return self.parsed if self.parsed is not None else self.gen.text.strip()

    @property
    def step_time(self) -> float:
        return self.llm_time + self.router_time + self.env_time


class _Executor:
    """One step of all active shards: the router decides, each precision decodes its shards in one
    backend call, and every shard acts in its environment."""

    def __init__(self, backends: dict[str, Backend], router, cfg: AgentConfig):
        self.backends, self.router, self.cfg = backends, router, cfg
        self.style = prompts.get(**cfg.prompt)
        self.call = 0  # backend calls so far: each call's sampling seed

    def __call__(self, active: list[_Shard]) -> Iterator[_Step]:
        router, cfg, style = self.router, self.cfg, self.style
        # The step type is known before generation (WebShop: a search page asks for a query), so
        # routing can force types it does not decide (App. C.1) to the high precision.
        contexts = [StepContext(s.task.key, s.step, s.ep.goal, s.ep.history, s.ep.observation, s.ep.admissible,
                                step_type=s.step_type, first=s.ep.first) for s in active]
        t0 = time.perf_counter()
        decisions = router.decide(contexts)
        router_time = (time.perf_counter() - t0) / len(active)
        scores = getattr(router, "last_scores", None)
        probs = getattr(router, "last_probs", None)
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
            backend = self.backends[precision]
            texts = [style.render(backend.tokenizer, active[i].ep) for i in group]
            allowed = [constraint(style, active[i].ep.admissible) for i in group] if cfg.constrained else None
            sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=cfg.seed * 1_000_003 + self.call,
                                stop=style.stop)
            self.call += 1
            t0 = time.perf_counter()
            gens = backend.generate(texts, sampling, allowed, sessions=[active[i].task.key for i in group])
            elapsed = time.perf_counter() - t0
            for i, g in zip(group, gens):
                outputs[i], call_time[i] = g, elapsed
        # Lazily: each shard acts once the previous one's step is recorded, its episode ended.
        for i, s in enumerate(active):
            yield self._act(s, outputs[i], decisions[i], None if scores is None else scores[i],
                            None if probed is None else probed[i], call_time[i], router_time,
                            None if probs is None else probs[i])

    def _act(self, s: _Shard, g, precision, score, kl, llm_time, router_time, probs=None) -> _Step:
        parsed = self.style.parse(g.text)
        t0 = time.perf_counter()
        tr = s.env.step(parsed if parsed is not None else g.text.strip())
        return _Step(precision, g, parsed, tr, score, kl, llm_time, router_time, time.perf_counter() - t0, probs)

    @staticmethod
    def advance(s: _Shard, st: _Step) -> None:
        """The shard's episode after the step (its costs included)."""
        s.time += st.step_time
        s.tokens[st.precision] = s.tokens.get(st.precision, 0) + st.gen.completion_tokens
        s.calls[st.precision] = s.calls.get(st.precision, 0) + 1
        s.ep.history.append((st.action, st.tr.text))
        s.ep.admissible, s.step = st.tr.admissible, s.step + 1
        s.step_type = st.tr.info.get("next_step_type", "action")

    def end(self, key: str) -> None:
        for b in self.backends.values():
            b.end_session(key)
        if hasattr(self.router, "end_session"):
            self.router.end_session(key)


class _Recorder:
    """Appends every step to out/steps.jsonl and every finished episode to out/episodes.jsonl."""

    def __init__(self, out: Path, seed: int, high: str | None):
        self.seed, self.high = seed, high
        self.steps_f, self.eps_f = (out / STEPS).open("a"), (out / EPISODES).open("a")

    def step(self, s: _Shard, st: _Step) -> None:
        """A step row, written before the shard advances (its state is the one the step saw)."""
        g, tr = st.gen, st.tr
        self.steps_f.write(json.dumps({
            "task": s.task.key, "step": s.step, "precision": st.precision,
            "prev_action": s.ep.history[-1][0] if s.ep.history else "", "observation": s.ep.observation,
            "admissible": s.ep.admissible,
            "output": g.text, "action": st.parsed, "malformed": st.parsed is None, "valid": tr.valid,
            "step_type": tr.info.get("step_type", s.step_type),
            # The type the environment announced before generation: all that routing, calibration,
            # matching and the budget can know of a step (an ALFWorld think step is announced as
            # an action; it shows itself only in what the model writes).
            "announced_type": s.step_type,
            "route_score": st.route_score,
            # Only a router over > 2 precisions gives it (a step it did not decide: the column's null).
            **({"route_probs": st.route_probs} if st.route_probs is not None else {}),
            "true_kl": st.true_kl,
            "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "llm_time": st.llm_time, "router_time": st.router_time, "env_time": st.env_time,
            "step_time": st.step_time, "done": tr.done, "won": tr.won}) + "\n")

    def episode(self, s: _Shard, tr) -> None:
        """The episode row of a finished shard; its steps reach the disk first."""
        self.steps_f.flush()
        self.eps_f.write(json.dumps({
            "task": s.task.key, "split": s.task.split, "index": s.task.index,
            "task_type": s.task.task_type, "goal": s.ep.goal, "seed": self.seed, "won": tr.won,
            "score": tr.score,
            "steps": s.step, "time": s.time,
            "high_calls": s.calls.get(self.high, 0), "calls": sum(s.calls.values()),
            "high_tokens": s.tokens.get(self.high, 0), "tokens": sum(s.tokens.values())}) + "\n")
        self.eps_f.flush()

    def flush(self) -> None:
        self.steps_f.flush()

    def close(self) -> None:
        self.steps_f.close()
        self.eps_f.close()


def run(env_factory, tasks, backends: dict[str, Backend], router, cfg: AgentConfig, out: Path,
        progress: bool = True, high: str | None = "") -> list[dict]:
    """Run `tasks`, appending to out/steps.jsonl and out/episodes.jsonl. Returns the episode rows.

    `high` names the high-precision backend (default: the first); None when there is none."""
    out.mkdir(parents=True, exist_ok=True)
    scheduler = _Scheduler(env_factory, tasks, resume(out), cfg.shards, progress)
    execute = _Executor(backends, router, cfg)
    recorder = _Recorder(out, cfg.seed, next(iter(backends)) if high == "" else high)
    try:
        while active := scheduler.active():
            for s, st in zip(active, execute(active)):
                recorder.step(s, st)
                execute.advance(s, st)
                if st.tr.done:
                    recorder.episode(s, st.tr)
                    execute.end(s.task.key)
                    scheduler.finish(s)
            recorder.flush()
    finally:
        recorder.close()
    scheduler.close()
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


def _count(text: str) -> int | None:
    """--n: a number of tasks, or `all` (None)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tasks or `all`, got {text!r}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, parents=[cli.env(), cli.backend(), cli.decoding(AgentConfig()),
                                                               cli.pacing(), cli.kl_block()])
    p.add_argument("--split", default="test", choices=envs.SPLITS)
    p.add_argument("--n", type=_count, required=True, help="number of tasks, or `all` (every task of the split "
                   "from --offset on: a fixed benchmark split whose size depends on the data)")
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
    p.add_argument("--router-steps", nargs="+", default=None, metavar="TYPE",
                   help="step types routed policies decide (e.g. click); other steps are forced to the first "
                        "--model (paper App. C.1: WebShop search steps run bf16). Default: every step")
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
    if a.n is None and not hasattr(env, "split_size"):
        raise SystemExit(f"--n all needs a benchmark with fixed splits; {a.env} generates its tasks")
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
            cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=cfg.seed, stop=style.stop), float("inf"), cfg.constrained,
            kl_block=a.kl_block))
    # An always-low run loads only the low model: it has no high-precision steps.
    high = None if a.policy == "quant" else next(iter(models))
    spec = {"env": a.env, "env_kwargs": env_kwargs, "split": a.split, "n": a.n, "offset": a.offset,
            "models": {k: fingerprint(v) for k, v in models.items()}, "policy": a.policy, "backend": a.backend,
            "backend_kwargs": backend_kwargs, "agent": asdict(cfg), "probe_kl": a.probe_kl,
            **({"kl_block": a.kl_block} if a.probe_kl else {}),
            "routing": {k: getattr(a, k) for k in ("p", "threshold", "budget")}
            | ({"pace": a.pace, "burst": a.burst} if a.pace is not None else {})
            | ({"router_steps": a.router_steps} if a.router_steps else {})
            | {k: fingerprint(getattr(a, k)) if getattr(a, k) else None for k in ("match", "router", "calibration", "kl")}
            | {"effective": {k: getattr(router, k) for k in ("p", "threshold", "tau") if hasattr(router, k)}}}
    if getattr(env, "versions", None):
        # The game package's version is part of what a result is (ALFWorld 0.3 and 0.4 differ in grammar).
        spec["env_versions"] = env.versions
    if getattr(env, "resolved_splits", None):
        # So is the benchmark split a protocol split resolved to (ALFWorld: test -> valid_unseen or valid_seen).
        spec["env_splits"] = env.resolved_splits
    claim(a.out, spec)
    rows = run(lambda: envs.make(a.env, **env_kwargs), tasks, backends, router, cfg, a.out, not a.quiet, high)
    finalize(a.out, {**spec, "models": models})
    won = sum(r["won"] for r in rows)
    print(f"{won}/{len(rows)} won ({100 * won / max(1, len(rows)):.1f}%) -> {a.out}")


if __name__ == "__main__":
    main()
