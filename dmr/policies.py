"""The routing policies of the agent loop (dmr.agent), each a router in the sense of dmr.routing:
the fixed baselines (full, quant), matched random routing, the KL oracle and its online probe,
the learned router (dmr.router) at a threshold or a calibrated budget, and the step-type gate of
App. C.1. `make_router` builds the one a run asks for.
"""
from __future__ import annotations

import random
from pathlib import Path

from dmr.calibrate import budget_threshold
from dmr.kl import action_entropy, scored_block, step_kl
from dmr.router import load_router
from dmr.routing import StepContext, propose
from dmr.rundir import announced_steps, high_fraction


class Fixed:
    """Always the same precision: 'full' (always high) and 'quant' (always low) baselines."""

    def __init__(self, precision: str):
        self.precision = precision

    def decide(self, contexts: list[StepContext]) -> list[str]:
        return [self.precision] * len(contexts)


class RandomRouter:
    """High precision with probability p, seeded per (episode, step) so it does not depend on batching.
    Its score is p (as the learned router's is its probability of high): every step it decides has
    one, so its router calls count in Eq. 9 as the learned router's do (dmr.latency.router_calls).
    Over more than two precisions `low` lists the lower ones (cheapest last) and `p` is one share
    per precision, high first: a step goes to the precision whose cumulative share first exceeds
    its draw, so two precisions draw exactly as `p` = the high share does."""

    def __init__(self, high: str, low, p, seed: int = 0):
        lows = [low] if isinstance(low, str) else list(low)
        shares = [float(p), 1.0 - float(p)] if isinstance(p, (int, float)) else [float(x) for x in p]
        if len(shares) != 1 + len(lows) or not all(0.0 <= x <= 1.0 for x in shares):
            raise ValueError(f"random routing needs one probability in [0, 1] per precision {[high, *lows]}, "
                             f"got {p}")
        if abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"random routing shares must sum to 1, got {shares}")
        self.high, self.lows, self.seed = high, lows, seed
        self.p, self.shares = shares[0], shares
        self.last_scores: list | None = None

    def _draw(self, u: float) -> str:
        cum = 0.0
        for q, x in zip([self.high, *self.lows], self.shares):
            cum += x
            if u < cum:
                return q
        return self.lows[-1]

    def decide(self, contexts: list[StepContext]) -> list[str]:
        self.last_scores = [self.p] * len(contexts)
        return [self._draw(random.Random(f"{self.seed}/{c.episode}/{c.step}").random()) for c in contexts]


class MatchedCut:
    """The cut of a baseline matched to a bf16 share. With `target` (the share to match), the
    (1 - target) quantile of the signal this run has seen so far, so the run realises the share it
    is matched to: the signal on the run's own states is not distributed as on the KL pool's bf16
    states, so a cut fixed on the pool over- or undershoots the share. `tau` until `warmup` steps
    are seen, or always without a target. Deterministic: steps are seen in the loop's order."""

    def __init__(self, tau: float, target: float | None = None, warmup: int = 50):
        if target is not None and not 0.0 <= target <= 1.0:
            raise ValueError(f"a matched share must be in [0, 1], got {target}")
        self.tau, self.target, self.warmup, self.seen = tau, target, warmup, []

    def current(self) -> float:
        if self.target is None or len(self.seen) < self.warmup:
            return self.tau
        ranked = sorted(self.seen)
        k = int(round(self.target * len(ranked)))  # how many of the seen steps lie above the threshold
        if k <= 0:
            return float("inf")
        return ranked[len(ranked) - k - 1] if k < len(ranked) else float("-inf")

    def see(self, values: list[float]) -> float:
        """The cut for these steps (from the steps seen before them); then they count as seen."""
        cut = self.current()
        if self.target is not None:
            self.seen += values
        return cut


class _CutRouter:
    """What the two signal baselines share: the backends, decoding and a MatchedCut. `counted`: the
    step types whose signal the cut's running quantile counts (the routed ones, App. C.1: under a
    StepTypeGate the other steps run high whatever the cut says, so counting them would skew the
    share the routed steps realise); None counts every step. `kl_block`: the part of an output the
    signal is measured on (dmr.kl: the action block, or the whole output), as in the KL pool."""

    def __init__(self, backends: dict, high: str, low: str, style, sampling, tau: float, constrained: bool = False,
                 target: float | None = None, warmup: int = 50, counted=None, kl_block: str = "action"):
        self.backends, self.high, self.low, self.kl_block = backends, high, low, kl_block
        self.style, self.sampling, self.constrained = style, sampling, constrained
        self.cut = MatchedCut(tau, target, warmup)
        self.counted = None if counted is None else frozenset(counted)
        self.generations: dict = {}
        self.last_scores: list | None = None

    @property
    def tau(self) -> float:
        return self.cut.tau

    @property
    def target(self) -> float | None:
        return self.cut.target

    def current_tau(self) -> float:
        return self.cut.current()

    def see(self, contexts: list[StepContext], values: list[float]) -> float:
        """The cut for these steps; then the counted ones are seen."""
        return self.cut.see([v for c, v in zip(contexts, values) if self.counted is None or c.step_type in self.counted])


class OracleRouter(_CutRouter):
    """KL-oracle baseline (not in the paper): at each step bf16 proposes its continuation, both
    models score it as in dmr.kl, and the step goes to bf16 when the true step KL exceeds the cut
    (a MatchedCut: `tau`, or with `target` the running quantile that realises the matched bf16 share).
    It needs both models every step, so it bounds what a step router could do, not what it costs.
    bf16's proposal is handed back to the agent through `generations`, so a high step is not decoded
    twice; with `constrained` it is decoded under the agent's constraint, as the agent's own steps
    are (a free proposal would be an action the constrained agent could never take)."""

    def step_kls(self, contexts: list[StepContext]) -> tuple[list, list[float]]:
        """bf16's proposal at each step and the true step KL of the two precisions on it."""
        hb, lb = self.backends[self.high], self.backends[self.low]
        texts, keys, gens = propose(hb, self.style, self.sampling, contexts, self.constrained)
        conts = [g.text for g in gens]
        kls = [step_kl(*scored_block(h, l, c, hb.tokenizer, self.style, self.kl_block))["kl"]
               for h, l, c in zip(hb.score(texts, conts), lb.score(texts, conts, sessions=keys), conts)]
        return gens, kls

    def decide(self, contexts: list[StepContext]) -> list[str]:
        gens, kls = self.step_kls(contexts)
        tau = self.see(contexts, kls)
        self.generations = {(c.episode, c.step): g for c, g, k in zip(contexts, gens, kls) if k > tau}
        self.last_scores = kls
        return [self.high if k > tau else self.low for k in kls]


class UncertaintyRouter(_CutRouter):
    """Low-model uncertainty baseline (not in the paper): at each step the low precision proposes its
    action, scores it teacher-forced, and the step goes to bf16 when the mean entropy of its
    distribution over that action exceeds the threshold; otherwise the low proposal is the step's
    action (handed to the agent through `generations`, not decoded twice). A bf16 step thus costs
    one low call besides the bf16 one: the router's time (router_time) holds it.

    The threshold is a MatchedCut: `tau`, or with `target` the running quantile that realises the
    matched bf16 share (entropies of the model's own proposals are not distributed as the KL pool's
    teacher-forced ones)."""

    def decide(self, contexts: list[StepContext]) -> list[str]:
        lb = self.backends[self.low]
        texts, keys, gens = propose(lb, self.style, self.sampling, contexts, self.constrained)
        conts = [g.text for g in gens]
        ents = [action_entropy(scored_block(s, s, c, lb.tokenizer, self.style, self.kl_block)[0])
                for s, c in zip(lb.score(texts, conts, sessions=keys), conts)]
        if any(e is None for e in ents):
            raise ValueError("the uncertainty policy needs full distributions from the low backend (the HF backend)")
        tau = self.see(contexts, ents)
        self.generations = {(c.episode, c.step): g for c, g, e in zip(contexts, gens, ents) if e <= tau}
        self.last_scores = ents
        return [self.high if e > tau else self.low for e in ents]


class KLProbe:
    """Online diagnostics: the wrapped router decides; at every step the true step KL is measured
    as the KL oracle measures it (bf16 proposes, both precisions score) and exposed as `last_kl`,
    without acting on it. bf16's proposal is handed to the agent only where the router chose bf16
    anyway, so the run's actions are the wrapped router's."""

    def __init__(self, router, oracle: OracleRouter):
        self.router, self.oracle = router, oracle
        self.generations: dict = {}
        self.last_kl: list | None = None

    def decide(self, contexts: list[StepContext]) -> list[str]:
        choice = self.router.decide(contexts)
        gens, kls = self.oracle.step_kls(contexts)
        self.last_kl = kls
        # bf16's proposal where the router chose bf16; the router's own (a proposal router's low
        # proposal) where it chose low.
        self.generations = dict(getattr(self.router, "generations", None) or {})
        self.generations.update({(c.episode, c.step): g for c, g, d in zip(contexts, gens, choice) if d == self.oracle.high})
        return choice

    def __getattr__(self, name):
        return getattr(self.router, name)


class StepTypeGate:
    """The step-type protocol of App. C.1, for every routed policy: the wrapped router decides only
    steps whose type is in `steps` (WebShop: click); any other step (WebShop: search) runs at the
    high precision. The wrapped router still sees every step, so stateful routers (the KL-ST
    router's per-episode window) follow the whole episode."""

    def __init__(self, router, steps, high: str):
        self.router, self.steps, self.high = router, frozenset(steps), high
        self.last_scores: list | None = None
        self.last_probs: list | None = None
        self.generations: dict = {}

    def decide(self, contexts: list[StepContext]) -> list[str]:
        choice = self.router.decide(contexts)
        forced = [c.step_type not in self.steps for c in contexts]
        scores = getattr(self.router, "last_scores", None)
        self.last_scores = None if scores is None else [None if f else x for f, x in zip(forced, scores)]
        probs = getattr(self.router, "last_probs", None)
        self.last_probs = None if probs is None else [None if f else x for f, x in zip(forced, probs)]
        # What the wrapped router decoded for a step it kept low (a proposal router's proposal)
        # is no action for a step forced high.
        ready = getattr(self.router, "generations", None) or {}
        high = {(c.episode, c.step) for c, f in zip(contexts, forced) if f}
        self.generations = {k: g for k, g in ready.items() if k not in high}
        return [self.high if f else d for f, d in zip(forced, choice)]

    def __getattr__(self, name):
        # generations, end_session, p / threshold / tau: whatever the wrapped router has.
        return getattr(self.router, name)


def realised_fraction(episodes_parquet, step_types=None, high: str = "bf16") -> float:
    """High-precision share of the routed steps of a finished run (what matched baselines match).
    With `step_types`, the share of `high` among the steps announced as those types (from the run's
    steps.parquet), so a baseline gated to the same types matches what the router decided: the
    gate sees the announced type, never the one a step turns out to have (docs/method.md)."""
    import polars as pl

    if not step_types:
        return high_fraction(pl.read_parquet(episodes_parquet))
    steps = announced_steps(pl.read_parquet(Path(episodes_parquet).parent / "steps.parquet"), step_types)
    if steps.height == 0:
        raise ValueError(f"{episodes_parquet}: the run has no steps of type {list(step_types)} to match")
    return float((steps["precision"] == high).mean())


def realised_shares(episodes_parquet, precisions: list[str], step_types=None) -> list[float]:
    """Each precision's share of the routed steps of a finished run (its steps.parquet beside the
    episodes; with `step_types`, among the steps announced as those types), in `precisions`' order:
    what random routing over more than two precisions matches."""
    import polars as pl

    steps = pl.read_parquet(Path(episodes_parquet).parent / "steps.parquet")
    steps = announced_steps(steps, step_types) if step_types else steps
    if steps.height == 0:
        raise ValueError(f"{episodes_parquet}: the run has no routed steps to match")
    other = set(steps["precision"].unique().to_list()) - set(precisions)
    if other:
        raise ValueError(f"{episodes_parquet}: steps at {sorted(other)}, not among the precisions {precisions}")
    return [float((steps["precision"] == q).mean()) for q in precisions]


def make_router(policy: str, precisions: list[str], seed: int = 0, *, p: float | None = None,
                match: str | None = None, router: str | None = None, threshold: float | None = None,
                calibration: str | None = None, budget: float | None = None, kl: str | None = None,
                router_steps=None, backends: dict | None = None, style=None, sampling=None,
                constrained: bool = False, pace: float | None = None, burst: float = 0.0):
    """Build the router of a policy; `precisions[0]` is the high precision.

    full | quant: fixed. random: high with probability `p`, or with the realised high fraction of
    the run `match` (an episodes.parquet). dmr: the learned router in `router` at `threshold`, or
    at the calibrated threshold of `budget` from `calibration`. oracle: true step KL above the
    quantile of the KL pool `kl` that routes the fraction of `match` high, measured on the part of
    an output the pool's KL was (its `kl_block`). uncertainty: the low
    model's entropy over its own proposed action above the same kind of quantile of the pool's
    `low_entropy` (UncertaintyRouter). `random:P` is short for
    random with p=P. `router_steps`: the step types routed policies decide; the others are forced
    to the high precision (StepTypeGate), and matched fractions and KL quantiles are taken over
    those types only. `constrained`: the agent decodes only admissible actions, so the oracle's
    proposals must too. `pace`, `burst` (dmr): per-episode pacing (Router.set_pace)."""
    router = _make_router(policy, precisions, seed, p=p, match=match, router=router, threshold=threshold,
                          calibration=calibration, budget=budget, kl=kl, router_steps=router_steps,
                          backends=backends, style=style, sampling=sampling, constrained=constrained)
    if pace is not None:
        if policy != "dmr":
            raise ValueError(f"--pace paces the learned router (policy dmr), not {policy!r}")
        router.set_pace(pace, burst)
    if router_steps and not isinstance(router, Fixed):
        return StepTypeGate(router, router_steps, precisions[0])
    return router


def _make_router(policy, precisions, seed, *, p, match, router, threshold, calibration, budget, kl,
                 router_steps, backends, style, sampling, constrained):
    if policy == "full":
        return Fixed(precisions[0])
    if policy == "quant":
        # The lowest precision given; an always-low run need not load the bf16 model at all.
        return Fixed(precisions[-1])
    if policy.startswith("random:"):
        policy, p = "random", float(policy.split(":", 1)[1])
    if policy not in ("random", "dmr", "oracle", "uncertainty"):
        raise ValueError(f"unknown routing policy {policy!r}; expected full, quant, random[:P], dmr, oracle or uncertainty")
    if len(precisions) < 2:
        raise ValueError(f"policy {policy!r} needs a low-precision model (give a second --model)")
    if policy == "random":
        if (p is None) == (match is None):
            raise ValueError("policy random needs exactly one of a probability (random:P or --p) and --match")
        if len(precisions) > 2:
            if match is None:
                raise ValueError(f"random routing over {precisions} matches a run's per-precision shares: give --match")
            return RandomRouter(precisions[0], precisions[1:], realised_shares(match, precisions, router_steps), seed)
        p = realised_fraction(match, router_steps, precisions[0]) if match else p
        return RandomRouter(precisions[0], precisions[1], p, seed)
    if policy == "dmr":
        if router is None:
            raise ValueError("policy dmr needs --router DIR")
        if (threshold is None) == (budget is None):
            raise ValueError("policy dmr needs exactly one of --threshold and --budget (with --calibration)")
        if budget is not None:
            if calibration is None:
                raise ValueError("--budget needs --calibration FILE (written by dmr.calibrate)")
            threshold = budget_threshold(calibration, budget)
        r = load_router(router, threshold=threshold, backends=backends, style=style, sampling=sampling,
                        constrained=constrained)
        if list(r.precisions) != list(precisions[:len(r.precisions)]):
            raise ValueError(f"router {router} was trained for precisions {r.precisions}, but the run has {precisions}")
        return r
    import numpy as np
    import polars as pl

    if kl is None or match is None or backends is None:
        raise ValueError(f"policy {policy} needs --kl (the KL pool) and --match (the run whose fraction it matches)")
    pool = pl.read_parquet(kl)
    if router_steps:
        pool = pool.filter(pl.col("step_type").is_in(list(router_steps)))
    # Both baselines cut their signal on the KL pool at the quantile that routes the matched run's
    # realised fraction high: the oracle the step KL, the uncertainty policy the low model's entropy.
    column = "kl" if policy == "oracle" else "low_entropy"
    if column not in pool.columns or pool[column].null_count():
        raise ValueError(f"policy {policy}: the KL pool {kl} has no complete {column!r} column (rebuild it with dmr.kl "
                         "on the HF backend)")
    share = realised_fraction(match, router_steps, precisions[0])
    tau = float(np.quantile(pool[column].to_numpy(), 1.0 - share))
    cls = OracleRouter if policy == "oracle" else UncertaintyRouter
    # The signal is measured online on the part of an output the pool measured it on (a pool built
    # before dmr.kl recorded it scored whole outputs).
    block = pool["kl_block"][0] if "kl_block" in pool.columns and pool.height else "output"
    return cls(backends, precisions[0], precisions[1], style, sampling, tau, constrained, target=share,
               counted=router_steps or None, kl_block=block)
