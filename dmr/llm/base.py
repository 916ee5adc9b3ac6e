"""The LLM backend protocol (hf on CPU/GPU, vllm on GPU). A new backend is one module in dmr/llm/."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None  # stop after the first of these strings (kept in the text)


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """`text` up to and including the first stop string (every backend keeps it in the text)."""
    if not stop:
        return text
    return text[:min((text.index(s) + len(s) for s in stop if s in text), default=len(text))]


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each generated token under the model's own distribution


@dataclass
class Scored:
    """Teacher-forced log-probs of a given continuation.

    `logprobs[t]` is the log-prob of continuation token t. `dist` is the full next-token log-prob
    matrix [T, V] (exact backends) and `topk` is [(ids, logprobs)] per position (top-k backends);
    one of the two is set.
    """

    token_ids: list[int]
    logprobs: list[float]
    dist: object | None = None
    topk: list[tuple[list[int], list[float]]] | None = field(default=None)


@runtime_checkable
class Backend(Protocol):
    name: str
    tokenizer: object

    def generate(self, prompts: list[str], sampling: Sampling, allowed: list[list[str]] | None = None,
                 sessions: list[str] | None = None) -> list[Generation]:
        """One completion per prompt. `allowed[i]`, when given, lists the only completions that
        prompt i may produce (constrained decoding); the model still picks among them token by token.
        `allowed[i]` None leaves prompt i free (a step whose actions include free text).
        `sessions[i]` names the episode of prompt i, so a backend may reuse its prefix cache."""

    def end_session(self, key: str) -> None:
        """The episode `key` is over: drop whatever was cached for it."""

    def score(self, prompts: list[str], continuations: list[str], full: bool = True,
              sessions: list[str] | None = None) -> list[Scored]:
        """Teacher-forced log-probs of each continuation after its prompt (see Scored). `sessions`
        as in `generate`: a backend may reuse and extend each episode's prefix cache."""

    def close(self) -> None:
        ...
