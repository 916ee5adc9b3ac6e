"""The router hook of the agent loop: per step, pick the precision that produces the next action.

A router is any object with

    decide(contexts: list[StepContext]) -> list[str]

one precision per context, at most one context per episode in a call. `precisions[0]` is the
high-precision reference (bf16); the others are lower precisions. The agent loop (dmr.agent) also
reads, where a router has them:
- `last_scores`: after `decide`, one score per context (None where the router did not decide the
  step), recorded as the step's `route_score`;
- `generations`: {(episode, step): Generation} of steps the router already decoded (the KL
  oracle's bf16 proposal), used instead of decoding them again;
- `last_kl`: after `decide`, the step KL measured but not acted on, recorded as `true_kl`;
- `end_session(episode)`: called when an episode ends;
- `p`, `threshold`, `tau`: the effective routing parameters, recorded in the run's spec.

The policies of a run are in dmr.policies; the learned router is dmr.router.Router.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dmr.prompts import Episode, constraint


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
    first: str = ""  # the initial observation of the episode
    info: dict = field(default_factory=dict)


def step_text(step: int, goal: str, prev_action: str, observation: str) -> str:
    """What the router sees of one step: the previous action and the observation it produced; the
    first step, having no previous action, shows the task instead."""
    if step == 0:
        return f"{goal.strip()}\n{observation.strip()}"
    return f"> {prev_action.strip()}\n{observation.strip()}"


def propose(backend, style, sampling, contexts: list[StepContext], constrained: bool):
    """One precision's proposal at each step, decoded as the agent decodes (its prompt, its sessions,
    its constraint): (prompts, session keys, generations)."""
    views = [Episode(c.goal, c.first, c.history, c.admissible) for c in contexts]
    keys = [c.episode for c in contexts]
    texts = [style.render(backend.tokenizer, v) for v in views]
    allowed = [constraint(style, c.admissible) for c in contexts] if constrained else None
    return texts, keys, backend.generate(texts, sampling, allowed, sessions=keys)


def replay_contexts(steps, episodes):
    """StepContexts of recorded episodes, per episode in step order (what the agent showed the router)."""
    goals = dict(zip(episodes["task"], episodes["goal"]))
    out = []
    for (task,), df in steps.sort("task", "step").group_by("task", maintain_order=True):
        rows = df.to_dicts()
        ctx = []
        for i, r in enumerate(rows):
            history = [(rows[j + 1]["prev_action"], rows[j + 1]["observation"]) for j in range(i)]
            ctx.append(StepContext(task, i, goals[task], history, r["observation"], r.get("admissible") or [],
                                   step_type=r["step_type"], first=rows[0]["observation"]))
        out.append(ctx)
    return out
