"""The router hook of the agent loop: per step, pick the precision that produces the next action.

`precisions[0]` is the high-precision reference (bf16); the others are lower precisions. Learned
routers (dmr.router) implement the same `decide` interface.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class StepContext:
    """What a router may look at when it decides one step."""

    episode: str
    step: int
    goal: str
    history: list[tuple[str, str]]  # earlier (action, observation) pairs
    observation: str
    admissible: list[str]
    step_type: str = "action"
    info: dict = field(default_factory=dict)


class Fixed:
    """Always the same precision: 'full' (always high) and 'quant' (always low) baselines."""

    def __init__(self, precision: str):
        self.precision = precision

    def decide(self, contexts: list[StepContext]) -> list[str]:
        return [self.precision] * len(contexts)


class RandomRouter:
    """High precision with probability p, seeded per (episode, step) so it does not depend on batching."""

    def __init__(self, high: str, low: str, p: float, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"random router probability must be in [0, 1], got {p}")
        self.high, self.low, self.p, self.seed = high, low, p, seed

    def decide(self, contexts: list[StepContext]) -> list[str]:
        return [self.high if random.Random(f"{self.seed}/{c.episode}/{c.step}").random() < self.p else self.low
                for c in contexts]


def make_router(policy: str, precisions: list[str], seed: int = 0):
    """Parse a policy name: full | quant | random:P. `precisions[0]` is the high precision."""
    if policy == "full":
        return Fixed(precisions[0])
    if policy == "quant":
        # The lowest precision given; an always-low run need not load the bf16 model at all.
        return Fixed(precisions[-1])
    if policy.startswith("random:"):
        if len(precisions) < 2:
            raise ValueError("policy 'random:P' needs a low-precision model (give a second --model)")
        return RandomRouter(precisions[0], precisions[1], float(policy.split(":", 1)[1]), seed)
    raise ValueError(f"unknown routing policy {policy!r}; expected full, quant or random:P")
