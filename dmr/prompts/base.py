from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Episode:
    """An episode so far, as a prompt sees it."""

    goal: str
    first: str                       # the initial observation
    history: list[tuple[str, str]] = field(default_factory=list)  # (action, observation) pairs
    admissible: list[str] = field(default_factory=list)           # for the current step

    @property
    def observation(self) -> str:
        return self.history[-1][1] if self.history else self.first


class PromptStyle(Protocol):
    name: str
    stop: list[str] | None  # generation stops after any of these strings

    def render(self, tokenizer, ep: Episode) -> str:
        """The full prompt text for the current step."""

    def answer(self, action: str) -> str:
        """The completion that carries `action` (what constrained decoding may emit)."""

    def parse(self, text: str) -> str | None:
        """The action in a completion, or None when it is malformed."""

    def reasoning(self, text: str) -> list[tuple[int, int]]:
        """Character spans of a completion's reasoning (instruct: its `<think>...</think>` blocks);
        the rest is the action block, which the step KL scores by default (dmr.kl)."""

    def segments(self, tokenizer, goal: str, first: str, steps: list[dict]) -> list[list[tuple[str, bool | None]]]:
        """Behaviour-cloning sequences of one recorded episode: lists of (text, supervised), where
        supervised is True for an expert answer, False for context (task, observations) and None
        for an executed action that was injected noise (dmr.expert): shown, but weighed as
        `noise_weight` (dmr.tiny_agent), so the agent does not learn to act at random."""


_TEMPLATE = re.compile(r"<[^<>\s][^<>]*>")


def constraint(style: PromptStyle, admissible: list[str]) -> list[str] | None:
    """The completions constrained decoding allows at a step, or None (free decoding) where an
    admissible action is a template with free text, such as WebShop's `search[<your query>]`.
    Here, not in the agent loop, because the KL oracle decodes its proposals under it too."""
    if any(_TEMPLATE.search(a) for a in admissible):
        return None
    return [style.answer(a) for a in admissible]
