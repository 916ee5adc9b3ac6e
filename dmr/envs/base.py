"""The environment protocol every benchmark implements (household, shop, alfworld, webshop).

One `Env` object runs one episode at a time, gym-style; the agent loop keeps one per shard.
Task pools are split into train / calib / test, and the splits are disjoint by construction:
each split draws its generation seeds from its own non-overlapping range.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

SPLITS = ("train", "calib", "test")
# Seeds of different splits never collide: split k owns [k * SPLIT_STRIDE, (k + 1) * SPLIT_STRIDE).
SPLIT_STRIDE = 10_000_000


def split_seed(split: str, index: int) -> int:
    """Generation seed of task `index` of `split`; disjoint ranges per split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < SPLIT_STRIDE:
        raise ValueError(f"task index {index} out of range [0, {SPLIT_STRIDE})")
    return SPLITS.index(split) * SPLIT_STRIDE + index


@dataclass(frozen=True)
class Task:
    """A task id that any worker can rebuild the same episode from."""

    benchmark: str
    split: str
    index: int
    seed: int
    task_type: str = ""

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.split}/{self.index}"


@dataclass
class Observation:
    """What `reset` returns: the first observation, the task goal, and the admissible actions."""

    text: str
    goal: str
    admissible: list[str]
    info: dict = field(default_factory=dict)


@dataclass
class Transition:
    """What `step` returns. `score` is in [0, 1]; benchmarks without partial credit use won."""

    text: str
    admissible: list[str]
    done: bool
    won: bool
    score: float
    valid: bool = True  # False when the action was not admissible ("Nothing happens.")
    info: dict = field(default_factory=dict)


class ExpertFailed(RuntimeError):
    """The expert cannot label the current state (e.g. ALFWorld's planner finds no plan in time):
    expert data skips the episode and says so, instead of losing the run."""


@runtime_checkable
class Env(Protocol):
    name: str
    max_steps: int

    def tasks(self, split: str, n: int, offset: int = 0) -> list[Task]:
        """Tasks `offset .. offset + n - 1` of `split`."""

    def reset(self, task: Task) -> Observation:
        ...

    def step(self, action: str) -> Transition:
        ...

    def expert_action(self) -> str:
        """The expert's next action from the current state (used for BC data and tests); raises
        ExpertFailed where it has none."""
